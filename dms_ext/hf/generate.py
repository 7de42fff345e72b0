"""generate(): packed, padding-free generation over DMSCacheHF with fork and release."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..cache import to_device
from .cache import DMSCacheHF
from .settings import cache_kwargs, state_of


@dataclass
class GenerationResult:
    """sequences[i][j]: the tokens generated for prompt i, sample j (the prompt excluded).
    decode_s covers every decode step, the first (eager) step and the graph capture included;
    stats: graph_replays / graph_captures (the cache's counters), decode_wait_s (seconds the
    loop blocked reading tokens back: near 0 when the host sets the pace)."""
    sequences: List[List[List[int]]]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    stats: Dict[str, object] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
           generator: Optional[torch.Generator]) -> torch.Tensor:
    logits = logits.float()
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / max(float(temperature), 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(srt, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(srt, dim=-1) > top_p
        srt = srt.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, srt)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# Decode steps launched ahead of the token read-back (generate()); 0 reads every step's tokens
# before the next launch (as any call with a callback does).
_READ_AHEAD = 1


def _read_later(tokens: torch.Tensor, waited: List[float]) -> Callable[[], List[int]]:
    """Starts copying tokens to the host without waiting; the returned call waits and lists them
    (adding the seconds it blocked to waited[0]: near 0 means the host, not the GPU, sets the
    pace of the loop)."""
    if tokens.device.type != "cuda":
        return tokens.tolist
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def read() -> List[int]:
        t = time.perf_counter()
        done.synchronize()
        waited[0] += time.perf_counter() - t
        return host.tolist()
    return read


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
             num_samples: int = 1, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_token_id: Union[int, Sequence[int], None] = None,
             cache: Optional[DMSCacheHF] = None, block_size: Optional[int] = None,
             prefill_chunk_tokens: Optional[int] = None, generator: Optional[torch.Generator] = None,
             cuda_graphs: Optional[bool] = None,
             callback: Optional[Callable[[int, List[int], DMSCacheHF], None]] = None) -> GenerationResult:
    """Batched generation over DMSCache without padding: prompts of different lengths are packed
    (prefilled in chunks of at most ``prefill_chunk_tokens`` tokens; default the config's
    ``dms_chunked_prefill``, else 4096), each prompt is forked into ``num_samples`` sequences
    after its prefill (parallel sampling shares the prompt's cache contents by copy), every
    decode step packs one token per live sequence, and a sequence is released once it emits
    ``eos_token_id`` or reaches ``max_new_tokens``.

    On CUDA the decode steps replay a CUDA graph (``cuda_graphs``, default the cache's setting,
    True for a new cache): finished sequences then stay in the batch, their tokens ignored,
    until at most half of it is live; then they are released and the smaller batch is captured
    again. The same batching is used with ``cuda_graphs=False`` on CUDA, so both give the same
    tokens. On the CPU a sequence is released as soon as it finishes.

    Each decode step is launched before the previous step's tokens are read back (its input
    tokens stay on the device), so the host's per-step work overlaps the GPU's; a sequence that
    stops at EOS thus takes part in one more step, whose token is dropped.
    ``callback(step, live_seq_ids, cache)`` runs after every decode step (before releases); with
    a callback every step's tokens are read before the next step is launched."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: expected a non-empty list of non-empty token lists")
    if num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    st = state_of(model).settings
    dev = next(model.parameters()).device
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    total = len(prompts) * num_samples
    if cache is None:
        longest = max(len(p) for p in prompts) + max_new_tokens
        cache = DMSCacheHF.from_model(model, max_seqs=total, max_tokens=longest, block_size=block_size)
    if cuda_graphs is not None:
        cache.cuda_graphs = bool(cuda_graphs)
    if prefill_chunk_tokens is None:
        prefill_chunk_tokens = st.chunked_prefill or 4096
    kw = cache_kwargs(model, cache)
    defer = cache.dms.device.type == "cuda"

    def forward(seq_ids: List[int], chunks: Optional[List[List[int]]] = None,
                ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """chunks: each sequence's new tokens; or ids [n] on the device, one per sequence."""
        if chunks is None:
            counts = [1] * len(seq_ids)
        else:
            counts = [len(c) for c in chunks]
            ids = to_device(np.array([t for c in chunks for t in c], dtype=np.int64), dev)
        last = to_device(np.cumsum(counts, dtype=np.int64) - 1, dev)   # no stream sync
        cache.set_packed(seq_ids, counts)
        out = model(input_ids=ids[None], use_cache=True, logits_to_keep=last, **kw)
        return out.logits[0]                                   # [n, vocab]

    t0 = time.perf_counter()
    base = [cache.add_sequence() for _ in prompts]
    last_logits: Dict[int, torch.Tensor] = {}
    # Prefill: pack prompt pieces up to the token budget per call.
    offs = [0] * len(prompts)
    while any(o < len(p) for o, p in zip(offs, prompts)):
        budget = max(1, int(prefill_chunk_tokens))
        sids, chunks, owners = [], [], []
        for i, p in enumerate(prompts):
            if offs[i] >= len(p) or budget <= 0:
                continue
            take = min(len(p) - offs[i], budget)
            sids.append(base[i])
            chunks.append(list(p[offs[i]:offs[i] + take]))
            owners.append(i)
            offs[i] += take
            budget -= take
        logits = forward(sids, chunks)
        for row, i in enumerate(owners):
            if offs[i] == len(prompts[i]):
                last_logits[i] = logits[row]
    # Parallel sampling: every sample of a prompt starts from the prompt's cache (fork).
    seqs: List[List[List[int]]] = [[[] for _ in range(num_samples)] for _ in prompts]
    batch: List[tuple] = []                                     # (seq_id, prompt, sample)
    for i in range(len(prompts)):
        first = sample(last_logits[i][None].expand(num_samples, -1), do_sample, temperature,
                       top_k, top_p, generator).tolist()
        ids = [base[i]] + [cache.fork(base[i]) for _ in range(num_samples - 1)]
        for j, (sid, tok) in enumerate(zip(ids, first)):
            seqs[i][j].append(int(tok))
            batch.append((sid, i, j))
    _sync(dev)
    t1 = time.perf_counter()

    def finished(i, j):
        s = seqs[i][j]
        return len(s) >= max_new_tokens or (s and s[-1] in eos)

    def prune(rows: List[tuple]) -> List[tuple]:
        """Releases the finished rows (all of them on the CPU; on CUDA only once at most half
        the batch is live, so that a captured batch lasts)."""
        done = [finished(i, j) for _, i, j in rows]
        if defer and sum(done) * 2 < len(rows) and not all(done):
            return rows
        for (sid, _, _), d in zip(rows, done):
            if d:
                cache.release(sid)
        return [r for r, d in zip(rows, done) if not d]

    steps = tokens = 0
    batch = prune(batch)
    # Read-ahead (without a callback): step t + 1 is launched before step t's tokens are read
    # back. Its input tokens stay on the device (the sampled tensor), so on CUDA the host's work
    # for a step (HF's forward, the plan, the launch) overlaps the GPU's instead of following a
    # sync. A row that turns out to have finished (EOS) at step t gets one more token at step
    # t + 1, ignored like every token of a finished row that stays in a captured batch (prune).
    # The CPU runs the same loop (its read-back is immediate).
    lag = _READ_AHEAD if callback is None else 0
    waited = [0.0]                                  # seconds the loop blocked on the GPU
    inflight: List[tuple] = []                      # (rows, read_tokens) of launched steps
    cur, cur_rows = None, []                        # the last step's sampled tokens (device)

    def due(i, j) -> bool:                          # may still need a token after the launched steps
        return not finished(i, j) and len(seqs[i][j]) + len(inflight) < max_new_tokens

    while batch or inflight:
        launched = False
        if batch and any(due(i, j) for _, i, j in batch):
            if cur is None:
                ids = to_device(np.array([seqs[i][j][-1] for _, i, j in batch], dtype=np.int64), dev)
            else:                                    # the rows still in the batch, on the device
                at = {r: k for k, r in enumerate(cur_rows)}
                keep = [at[r] for r in batch]
                ids = cur if keep == list(range(len(cur_rows))) else cur[to_device(np.array(keep, dtype=np.int64), dev)]
            logits = forward([s for s, _, _ in batch], ids=ids)
            cur = sample(logits, do_sample, temperature, top_k, top_p, generator)
            cur_rows = list(batch)
            inflight.append((cur_rows, _read_later(cur, waited)))
            launched = True
        if inflight and (not launched or len(inflight) > lag):
            rows, read = inflight.pop(0)
            nxt = read()
            live = [(sid, i, j) for sid, i, j in rows if not finished(i, j)]
            steps += bool(live)                      # a read-ahead step past every EOS: not a step
            tokens += len(live)
            if callback is not None:
                callback(steps, [s for s, _, _ in live], cache)
            for (sid, i, j), tok in zip(rows, nxt):
                if not finished(i, j):
                    seqs[i][j].append(int(tok))
            batch = prune(batch)
        elif not launched:
            break
    _sync(dev)
    t2 = time.perf_counter()
    return GenerationResult(sequences=seqs, prefill_s=t1 - t0, decode_s=t2 - t1,
                            decode_steps=steps, decode_tokens=tokens,
                            stats={"graph_replays": cache.graph_replays,
                                   "graph_captures": cache.graph_captures,
                                   "decode_wait_s": waited[0]})
