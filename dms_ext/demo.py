"""End-to-end demo: a small random Qwen3-shaped model generating through DMSCache.

    python -m dms_ext.demo                        # GPU when there is one, else the CPU
    python -m dms_ext.demo --help                 # every flag with its default
    python -m dms_ext.demo --model path/to/qwen3-dms-checkpoint [--prompt "text"]

No downloads: by default the model is ``dms_ext.models.DMSForCausalLM`` (borrowed-neuron
variant, docs/semantics.md section 8) built from a config with random weights. Its
``alpha_offset`` is set so that about ``--evict-rate`` of the eviction logits are positive, so
the cache really evicts. ``--model`` runs a local transformers Qwen3 / Llama DMS checkpoint
through ``dms_ext.hf`` instead.

The demo prefills ``--batch`` prompts in one packed call, decodes greedily one token per
sequence per step (progress bar on stderr), and prints: prefill and decode speed (decode only
when a decode step ran), a per-layer table of what a dense cache would hold against what DMS
holds and the compression ratio CR = tokens seen / KV slots held (docs/semantics.md section 7),
and the time of one ``sparse_decode`` kernel call over the final cache. With matplotlib
(``pip install matplotlib``, or the ``demo`` extra) it writes a PNG: the tokens every
(layer, KV head) of sequence 0 holds over the steps, and the K/V memory of all sequences
against a dense cache, with the speed in the title.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .cache import DMSCache
from .models import DMSForCausalLM, ModelConfig

VOCAB = 4096


def random_model(*, layers: int, heads: int, kv_heads: int, head_dim: int, window: int,
                 evict_rate: float, max_position: int) -> DMSForCausalLM:
    """A random borrowed-neuron Qwen3-shaped model whose eviction logits are positive for about
    ``evict_rate`` of the tokens.

    The logit is ``x * alpha_scale - alpha_offset`` with x the borrowed channel after the
    per-head q-norm, which is close to N(0, 1) in a random model: an offset of
    ``alpha_scale * Phi^-1(1 - evict_rate)`` puts that fraction of x above the threshold. A
    trained model learns when to flag; this one flags at random at the rate asked for.
    """
    rate = min(max(evict_rate, 1e-4), 1 - 1e-4)
    alpha_scale = 100.0
    offset = alpha_scale * statistics.NormalDist().inv_cdf(1 - rate)
    cfg = ModelConfig(hidden=heads * head_dim, layers=layers, heads=heads, kv_heads=kv_heads,
                      head_dim=head_dim, vocab=VOCAB, window=window, alpha_scale=alpha_scale,
                      alpha_offset=offset, variant="borrowed", qk_norm=True,
                      max_position=max_position)
    return DMSForCausalLM(cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- runners

class _ModelRunner:
    """dms_ext.models.DMSForCausalLM over a DMSCache: packed chunks, positions per sequence."""

    def __init__(self, model: DMSForCausalLM, cache: DMSCache):
        self.model, self.dms, self.pos = model, cache, {}

    def add(self) -> int:
        sid = self.dms.add_sequence()
        self.pos[sid] = 0
        return sid

    def forward(self, seq_ids: List[int], ids: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """Next-token logits of the last token of each chunk: float32 [n, vocab]."""
        dev = self.dms.device
        cu = torch.tensor([0] + list(counts), dtype=torch.int32).cumsum(0, dtype=torch.int32)
        pos = torch.cat([torch.arange(self.pos[s], self.pos[s] + c, dtype=torch.int32)
                         for s, c in zip(seq_ids, counts)]).to(dev)
        for s, c in zip(seq_ids, counts):
            self.pos[s] += c
        logits = self.model.forward_cache(self.dms, seq_ids, cu, ids, pos)
        return logits.index_select(0, (cu[1:].long() - 1).to(logits.device))


class _HFRunner:
    """A transformers checkpoint patched by dms_ext.hf, over its DMSCacheHF."""

    def __init__(self, model, cache):
        self.model, self.hfc, self.dms = model, cache, cache.dms

    def add(self) -> int:
        return self.hfc.add_sequence()

    def forward(self, seq_ids: List[int], ids: torch.Tensor, counts: List[int]) -> torch.Tensor:
        last = torch.tensor(counts).cumsum(0).to(ids.device) - 1
        self.hfc.set_packed(seq_ids, counts)
        out = self.model(input_ids=ids[None], use_cache=True, logits_to_keep=last,
                         **_hf().cache_kwargs(self.model, self.hfc))
        return out.logits[0].float()


def _hf():
    from . import hf  # optional: needs transformers
    return hf


class _Progress:
    """One-line progress bar on stderr (a line per 10% when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool, width: int = 30):
        self.total, self.enabled, self.width = total, enabled and total > 0, width
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.shown = -1

    def update(self, done: int, tokens: int) -> None:
        if not self.enabled:
            return
        tenth = 10 * done // self.total
        if not self.tty and tenth == self.shown and done != self.total:
            return
        self.shown = tenth
        dt = max(time.perf_counter() - self.t0, 1e-9)
        fill = self.width * done // self.total
        line = (f"decode [{'#' * fill}{'.' * (self.width - fill)}] {done}/{self.total} steps "
                f"{tokens / dt:8.1f} tok/s")
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


@dataclass
class Run:
    seq_ids: List[int]
    tokens: torch.Tensor          # [n, new_tokens] generated ids (CPU)
    prefill_s: float
    decode_s: float
    steps: int                    # decode steps run (new_tokens - 1)
    history: torch.Tensor         # [steps + 1, n, layers, Hkv] KV slots held, after each call
    dense_history: List[int]      # tokens each (sequence, head) of a dense cache holds, per entry


@torch.no_grad()
def generate(runner, prompts: List[torch.Tensor], new_tokens: int,
             progress: bool = False) -> Run:
    """Greedy decoding of equally long prompts at once: one packed prefill (which yields the
    first new token), then ``new_tokens - 1`` decode steps of one token per sequence. Records the
    slots every (sequence, layer, KV head) holds after the prefill and after every step."""
    cache = runner.dms
    dev = cache.device
    seq_ids = [runner.add() for _ in prompts]
    lens = [len(p) for p in prompts]
    ids = torch.cat(prompts).to(dev)

    def snapshot():
        return torch.stack([torch.stack([cache.live_tokens(layer, s)
                                         for layer in range(cache.num_layers)])
                            for s in seq_ids])

    _sync(dev)
    t0 = time.perf_counter()
    nxt = runner.forward(seq_ids, ids, lens).argmax(-1)
    hist = [snapshot()]
    _sync(dev)
    t1 = time.perf_counter()
    out = [nxt]
    steps = new_tokens - 1
    bar = _Progress(steps, progress)
    ones = [1] * len(prompts)
    for step in range(steps):
        nxt = runner.forward(seq_ids, nxt, ones).argmax(-1)
        out.append(nxt)
        hist.append(snapshot())
        bar.update(step + 1, (step + 1) * len(prompts))
    _sync(dev)
    t2 = time.perf_counter()
    bar.close()
    dense = [lens[0] + i for i in range(len(hist))]
    return Run(seq_ids, torch.stack(out, 1).cpu(), t1 - t0, t2 - t1, steps,
               torch.stack(hist).cpu(), dense)


# ----------------------------------------------------------------------------- numbers

def _kv_bytes_per_slot(cache: DMSCache) -> int:
    return 2 * cache.head_dim * torch.tensor([], dtype=cache.kv_dtype).element_size()  # K and V


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.3f} MiB"


def report(cache: DMSCache, seq_ids: Sequence[int], tokens_per_seq: Sequence[int]) -> List[str]:
    """Per-layer table: (token, KV head) pairs a dense cache would hold ("seen"), KV slots DMS
    holds ("held"), CR = seen / held, and the K/V bytes of both."""
    per_slot = _kv_bytes_per_slot(cache)
    seen = sum(tokens_per_seq) * cache.num_kv_heads
    lines = [f"seen = tokens x KV heads x sequences (what a dense cache holds), held = KV slots "
             f"DMS holds, CR = seen / held",
             f"{'layer':>5} {'seen':>8} {'held':>8} {'CR':>6} {'live KV':>12} {'dense KV':>12}"]
    tot = 0
    for layer in range(cache.num_layers):
        held = sum(int(cache.live_tokens(layer, s).sum()) for s in seq_ids)
        tot += held
        lines.append(f"{layer:>5} {seen:>8} {held:>8} {seen / max(held, 1):>6.2f} "
                     f"{_mib(held * per_slot):>12} {_mib(seen * per_slot):>12}")
    seen_all = seen * cache.num_layers
    lines.append(f"{'all':>5} {seen_all:>8} {tot:>8} {seen_all / max(tot, 1):>6.2f} "
                 f"{_mib(tot * per_slot):>12} {_mib(seen_all * per_slot):>12}")
    used = cache.num_layers * cache.num_blocks - cache.num_free_blocks
    lines.append(f"blocks in use: {used} of {cache.num_layers * cache.num_blocks} "
                 f"({_mib(used * cache.block_size * per_slot)} incl. partly filled blocks)")
    return lines


@torch.no_grad()
def time_sparse_decode(cache: DMSCache, seq_ids: Sequence[int], num_q_heads: int,
                       iters: int) -> tuple:
    """Seconds per ``dms.sparse_decode`` call over layer 0's final state of ``seq_ids`` (one
    random query per sequence), and the live K/V bytes that call reads."""
    lay = cache._layers[0]   # the op over the cache's own tensors, as attend calls it
    rows = torch.tensor([cache._rows[s] for s in seq_ids], device=cache.device)
    table, lens = lay.block_table.index_select(0, rows), lay.seq_lens.index_select(0, rows)
    q = torch.randn(len(seq_ids), num_q_heads, cache.head_dim, device=cache.device,
                    dtype=cache.dtype)
    scale = cache.head_dim ** -0.5
    for _ in range(3):
        torch.ops.dms.sparse_decode(q, lay.k_cache, lay.v_cache, table, lens, scale)
    _sync(cache.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.ops.dms.sparse_decode(q, lay.k_cache, lay.v_cache, table, lens, scale)
    _sync(cache.device)
    return (time.perf_counter() - t0) / iters, int(lens.sum()) * _kv_bytes_per_slot(cache)


# ----------------------------------------------------------------------------- the picture

def plot_history(path: str, run: Run, cache: DMSCache, title: str) -> None:
    """PNG, two panels: KV slots held per (layer, KV head) of sequence 0 over the steps (one
    colour per head, dense cache dashed), and K/V memory of all sequences, DMS vs dense."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = run.history                               # [S, n, L, H]
    steps = list(range(hist.shape[0]))
    n, layers, heads = hist.shape[1], hist.shape[2], hist.shape[3]
    marker = "o" if len(steps) == 1 else None
    fig, (ax, am) = plt.subplots(1, 2, figsize=(13, 5.2), dpi=100,
                                 gridspec_kw={"width_ratios": [3, 2]})
    ax.plot(steps, run.dense_history, color="black", ls="--", lw=2, marker=marker, label="dense cache")
    cmap = plt.get_cmap("tab10" if layers * heads <= 10 else
                        "tab20" if layers * heads <= 20 else "turbo")
    total = layers * heads
    for layer in range(layers):
        for h in range(heads):
            i = layer * heads + h
            color = cmap(i) if total <= 20 else cmap(i / max(total - 1, 1))
            ax.plot(steps, hist[:, 0, layer, h].tolist(), color=color, lw=1.2, marker=marker,
                    label=f"layer {layer}, KV head {h}" if total <= 20 else None)
    ax.set_xlabel("decode step (0 = after the prefill)")
    ax.set_ylabel("KV slots held by the head (tokens), sequence 0")
    ax.set_title("tokens each (layer, KV head) keeps")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=7, ncol=2 if total > 6 else 1)

    per_slot = _kv_bytes_per_slot(cache)
    live = (hist.sum(dim=(1, 2, 3)).double() * per_slot / 2**20).tolist()
    dense = [d * n * layers * heads * per_slot / 2**20 for d in run.dense_history]
    am.plot(steps, dense, color="black", ls="--", lw=2, marker=marker, label="dense cache")
    am.plot(steps, live, color="tab:red", lw=2, marker=marker, label="DMS (slots held)")
    am.set_xlabel("decode step (0 = after the prefill)")
    am.set_ylabel(f"K/V memory, all {n} sequence(s) and {layers} layers (MiB)")
    cr = dense[-1] / max(live[-1], 1e-12)
    am.set_title(f"KV memory: {live[-1]:.2f} MiB vs {dense[-1]:.2f} MiB dense (CR {cr:.2f})")
    am.set_ylim(bottom=0)
    am.grid(alpha=0.3)
    am.legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- flags

def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {v}")
    return v


def _rate(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {s!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v}")
    return v


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dms_ext.demo",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = ap.add_argument
    a("--model", default=None, help="local Qwen3/Llama DMS checkpoint folder, run through "
      "dms_ext.hf (needs transformers); none: the built-in random model")
    a("--prompt", default=None, help="text prompt (--model with a tokenizer only); none: random "
      "token ids")
    a("--layers", type=_positive_int, default=4, help="decoder layers of the built-in model")
    a("--hidden-heads", type=_positive_int, default=8, help="query heads of the built-in model")
    a("--kv-heads", type=_positive_int, default=2, help="KV heads of the built-in model")
    a("--head-dim", type=_positive_int, default=64,
      help="head dimension of the built-in model (even; 64, 128 or 256 on CUDA)")
    a("--prompt-len", type=_positive_int, default=256, help="tokens per random prompt")
    a("--new-tokens", type=_positive_int, default=256,
      help="tokens generated per sequence (the first comes from the prefill, so N - 1 decode "
           "steps run)")
    a("--window", type=_positive_int, default=64, help="DMS window w of the built-in model")
    a("--batch", type=_positive_int, default=1, help="sequences decoded together")
    a("--block-size", type=_positive_int, default=16,
      help="tokens per cache block (a power of two on CUDA)")
    a("--evict-rate", type=_rate, default=0.8,
      help="fraction of positive eviction logits the random built-in model aims for, in [0, 1]")
    a("--device", default=None, help="cpu, cuda or cuda:N; none: cuda when a GPU and the CUDA "
      "kernels are there, else cpu")
    a("--seed", type=int, default=0, help="seed of the weights and prompts")
    a("--plot", default="auto", metavar="PATH",
      help="PNG to write (needs matplotlib); 'auto': a new unique file in the temp folder; "
           "'none': no picture")
    a("--kernel-iters", type=_positive_int, default=None,
      help="calls of the timed sparse_decode; none: 200 on CUDA, 20 on the CPU")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    return ap


def _has_cuda_kernels() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("dms::sparse_decode", "CUDA")
    except RuntimeError:
        return False


def _pick_device(ap: argparse.ArgumentParser, want: Optional[str]) -> torch.device:
    if want is None:
        ok = torch.cuda.is_available() and _has_cuda_kernels()
        return torch.device("cuda" if ok else "cpu")
    try:
        dev = torch.device(want)
    except RuntimeError:
        ap.error(f"argument --device: expected cpu, cuda or cuda:N, got {want!r}")
    if dev.type not in ("cpu", "cuda"):
        ap.error(f"argument --device: expected cpu, cuda or cuda:N, got {want!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            ap.error(f"argument --device: {want!r} asked for, but CUDA is not available (torch "
                     f"{torch.__version__}, no usable GPU); use --device cpu")
        if not _has_cuda_kernels():
            ap.error(f"argument --device: {want!r} asked for, but dms_ext was built without its "
                     f"CUDA kernels (DMS_FORCE_CPU, or a CPU torch at build time); use --device "
                     f"cpu or rebuild")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            ap.error(f"argument --device: {want!r}: only {torch.cuda.device_count()} GPU(s)")
    return dev


def _plot_path(spec: str) -> Optional[str]:
    if spec.lower() == "none" or spec == "":
        return None
    if spec == "auto":
        fd, path = tempfile.mkstemp(prefix="dms_demo_", suffix=".png")
        os.close(fd)
        return path
    return spec


# ----------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = parser()
    a = ap.parse_args(argv)
    if a.hidden_heads % a.kv_heads:
        ap.error(f"argument --hidden-heads: must be a multiple of --kv-heads={a.kv_heads}, "
                 f"got {a.hidden_heads}")
    if a.head_dim % 2:
        ap.error(f"argument --head-dim: must be even (rotate-half RoPE), got {a.head_dim}")
    device = _pick_device(ap, a.device)
    if device.type == "cuda" and not a.model:
        if a.head_dim not in (64, 128, 256):
            ap.error(f"argument --head-dim: the CUDA kernels take 64, 128 or 256, got {a.head_dim}")
    if device.type == "cuda" and a.block_size & (a.block_size - 1):
        ap.error(f"argument --block-size: must be a power of two on CUDA, got {a.block_size}")

    import dms_ext  # noqa: F401  (loads the op library)

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    total = a.prompt_len + a.new_tokens
    prompts = tok = None
    if a.model:
        from . import hf
        model = hf.load_dms_model(a.model, dtype=dtype, device=device)
        c = model.config
        vocab, hq = c.vocab_size, c.num_attention_heads
        if a.prompt is not None:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
            prompts = [torch.tensor(tok(a.prompt)["input_ids"]) for _ in range(a.batch)]
            total = len(prompts[0]) + a.new_tokens
        hfc = hf.DMSCacheHF.from_model(model, max_seqs=a.batch, max_tokens=total,
                                       block_size=a.block_size)
        runner = _HFRunner(model, hfc)
        desc = (f"{a.model}: {c.num_hidden_layers} layers, Hq {hq}, Hkv "
                f"{c.num_key_value_heads}, window {hfc.dms.window}, variant "
                f"{hf.dms_settings(c).variant}")
    else:
        model = random_model(layers=a.layers, heads=a.hidden_heads, kv_heads=a.kv_heads,
                             head_dim=a.head_dim, window=a.window, evict_rate=a.evict_rate,
                             max_position=max(4096, total))
        model = model.to(device=device, dtype=dtype).eval()
        model.cos_sin = model.cos_sin.float()   # RoPE table stays float32 (the op's contract)
        cfg = model.cfg
        vocab, hq = cfg.vocab, cfg.heads
        blocks_per_head = -(-total // a.block_size)
        cache = DMSCache(cfg.layers, cfg.kv_heads, cfg.head_dim, window=a.window,
                         block_size=a.block_size,
                         num_blocks=a.batch * cfg.kv_heads * blocks_per_head,
                         max_seqs=a.batch, dtype=dtype, device=device)
        runner = _ModelRunner(model, cache)
        desc = (f"random Qwen3-shaped dms_ext.models.DMSForCausalLM: {cfg.layers} layers, Hq "
                f"{cfg.heads}, Hkv {cfg.kv_heads}, D {cfg.head_dim}, window {a.window}, "
                f"aimed eviction rate {a.evict_rate:g}")
    if prompts is None:
        prompts = [torch.randint(vocab, (a.prompt_len,), generator=gen) for _ in range(a.batch)]
    plen = len(prompts[0])
    cache = runner.dms
    print(f"dms_ext demo: {desc}, block {cache.block_size}, {device}, {dtype}, "
          f"torch {torch.__version__}")
    if device.type == "cpu":
        print("(CPU: the ops run their C++ CPU twins; on a GPU the demo runs the CUDA kernels)")
    run = generate(runner, prompts, a.new_tokens, progress=a.progress)
    pre_tps = a.batch * plen / max(run.prefill_s, 1e-9)
    print(f"prefill: {a.batch} x {plen} tokens in {run.prefill_s:.3f} s ({pre_tps:.0f} tok/s)")
    if run.steps:
        dec_tps = a.batch * run.steps / max(run.decode_s, 1e-9)
        speed = f"decode {dec_tps:.1f} tok/s ({1e3 * run.decode_s / run.steps:.2f} ms/step)"
        print(f"decode:  {a.batch} x {run.steps} steps, {dec_tps:.1f} tok/s "
              f"({1e3 * run.decode_s / run.steps:.2f} ms/step, whole model incl. Python)")
    else:
        speed = "no decode step"
        print("decode:  no decode step ran (--new-tokens 1: the one new token comes from the "
              "prefill), so no decode speed")
    if tok is not None:
        print("text:", tok.decode(run.tokens[0].tolist()))
    else:
        print("first tokens:", run.tokens[0, :16].tolist())
    # The last generated token has not been run through the model, so it is not cached yet.
    for line in report(cache, run.seq_ids, [plen + a.new_tokens - 1] * a.batch):
        print(line)
    iters = a.kernel_iters or (200 if device.type == "cuda" else 20)
    sec, nbytes = time_sparse_decode(cache, run.seq_ids, hq, iters)
    kern = "CUDA kernel" if device.type == "cuda" else "CPU twin"
    print(f"sparse_decode ({kern}, layer 0, {a.batch} x {hq} query heads over the final "
          f"cache): {1e6 * sec:.1f} us per call, reads {_mib(nbytes)} of live K/V "
          f"({nbytes / max(sec, 1e-12) / 1e9:.2f} GB/s)")
    if device.type == "cuda":
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    if a.plot.lower() != "none" and a.plot != "":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("picture: skipped, matplotlib is not installed (pip install matplotlib, or "
                  "pip install -e '.[demo]'); the table above has the numbers")
            return 0
        path = _plot_path(a.plot)
        h = run.history
        title = (f"{device}, {str(dtype).replace('torch.', '')}, batch {a.batch}: prefill "
                 f"{pre_tps:.0f} tok/s, {speed}, sparse_decode {1e6 * sec:.1f} us/layer")
        plot_history(path, run, cache, title)
        print(f"picture: {path} ({h.shape[2]} layers x {h.shape[3]} KV heads over {run.steps} "
              f"decode steps; dashed = dense cache)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
