"""Shared bench helpers: CUDA-graph replay timing, the device read ceiling, results files.

Importable without a GPU (nothing here touches CUDA at import time); call require_cuda()
first in a bench's main.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import subprocess
import shlex
import sys
import traceback
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from source_digest import source_digest  # bench/, on sys.path for every bench script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "bench", "results")
# H200: 60 MB of L2 (brief). Take the larger of this and what the driver reports, so
# rotation never under-sizes the working set.
L2_FLOOR_BYTES = 60 << 20


def try_peer(fn, label: str, errors: list, oom_value=None):
    """fn(), or None when it raises (a failing peer is reported in `errors`, never fatal).
    An out-of-memory error returns `oom_value` instead when one is given (the bench shows it)."""
    try:
        return fn()
    except Exception as e:
        if oom_value is not None and isinstance(e, torch.cuda.OutOfMemoryError):
            errors.append(f"{label}: OOM")
            print(f"  [{label}] OOM: {str(e).splitlines()[0][:160]}", flush=True)
            torch.cuda.empty_cache()
            return oom_value
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        errors.append(f"{label}: {msg}")
        print(f"  [{label}] failed: {msg}", flush=True)
        if os.environ.get("BENCH_TRACEBACK") == "1":
            traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def require_cuda(what: str = "this bench") -> None:
    if not torch.cuda.is_available():
        print(f"{what} needs a CUDA GPU; none found (torch {torch.__version__}). Exiting.")
        sys.exit(0)


def l2_bytes() -> int:
    prop = torch.cuda.get_device_properties(torch.cuda.current_device())
    return max(int(getattr(prop, "L2_cache_size", 0) or 0), L2_FLOOR_BYTES)


def copies_to_beat_l2(working_set_bytes: int, max_copies: int = 32) -> int:
    """Input copies to rotate through so consecutive calls never find their data in L2.

    Twice the L2 so that LRU-ish replacement has evicted a copy before it comes round again.
    """
    if working_set_bytes <= 0:
        return 1
    return int(min(max_copies, max(1, math.ceil(2 * l2_bytes() / working_set_bytes))))


@dataclass
class Timing:
    us: float                 # median per call, microseconds
    us_min: float
    us_p90: float
    calls_per_replay: int
    replays: int
    mode: str                 # "graph" or "eager (<why>)"
    notes: list = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.us:.1f} us (min {self.us_min:.1f}, p90 {self.us_p90:.1f}, {self.mode})"


def warm_up(fns: Sequence[Callable[[], object]], rounds: int = 1) -> None:
    """Runs every fn `rounds` times on a side stream, outside any capture (lazy inits, JIT loads,
    cached workspaces, cuBLAS / cuDNN plans), then waits for it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(rounds):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def capture(fn: Callable[[], object], label: str = "graph") -> tuple:
    """One CUDA graph holding a call of fn: (graph, label), or (None, "eager (why)") when capture
    fails (best effort: eager timing still means something, and the mode says why)."""
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        return graph, label
    except Exception as e:
        torch.cuda.synchronize()
        return None, f"eager ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"


def time_calls(fns: Sequence[Callable[[], object]], name: str, *, min_calls: int = 8,
               target_s: float = 0.25, min_replays: int = 15, max_replays: int = 200,
               use_graph: bool = True) -> Timing:
    """Per-call GPU time of fns (one callable per input copy, called round-robin).

    One CUDA graph holds `calls` back-to-back calls cycling through the copies (what a
    decode step in a captured model looks like: no launch gaps from the host); each replay
    is timed with CUDA events and divided by `calls`; the median over replays is reported.
    Falls back to eager launches between events when capture fails (noted in .mode).
    """
    fns = list(fns)
    n = len(fns)
    calls = n * max(1, math.ceil(min_calls / n))
    warm_up(fns, rounds=2)

    def round_robin():
        for i in range(calls):
            fns[i % n]()

    graph, mode = capture(round_robin) if use_graph else (None, "eager")
    run = graph.replay if graph is not None else round_robin

    run()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    run()
    b.record()
    torch.cuda.synchronize()
    est_s = max(a.elapsed_time(b) * 1e-3, 1e-6)
    replays = int(min(max_replays, max(min_replays, target_s / est_s)))

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    with torch.cuda.nvtx.range(name):
        for i in range(replays):
            starts[i].record()
            run()
            ends[i].record()
        torch.cuda.synchronize()
    per_call = sorted(s.elapsed_time(e) * 1e3 / calls for s, e in zip(starts, ends))
    del graph
    med = per_call[len(per_call) // 2]
    return Timing(us=med, us_min=per_call[0], us_p90=per_call[int(0.9 * (len(per_call) - 1))],
                  calls_per_replay=calls, replays=replays, mode=mode)


@dataclass
class Ceiling:
    read_gbs: float        # torch.sum over a large bf16 tensor: bytes read / time
    copy_gbs: float        # device-to-device copy: (read + write) bytes / time
    read_bytes: int
    copy_bytes: int

    def md(self) -> str:
        return (f"read ceiling: torch.sum over {self.read_bytes / 2**30:.0f} GiB bf16 = "
                f"{self.read_gbs:.0f} GB/s; copy of {self.copy_bytes / 2**31:.0f} GiB = "
                f"{self.copy_gbs:.0f} GB/s (read + write counted); the ceiling for % is the "
                f"best bandwidth of the run, these or any row's, whichever is higher")


def measure_ceiling(read_gib: float = 4.0, copy_gib: float = 2.0) -> Ceiling:
    """Device memory ceiling measured in this run (not the datasheet number)."""
    n = int(read_gib * 2**30) // 2
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    t_read = time_calls([lambda: x.sum(dtype=torch.float32)], "ceiling/read_sum", min_calls=2,
                        target_s=0.2, min_replays=10, max_replays=40)
    read_bytes = x.numel() * x.element_size()
    del x
    torch.cuda.empty_cache()
    m = int(copy_gib * 2**30) // 2
    src = torch.empty(m, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t_copy = time_calls([lambda: dst.copy_(src)], "ceiling/copy", min_calls=2, target_s=0.2,
                        min_replays=10, max_replays=40)
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst
    torch.cuda.empty_cache()
    return Ceiling(read_gbs=read_bytes / (t_read.us * 1e3), copy_gbs=copy_bytes / (t_copy.us * 1e3),
                   read_bytes=read_bytes, copy_bytes=copy_bytes)


def gpu_info() -> dict:
    dev = torch.cuda.current_device()
    prop = torch.cuda.get_device_properties(dev)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "gpu": prop.name,
        "sms": prop.multi_processor_count,
        "mem_gib": round(prop.total_memory / 2**30, 1),
        "l2_mib": round(l2_bytes() / 2**20, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
    }


def command_line() -> str:
    return shlex.join([os.path.basename(sys.executable)] + sys.argv)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def commit_id() -> str:
    """The commit the numbers belong to: $GIT_COMMIT (the device copy of the tree has no .git;
    bench/gpu_round.sh users set it), else `git rev-parse --short HEAD`, with "+ local changes"
    when the tracked files differ from it; either way with the build sources' digest
    (bench/source_digest.py), which a checkout can recompute."""
    env = os.environ.get("GIT_COMMIT")
    digest = f"source digest {source_digest(REPO)}"
    if env:
        return f"{env} (GIT_COMMIT; working tree of that commit; {digest})"
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + (" + local changes" if dirty else "") + f" ({digest})"


def write_results(kind: str, title: str, body_md: str, results_dir: str = RESULTS_DIR,
                  path: str = "") -> str:
    """bench/results/<kind>_<date>.md with date, GPU, torch version, commit and the exact command.
    path: rewrite this file instead (a bench that writes its table after every row, so a run
    cut short still leaves what it measured)."""
    os.makedirs(results_dir, exist_ok=True)
    now = _dt.datetime.now()
    path = path or os.path.join(results_dir, f"{kind}_{now:%Y-%m-%d_%H%M%S}.md")
    info = gpu_info() if torch.cuda.is_available() else {}
    if info:
        dev = [f"- GPU: {info.get('gpu')} ({info.get('sms')} SMs, {info.get('mem_gib')} GiB, "
               f"L2 used for rotation {info.get('l2_mib')} MiB)",
               f"- torch {info.get('torch')}, CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')}"]
    else:  # a CPU run (no CUDA visible): say so rather than a row of None
        dev = [f"- device: cpu ({platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs visible, {torch.get_num_threads()} torch threads), no CUDA",
               f"- torch {torch.__version__}"]
    head = [f"# {title}", "",
            f"- date: {now:%Y-%m-%d %H:%M:%S}", *dev,
            f"- commit: {commit_id()}",
            f"- command: `{command_line()}` (cwd {os.getcwd()})", ""]
    with open(path, "w") as f:
        f.write("\n".join(head) + "\n" + body_md.rstrip() + "\n")
    return path


def cuda_kernel_totals(run) -> dict:
    """{kernel name: (launches, summed microseconds)} of the CUDA kernels run() launches
    (torch.profiler, CUDA activity; synchronized before and after)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    out = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        c, t = out.get(e.name, (0, 0.0))
        out[e.name] = (c + 1, t + e.time_range.elapsed_us())
    return out


def kernel_profile(run, lo: int = 4, hi: int = 12) -> tuple:
    """GPU kernels per step of ``run(k)`` (k decode steps, after the same fixed work): the
    profiles (torch.profiler, CUDA activity) of run(hi) and run(lo) differ by hi - lo steps, so
    the difference per kernel name / (hi - lo) is one step's count and time, whatever else run
    does (a prefill, a warm-up). Returns (rows [name, per step, us per step] sorted by time,
    kernels per step, kernel us per step)."""

    def stats(k):
        return cuda_kernel_totals(lambda: run(k))

    a, b = stats(lo), stats(hi)
    steps = hi - lo
    rows = []
    for name in set(a) | set(b):
        c = (b.get(name, (0, 0.0))[0] - a.get(name, (0, 0.0))[0]) / steps
        t = (b.get(name, (0, 0.0))[1] - a.get(name, (0, 0.0))[1]) / steps
        if c > 0.01 or t > 0.5:
            rows.append([name[:90].replace("|", "/"), round(c, 2), round(t, 1)])
    rows.sort(key=lambda r: -r[2])
    return rows, sum(r[1] for r in rows), sum(r[2] for r in rows)


def kernel_profile_md(what: str, profile: tuple, layers: int) -> str:
    """A kernel_profile (rows, kernels, us) as a results paragraph: the counts of one step of
    ``what`` and its table (the 40 costliest kernels)."""
    rows, nk, us = profile
    return (f"Kernels of {what}: {nk:.1f} kernels, {us:.0f} us of kernel time per step, "
            f"{nk / layers:.1f} kernels per layer\n\n" + md_table(["kernel", "per step", "us per step"], rows[:40]))
