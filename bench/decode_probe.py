"""Timeline of one sparse_decode call per configuration, from a probe build (tuning only).

Build first with the probe compiled in (it is never in the normal build):
  DMS_NVCC_EXTRA="-DDMS_DECODE_PROBE" DMS_CUDA_ARCH=90a python3 setup.py build_ext --inplace
then
  python3 bench/decode_probe.py ["B1 x 32k,B1 x 128k"] [--configs "0:0,2:132,6:0"]

A config is STAGES:MAX_SPLITS (DMS_DECODE_STAGES, 0 = the library's rule; DMS_DECODE_MAX_SPLITS,
0 = the resident grid). Each (case, config) runs in its own process: 12 eager calls, the 10th
prints its timeline (csrc/kernels/decode_probe.cuh). One line per (case, config):
  span     first CTA start to last CTA end of the attention kernel (us, globaltimer)
  skew     last CTA start - first CTA start
  work     CTAs with work / grid
  loc / main / epi / tot   median cycles of a working CTA's phases (epi: the warp merge, then
           the output / partial stores), shown in us at the clock
           measured from the same CTAs (cycles / globaltimer ns)
  m_wait   merge kernel: last grid-dependency wait end - attention end
  m_end    merge kernel: last CTA end - attention end
--graph: three back-to-back calls captured in one CUDA graph, the second replay printed
(launches 9-11, DMS_DECODE_PROBE_N=3): per call the attention span, the merge kernel's end after
it (merge_end +), the gap to the next call's first attention CTA, and the period (attention
start to the next attention start, which the bench's per-call time should match). Without
--graph the merge numbers of one eager call include the host's launch gap.
Rebuild without DMS_NVCC_EXTRA afterwards (the probe adds registers and printf)."""
import argparse
import os
import re
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode as bd  # noqa: E402
import common  # noqa: E402

import dms_ext  # noqa: E402,F401


def child(name: str, graph: bool) -> None:
    common.require_cuda()
    c = next(c for c in bd.CASES if c.name == name)
    gen = torch.Generator().manual_seed(0)
    gdev = torch.Generator(device="cuda").manual_seed(0)
    pg = bd.Paged(bd.make_lens(c, 8.0, gen), 64, c.D, torch.bfloat16, 1, gen, gdev)
    q = torch.randn(c.B, c.hq, c.D, device="cuda", dtype=torch.bfloat16)
    call = lambda: torch.ops.dms.sparse_decode(q, pg.k, pg.v, pg.tables[0], pg.lens, c.D ** -0.5)  # noqa: E731
    if not graph:
        for _ in range(12):
            call()
        torch.cuda.synchronize()
        return
    # Launches 1-8 eager; 9-11 captured back to back in one graph (the parent sets
    # DMS_DECODE_PROBE_CALL=9, DMS_DECODE_PROBE_N=3), replayed twice: the lines after the last
    # separator are the second replay's, with no host gap between the calls.
    for _ in range(8):
        call()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(3):
            call()
    for _ in range(2):
        torch.cuda.synchronize()
        print("PROBE_SEP", flush=True)
        g.replay()
    torch.cuda.synchronize()


def parse(text: str):
    """{call: {"A": [...], "I": [...], "M": [...], "MI": [...]}} from the PROBE lines after the
    last PROBE_SEP (all of them when there is none)."""
    lines = text.splitlines()
    if "PROBE_SEP" in lines:
        lines = lines[len(lines) - lines[::-1].index("PROBE_SEP"):]
    calls = {}
    for line in lines:
        m = re.match(r"PROBE (A|I|M|MI) (.*)", line)
        if m:
            kv = m.group(2).split()
            d = {kv[i]: int(kv[i + 1]) for i in range(0, len(kv) - 1, 2)}
            calls.setdefault(d.get("call", 1), {"A": [], "I": [], "M": [], "MI": []})[m.group(1)].append(d)
    return calls


def span(rec):
    allc = rec["A"] + rec["I"]
    return min(r["t0"] for r in allc), max(r["t1"] for r in allc)


def merge_end(rec):
    ends = [r["t1"] for r in rec["M"] + rec["MI"]]
    return max(ends) if ends else None


def graph_summary(calls) -> str:
    """Back-to-back calls of one graph replay: per call the attention kernel's span, how long
    after its end the merge kernel's last CTA finished, and the gap from that to the next call's
    first attention CTA; `period` = attention start to the next attention start."""
    ks = sorted(k for k in calls if calls[k]["A"])
    out = []
    for i, k in enumerate(ks):
        a0, a1 = span(calls[k])
        me = merge_end(calls[k])
        s = f"call {k}: attn {(a1 - a0) / 1e3:5.2f}"
        if me is not None:
            s += f" merge_end +{(me - a1) / 1e3:5.2f}"
        if i + 1 < len(ks):
            n0, _ = span(calls[ks[i + 1]])
            if me is not None:
                s += f" gap {(n0 - me) / 1e3:5.2f}"
            s += f" period {(n0 - a0) / 1e3:5.2f}"
        out.append(s)
    return " | ".join(out)


def summary(rec) -> str:
    A, idle, M = rec["A"], rec["I"], rec["M"]
    if not A:
        return "no PROBE lines (is this a probe build?)"
    allc = A + idle
    t0, t1 = min(r["t0"] for r in allc), max(r["t1"] for r in allc)
    ghz = statistics.median(r["tot"] / max(1, r["t1"] - r["t0"]) for r in A)  # cycles per ns
    us = lambda cyc: cyc / ghz / 1e3
    med = lambda k: statistics.median(r[k] for r in A)
    s = (f"span {(t1 - t0) / 1e3:6.2f} us  skew {(max(r['t0'] for r in allc) - t0) / 1e3:5.2f}  "
         f"work {len(A)}/{len(allc)}  loc {us(med('loc')):5.2f}  main {us(med('main')):5.2f}  "
         f"epi {us(med('epi')):5.2f} (warp merge {us(med('mw')):5.2f})  tot {us(med('tot')):5.2f} (max {us(max(r['tot'] for r in A)):5.2f})  "
         f"keys {int(med('keys'))}  clk {ghz:.2f} GHz")
    if M:
        s += (f"  m_wait {(max(r['tw'] for r in M) - t1) / 1e3:5.2f}  "
              f"m_end {(max(r['t1'] for r in M) - t1) / 1e3:5.2f} ({len(M)} merging)")
    return s


def dump(rec) -> str:
    """Every working CTA of one call, slowest first, and the median total per segment count."""
    A = rec["A"]
    if not A:
        return ""
    t0 = min(r["t0"] for r in A + rec["I"])
    ghz = statistics.median(r["tot"] / max(1, r["t1"] - r["t0"]) for r in A)
    rows = sorted(A, key=lambda r: -(r["t1"] - t0))
    out = [f"  c {r['c']:4d} sm {r['sm']:3d} seg {r['seg']} keys {r['keys']:6d} start {(r['t0'] - t0) / 1e3:6.2f} "
           f"end {(r['t1'] - t0) / 1e3:6.2f} tot {r['tot'] / ghz / 1e3:6.2f} loc {r['loc'] / ghz / 1e3:5.2f} "
           f"main {r['main'] / ghz / 1e3:6.2f} epi {r['epi'] / ghz / 1e3:5.2f}" for r in rows]
    by = {}
    for r in A:
        by.setdefault(r["seg"], []).append(r["t1"] - t0)
    out.append("  end by segments: " + ", ".join(f"{k} seg: n {len(v)} median {statistics.median(v) / 1e3:.2f} max {max(v) / 1e3:.2f}"
                                                  for k, v in sorted(by.items())))
    return "\n".join(out[:16] + out[-1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="?", default="B1 x 32k,B1 x 128k,B1 x 32k skewed,B64 x 8k")
    ap.add_argument("--configs", default="0:0,2:0,2:132,3:0,4:0,6:0")
    ap.add_argument("--graph", action="store_true",
                    help="time 3 back-to-back calls inside one CUDA graph replay (launch gaps and "
                         "the merge kernel's tail become meaningful) instead of one eager call")
    ap.add_argument("--dump", action="store_true",
                    help="also print every working CTA of the (first) call: c, segments, keys, start and end "
                         "after the first CTA's start (us), total (us), slowest first")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.graph)
        return
    common.require_cuda()
    for name in a.cases.split(","):
        for cfg in a.configs.split(","):
            st, ms = cfg.split(":")
            env = dict(os.environ, DMS_DECODE_STAGES=st, DMS_DECODE_MAX_SPLITS=ms,
                       DMS_DECODE_PROBE_CALL="9" if a.graph else "10",
                       DMS_DECODE_PROBE_N="3" if a.graph else "1")
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name]
                               + (["--graph"] if a.graph else []), env=env, capture_output=True, text=True)
            if r.returncode != 0:
                line = f"failed: {r.stderr.strip()[-300:]}"
            else:
                calls = parse(r.stdout)
                if not calls:
                    line = "no PROBE lines (is this a probe build?)"
                elif a.graph:
                    line = summary(calls[min(calls)]) + "  ||  " + graph_summary(calls)
                else:
                    line = summary(calls[min(calls)])
            print(f"PROBE {name:16s} stages {st} max_splits {ms:>3s}: {line}", flush=True)
            if a.dump and r.returncode == 0 and calls:
                print(dump(calls[min(calls)]), flush=True)


if __name__ == "__main__":
    main()
