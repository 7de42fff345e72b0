"""bench_hf: dms_ext.hf generation (CUDA-graph decode) vs transformers' static-cache generate.

    python bench/bench_hf.py [--batch 32] [--prompt 4096] [--new 128] [--window 512]

GPU only. A Qwen3-8B-shaped config (36 layers, hidden 4096, Hq 32, Hkv 8, D 128, MLP 12288,
vocab 151936) with random bf16 weights, patched for DMS (borrowed neuron; the alpha offset is
set so that the live KV matches bench_e2e's uniform CR 8 rows at 4160 tokens, achieved CR about
7.2, the workload of the raw-op step this bench is compared with). Rows:

* dms hf.generate: packed prefill, then decode steps replayed from one CUDA graph per batch.
* dms model.generate + DMSCacheHF: transformers' own loop over our cache (graphs too).
* hf static + sdpa, same batch: transformers' generate(cache_implementation="static") with SDPA.
* hf static + sdpa, same KV memory: the dense batch whose KV cache fits in the bytes the DMS
  pool uses after the prompt (at least 1).

Decode tokens/s and ms / step time the decode steps alone: hf.generate's own decode_s, and for
transformers' generate a streamer that syncs and stamps every new token (StepTimer). The static
peers are warmed up twice at the timed shape; a timed call that compiles gives no number. Compare
the dms per-step time with bench_e2e's raw-op step time at the same batch (target: within 10%).
Results: bench/results/hf_<date>.md (date, GPU, torch, transformers, commit, command).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CONFIG = dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
              num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
              max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
              tie_word_embeddings=False, dms_alpha_scale=100.0, dms_separate_alpha=False)


_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"[bench_hf {time.perf_counter() - _T0:6.1f} s] {msg}", flush=True)


def _timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


class StepTimer:
    """A transformers streamer that times the decode steps of one generate() call: put() is
    called with the prompt, then once per new token; the clock starts at the first new token
    (the prefill's) and stops at the last, both after a device sync. (n - 1) steps / elapsed is
    the decode rate without the prefill, whose run-to-run spread (seconds) would swamp a
    difference of two whole-generate times."""

    def __init__(self):
        self.calls, self.t_first, self.t_last = 0, None, None

    def put(self, value):
        self.calls += 1
        if self.calls >= 2:                       # call 1 is the prompt
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.t_first = now if self.t_first is None else self.t_first
            self.t_last = now

    def end(self):
        pass

    def step_s(self) -> float:
        steps = self.calls - 2                    # tokens after the first
        if steps < 1:
            raise RuntimeError("StepTimer: fewer than 2 new tokens")
        return (self.t_last - self.t_first) / steps


def _compiles() -> int:
    """torch.compile graph count so far (a timed call that compiles is not a steady-state time)."""
    try:
        from torch._dynamo.utils import counters
        return int(sum(counters["stats"].values()))
    except Exception:  # pragma: no cover - dynamo internals moved
        return -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--offset", type=float, default=None,
                    help="dms_initial_alpha_offset (default -207: q after q_norm is ~N(0, 1) with random weights, so "
                         "P(100 q + 207 > 0) = 0.981 and a head keeps its 512-token window plus 1.9%% of the rest: "
                         "about 582 of 4160 tokens, bench_e2e's uniform CR 8 rows (achieved CR 7.15); -115 kept 960)")
    ap.add_argument("--profile", action="store_true",
                    help="also list the GPU kernels of one hf.generate decode step (torch.profiler; graphs "
                         "and eager)")
    ap.add_argument("--no-static", action="store_true",
                    help="skip transformers' static-cache peers (they compile for minutes)")
    args = ap.parse_args()
    common.require_cuda("bench_hf")
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from dms_ext import hf

    torch.manual_seed(0)
    cfg = dict(CONFIG, dms_window_size=args.window,
               dms_initial_alpha_offset=args.offset if args.offset is not None else -207.0)
    model = hf.load_dms_model(cfg, dtype=torch.bfloat16, device="cuda")
    _log("model built")
    b, p, n = args.batch, args.prompt, args.new
    prompts = torch.randint(0, cfg["vocab_size"], (b, p)).tolist()
    rows = []

    # DMS, hf.generate: prefill alone, then prefill + decode.
    _, pre_s = _timed(lambda: hf.generate(model, prompts, max_new_tokens=1))
    _log(f"prefill {pre_s:.2f} s")
    cache = hf.DMSCacheHF.from_model(model, max_seqs=b, max_tokens=p + n)
    free0 = cache.dms.num_free_blocks
    hf.generate(model, prompts, max_new_tokens=8, cache=cache)          # warm-up, graphs
    replays0 = cache.graph_replays
    r = hf.generate(model, prompts, max_new_tokens=n, cache=cache)
    # decode_s: the decode loop alone (synced wall clock inside generate), not total - prefill.
    dec = max(r.decode_s, 1e-9)
    step_ms = dec / max(r.decode_steps, 1) * 1e3
    _log(f"hf.generate: {step_ms:.2f} ms / step")
    rows.append(["dms hf.generate (graphs)", b, r.decode_tokens / dec, step_ms,
                 r.stats["graph_replays"] - replays0])
    # Steady state: generate(n) - generate(n // 2) over the same prompts cancels what both pay
    # once (the first, eager step of the batch and the graph capture), leaving replayed steps,
    # the quantity bench_e2e times for its raw-op step.
    h = hf.generate(model, prompts, max_new_tokens=n // 2, cache=cache)
    steady_ms = (r.decode_s - h.decode_s) / max(r.decode_steps - h.decode_steps, 1) * 1e3
    r_replays = r.stats["graph_replays"] - replays0
    h_replays = h.stats["graph_replays"] - r.stats["graph_replays"]
    rows.append(["dms hf.generate (graphs), steady state", b, b / steady_ms * 1e3, steady_ms,
                 r_replays - h_replays])
    once_ms = dec * 1e3 - steady_ms * r.decode_steps
    wait_ms = r.stats.get("decode_wait_s", float("nan")) / max(r.decode_steps, 1) * 1e3
    _log(f"hf.generate steady state: {steady_ms:.2f} ms / step; once per batch {once_ms:.0f} ms; "
         f"loop blocked on the GPU {wait_ms:.2f} ms / step")
    profiles = []
    if args.profile:
        for label, graphs in (("graphs", True), ("eager", False)):
            pr = common.kernel_profile(lambda k: hf.generate(model, prompts, max_new_tokens=k, cache=cache,
                                                      cuda_graphs=graphs))
            profiles.append((label, pr))
            _log(f"profile ({label}): {pr[1]:.1f} kernels, {pr[2]:.0f} us of kernels per step")
        cache.cuda_graphs = True
    # KV bytes DMS holds right after the prompt (sequences kept: measure, then release).
    c2 = hf.DMSCacheHF.from_model(model, max_seqs=b, max_tokens=p + 1)
    sids = [c2.add_sequence() for _ in range(b)]
    for s, pr in zip(sids, prompts):
        c2.set_packed([s], [p])
        with torch.no_grad():
            model(input_ids=torch.tensor([pr], device="cuda"), use_cache=True,
                  **hf.cache_kwargs(model, c2), logits_to_keep=1)
    live = sum(int(c2.live_tokens(l, s).sum()) for l in range(36) for s in sids)
    dms_bytes = live * 128 * 2 * 2              # K and V, bf16, D 128 (block padding not counted)
    dense_per_seq = 36 * 2 * 8 * (p + n) * 128 * 2
    del c2
    achieved_cr = b * p * 36 * 8 / max(live, 1)
    _log(f"DMS KV after the prompt: {dms_bytes / 2**30:.2f} GiB, achieved CR {achieved_cr:.2f}")
    torch.cuda.empty_cache()

    out_path = [""]

    def emit() -> str:
        """The table so far, (re)written to one results file after every row: a run cut short
        (the dense peers compile for minutes) keeps what it measured."""
        table = common.md_table(["path", "batch", "decode tok/s", "ms / step", "graph replays"], rows)
        body = (f"- transformers {transformers.__version__}\n"
                f"- prompt {p}, new tokens {n}, window {args.window}; DMS KV after the prompt "
                f"{dms_bytes / 2**30:.2f} GiB, achieved CR {achieved_cr:.2f} (dense: "
                f"{dense_per_seq * b / 2**30:.2f} GiB at batch {b}); alpha offset {cfg['dms_initial_alpha_offset']}\n"
                f"- hf.generate of {n} tokens: {once_ms:.0f} ms paid once per batch (its first, eager "
                f"step and the graph capture: the whole-loop row minus {r.decode_steps} steady-state "
                f"steps); the loop blocked on the GPU {wait_ms:.2f} ms per step (the rest of a step "
                f"the host was busy)\n\n"
                + table + "\n")
        for label, pr in profiles:
            body += "\n" + common.kernel_profile_md(
                f"one decode step ({label}; profile of generate(12) minus generate(4), / 8)", pr,
                CONFIG["num_hidden_layers"]) + "\n"
        out_path[0] = common.write_results("hf", "dms_ext.hf generate vs transformers static cache",
                                           body, path=out_path[0])
        return body

    emit()
    # DMS through transformers' own generate loop.
    ids = torch.tensor(prompts, device="cuda")
    c3 = hf.DMSCacheHF.from_model(model, max_seqs=b, max_tokens=p + n)
    st3 = StepTimer()
    model.generate(ids, **hf.cache_kwargs(model, c3), max_new_tokens=n, min_new_tokens=n,
                   do_sample=False, pad_token_id=0, streamer=st3)
    rows.append(["dms model.generate + DMSCacheHF", b, b / st3.step_s(), st3.step_s() * 1e3,
                 c3.graph_replays])
    del c3, free0
    _log(f"model.generate: {rows[-1][3]:.2f} ms / step")
    emit()
    if args.no_static:
        print(emit())
        print("wrote", out_path[0])
        return
    sd = {k: v for k, v in model.state_dict().items()}
    del model
    torch.cuda.empty_cache()

    with torch.device("cuda"):
        dense = AutoModelForCausalLM.from_config(AutoConfig.for_model(**CONFIG), attn_implementation="sdpa",
                                                 dtype=torch.bfloat16).eval()
    dense.load_state_dict(sd, strict=False)
    del sd
    for label, bb in (("hf static + sdpa, same batch", b),
                      ("hf static + sdpa, same KV memory", max(1, int(dms_bytes // dense_per_seq)))):
        x = ids[:bb]
        try:
            gen = lambda k, **kw: dense.generate(x, max_new_tokens=k, min_new_tokens=k,  # noqa: E731
                                                 do_sample=False, cache_implementation="static",
                                                 pad_token_id=0, **kw)
            # Warm up at the timed shape: the static cache is sized prompt + max_new_tokens, and
            # a new size recompiles (the 08:37 run of 2026-11-30 timed gen(n) after warming gen(2)
            # and measured the recompilation: 580 ms per step).
            gen(n)
            gen(n)
            c0 = _compiles()
            st = StepTimer()
            gen(n, streamer=st)
            if _compiles() != c0:  # not a steady-state time: no number for this row
                rows.append([label, bb, float("nan"), float("nan"), "compiled while timed"])
            else:
                rows.append([label, bb, bb / st.step_s(), st.step_s() * 1e3, "- (torch.compile)"])
            _log(f"{label}: batch {bb} done")
            emit()
        except torch.cuda.OutOfMemoryError:
            rows.append([label, bb, float("nan"), float("nan"), "OOM"])
            emit()
        torch.cuda.empty_cache()

    print(emit())
    print("wrote", out_path[0])


if __name__ == "__main__":
    main()
