"""What DMS_VALIDATE costs (issue 17, docs/errors.md section 4): sparse_decode at B 64 x 8k
(Hq 32, Hkv 8, D 128, bf16, block 64, per-head DMS lengths at CR 8, bench_decode's "B64 x 8k"
row), with the mode off and on.

The validated call cannot be captured in a graph (it syncs to read the check's verdict), so
every row is timed eagerly: wall-clock per call with a sync after each (median over --calls), the
way an engine debugging with DMS_VALIDATE=1 runs it. The difference of the two rows is the cost
(the check's two kernels + the copy-back + the sync); for scale the graph-replay time of the op
alone (bench/common.time_calls) is shown too. GPU only; writes bench/results/validate_<date>.md.

  python3 bench/bench_validate.py                 # B 64 x 8k
  python3 bench/bench_validate.py --rows "B1 x 32k,B64 x 8k"
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode  # noqa: E402
import common  # noqa: E402


def eager_us(fn, calls: int) -> float:
    """Median wall-clock microseconds of fn() + a device sync."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--rows", default="B64 x 8k",
                    help="comma-separated bench_decode row names (default: B64 x 8k)")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--cr", type=float, default=8.0)
    ap.add_argument("--calls", type=int, default=200, help="eager calls per measurement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results-dir", default=common.RESULTS_DIR)
    a = ap.parse_args()
    common.require_cuda("bench_validate.py")
    import dms_ext  # noqa: F401  (registers torch.ops.dms)
    from dms_ext import ops

    names = [n.strip() for n in a.rows.split(",") if n.strip()]
    by_name = {c.name: c for c in bench_decode.CASES}
    missing = [n for n in names if n not in by_name]
    if missing:
        sys.exit(f"--rows: no row named {missing}; rows: {', '.join(by_name)}")
    before = ops.validate_mode()
    rows = []
    try:
        for name in names:
            c = by_name[name]
            gen_cpu = torch.Generator().manual_seed(a.seed)
            gen_dev = torch.Generator(device="cuda").manual_seed(a.seed)
            P = bench_decode.Paged(bench_decode.make_lens(c, a.cr, gen_cpu), a.block_size, c.D,
                                   torch.bfloat16, 1, gen_cpu, gen_dev, device="cuda")
            q = torch.randn(c.B, c.hq, c.D, device="cuda", dtype=torch.bfloat16, generator=gen_dev)
            call = lambda: torch.ops.dms.sparse_decode(q, P.k, P.v, P.tables[0], P.lens, c.D ** -0.5)
            ops.validate_mode(False)
            graph = common.time_calls([call], f"sparse_decode {name}")
            off = eager_us(call, a.calls)
            ops.validate_mode(True)
            out_on = call()
            on = eager_us(call, a.calls)
            ops.validate_mode(False)
            assert torch.equal(out_on, call()), "the validated call changed the output"
            items = c.B * c.hkv * (P.maxb + 1)
            rows.append([name, f"{P.live_tokens / 1e6:.2f}M", items, f"{graph.us:.1f}",
                         f"{off:.1f}", f"{on:.1f}", f"{on - off:+.1f}"])
            print(f"{name}: graph {graph.us:.1f} us, eager+sync off {off:.1f} us, "
                  f"on {on:.1f} us ({on - off:+.1f} us)", flush=True)
    finally:
        ops.validate_mode(before)
    table = common.md_table(["row", "live tokens", "checked items", "graph replay (us)",
                             "eager+sync, off (us)", "eager+sync, DMS_VALIDATE (us)", "cost (us)"],
                            rows)
    body = (f"{table}\n\nEager rows: median wall-clock of {a.calls} calls, each followed by "
            f"torch.cuda.synchronize(); checked items: the page-table items of the check "
            f"(B * Hkv * (max_blocks_per_head + 1)).\n")
    path = common.write_results("validate", "DMS_VALIDATE cost on sparse_decode", body,
                                a.results_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
