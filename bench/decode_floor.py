"""The fixed cost of one sparse_decode call: the same graph-replay timing as bench_decode.py on
caches with (almost) nothing to read, beside the cost of back-to-back trivial kernels in a graph.

What it answers: how much of a call's time does not depend on the bytes it reads. A row's best
possible time is then about floor + live bytes / read ceiling, which bounds the "% of ceiling"
any two-kernel design can show on that row.

    python3 bench/decode_floor.py            # CUDA only; writes bench/results/decode_floor_*.md
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import dms_ext  # noqa: E402,F401  (registers torch.ops.dms)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128])
    ap.add_argument("--lens", type=int, nargs="+", default=[0, 16, 64])
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=64)
    a = ap.parse_args()
    common.require_cuda()
    t0 = time.time()
    dev, dt, D = "cuda", torch.bfloat16, a.dim
    rows = []
    # The launch floor: n back-to-back one-element kernels in a graph, per kernel.
    x = torch.zeros(1, device=dev)
    t1 = common.time_calls([lambda: x.add_(1.0)], "one kernel", min_calls=16)
    t2 = common.time_calls([lambda: (x.add_(1.0), x.mul_(1.0))], "two kernels", min_calls=16)
    floor_md = (f"- one trivial kernel per call (x.add_ on 1 element, graph of {t1.calls_per_replay}): "
                f"{t1.us:.2f} us per call\n- two trivial kernels per call: {t2.us:.2f} us per call\n")
    for B in a.batches:
        for L in a.lens:
            nb = max(1, (L + a.block_size - 1) // a.block_size)
            num_blocks = B * a.hkv * nb
            k = torch.randn(num_blocks, a.block_size, D, device=dev, dtype=dt)
            v = torch.randn_like(k)
            table = torch.randperm(num_blocks, device=dev).to(torch.int32).view(B, a.hkv, nb)
            lens = torch.full((B, a.hkv), L, device=dev, dtype=torch.int32)
            q = torch.randn(B, a.hq, D, device=dev, dtype=dt)
            t = common.time_calls([lambda: torch.ops.dms.sparse_decode(q, k, v, table, lens, D ** -0.5)],
                                  f"B{B} L{L}")
            rows.append([B, L, B * a.hkv * L, f"{t.us:.2f}", f"{t.us_min:.2f}", f"{t.us_p90:.2f}", t.mode])
            print(f"B{B} L{L}: {t.us:.2f} us", flush=True)
    body = ("Graph replays as in bench_decode.py (median per call), Hq %d / Hkv %d / D %d bf16, pages of %d, "
            "every head of every sequence at the same length L (L 0: nothing to read).\n\n%s\n"
            % (a.hq, a.hkv, D, a.block_size, floor_md)
            + common.md_table(["B", "L", "keys", "ours us", "min us", "p90 us", "mode"], rows)
            + f"\n\nwall time {time.time() - t0:.0f} s\n")
    path = common.write_results("decode_floor", "sparse_decode fixed cost per call", body)
    print(body)
    print("wrote", path)


if __name__ == "__main__":
    main()
