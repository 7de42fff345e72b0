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
  loc / main / epi / tot   median cycles of a working CTA's phases, shown in us at the clock
           measured from the same CTAs (cycles / globaltimer ns)
  m_wait   merge kernel: last grid-dependency wait end - attention end
  m_end    merge kernel: last CTA end - attention end
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


def child(name: str) -> None:
    common.require_cuda()
    c = next(c for c in bd.CASES if c.name == name)
    gen = torch.Generator().manual_seed(0)
    gdev = torch.Generator(device="cuda").manual_seed(0)
    pg = bd.Paged(bd.make_lens(c, 8.0, gen), 64, c.D, torch.bfloat16, 1, gen, gdev)
    q = torch.randn(c.B, c.hq, c.D, device="cuda", dtype=torch.bfloat16)
    for _ in range(12):
        torch.ops.dms.sparse_decode(q, pg.k, pg.v, pg.tables[0], pg.lens, c.D ** -0.5)
    torch.cuda.synchronize()


def parse(text: str):
    rec = {"A": [], "I": [], "M": [], "MI": []}
    for line in text.splitlines():
        m = re.match(r"PROBE (A|I|M|MI) (.*)", line)
        if m:
            kv = m.group(2).split()
            rec[m.group(1)].append({kv[i]: int(kv[i + 1]) for i in range(0, len(kv) - 1, 2)})
    return rec


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
         f"epi {us(med('epi')):5.2f}  tot {us(med('tot')):5.2f} (max {us(max(r['tot'] for r in A)):5.2f})  "
         f"keys {int(med('keys'))}  clk {ghz:.2f} GHz")
    if M:
        s += (f"  m_wait {(max(r['tw'] for r in M) - t1) / 1e3:5.2f}  "
              f"m_end {(max(r['t1'] for r in M) - t1) / 1e3:5.2f} ({len(M)} merging)")
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="?", default="B1 x 32k,B1 x 128k,B1 x 32k skewed,B64 x 8k")
    ap.add_argument("--configs", default="0:0,2:0,2:132,3:0,4:0,6:0")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child)
        return
    common.require_cuda()
    for name in a.cases.split(","):
        for cfg in a.configs.split(","):
            st, ms = cfg.split(":")
            env = dict(os.environ, DMS_DECODE_STAGES=st, DMS_DECODE_MAX_SPLITS=ms, DMS_DECODE_PROBE_CALL="10")
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name], env=env,
                               capture_output=True, text=True)
            line = summary(parse(r.stdout)) if r.returncode == 0 else f"failed: {r.stderr.strip()[-300:]}"
            print(f"PROBE {name:16s} stages {st} max_splits {ms:>3s}: {line}", flush=True)


if __name__ == "__main__":
    main()
