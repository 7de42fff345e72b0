"""Our sparse_decode only, on one bench_decode row, a few calls: for ncu / nsys per-kernel times.

  ncu --clock-control none -k regex:sparse_decode python3 bench/ncu_decode_case.py "B1 x 32k"
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode as bd  # noqa: E402

import dms_ext  # noqa: E402,F401


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "B64 x 8k"
    calls = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    c = next(c for c in bd.CASES if c.name == name)
    gen = torch.Generator().manual_seed(0)
    gdev = torch.Generator(device="cuda").manual_seed(0)
    pg = bd.Paged(bd.make_lens(c, 8.0, gen), 64, c.D, torch.bfloat16, 1, gen, gdev)
    q = torch.randn(c.B, c.hq, c.D, device="cuda", dtype=torch.bfloat16, generator=gdev)
    for i in range(calls):
        with torch.cuda.nvtx.range(f"sparse_decode {name} call {i}"):
            torch.ops.dms.sparse_decode(q, pg.k, pg.v, pg.tables[0], pg.lens, c.D ** -0.5)
    torch.cuda.synchronize()
    print(f"{calls} calls of sparse_decode at {name}")


if __name__ == "__main__":
    main()
