"""Sweep sparse_decode's scheduler knobs on the bench_decode shapes (the "... fp8" rows too), our op
only; prints one line per (case, knobs). For choosing defaults. DMS_DECODE_MAX_SPLITS caps the
persistent grid (0: the resident CTAs of the device), DMS_DECODE_MIN_CHUNK is the fewest keys a
CTA's range holds (0: 256), DMS_DECODE_STAGES forces the pipeline's stages at D 128 (0: the
library's rule; only in a build with -DDMS_DECODE_STAGES_KNOB or -DDMS_DECODE_PROBE, e.g.
DMS_NVCC_EXTRA="-DDMS_DECODE_STAGES_KNOB" python3 setup.py build_ext --inplace; see
csrc/kernels/decode_probe.cuh for the values). The op reads the knobs once per process, so each
knob setting runs in its own child process.

  python3 bench/sweep_decode.py ["B1 x 32k,B64 x 8k skewed"]
  SWEEP_KNOBS="0:0,132:0,264:1024" python3 bench/sweep_decode.py   # other (max_splits:min_chunk)
  SWEEP_STAGES="0,3,5,6" SWEEP_KNOBS="0:0" python3 bench/sweep_decode.py "B64 x 8k fp8,B16 x 16k fp8"
"""
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode as bd  # noqa: E402
import common  # noqa: E402

import dms_ext  # noqa: E402,F401


PAIRS = [(0, 0), (0, 64), (0, 128), (0, 512), (132, 0), (132, 128)]
if os.environ.get("SWEEP_KNOBS"):  # "max_splits:min_chunk,..." e.g. "0:0,132:0,264:1024"
    PAIRS = [tuple(int(x) for x in k.split(":")) for k in os.environ["SWEEP_KNOBS"].split(",")]
STAGES = [int(x) for x in os.environ.get("SWEEP_STAGES", "0").split(",")]
KNOBS = [(st, ms, mc) for st in STAGES for ms, mc in PAIRS]
DEFAULT_CASES = "B1 x 32k,B64 x 8k,B128 x 4k,B16 x 16k"


def run_cases(names, st, ms, mc):
    """Times every named case under the knobs this process was started with."""
    common.require_cuda()
    gen = torch.Generator().manual_seed(0)
    gdev = torch.Generator(device="cuda").manual_seed(0)
    for c in bd.CASES:
        if c.name not in names:
            continue
        lens = bd.make_lens(c, 8.0, gen)
        fp8 = c.kv == "fp8"
        live = bd.live_bytes(int(lens.long().sum()), c.D, 1 if fp8 else 2)
        copies = common.copies_to_beat_l2(live)
        pg = bd.Paged(lens, 64, c.D, torch.bfloat16, copies, gen, gdev)
        scales = ()
        if fp8:  # as bench_decode's fp8 rows
            pg.k = (pg.k.float() / bd.FP8_SCALE).clamp(-448, 448).to(torch.float8_e4m3fn)
            pg.v = (pg.v.float() / bd.FP8_SCALE).clamp(-448, 448).to(torch.float8_e4m3fn)
            scales = (bd.FP8_SCALE, bd.FP8_SCALE)
        qs = [torch.randn(c.B, c.hq, c.D, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        fns = [lambda i=i: torch.ops.dms.sparse_decode(qs[i], pg.k, pg.v, pg.tables[i], pg.lens, 0.088, *scales)
               for i in range(copies)]
        t = common.time_calls(fns, f"sweep {c.name} {ms} {mc}", target_s=0.1)
        print(f"SWEEP {c.name:14s} stages {st} max_splits {ms:3d} min_chunk {mc:4d}: {t.us:8.1f} us "
              f"{live / t.us / 1e3:7.0f} GB/s", flush=True)


def main():
    names = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CASES
    if os.environ.get("DMS_SWEEP_CHILD") == "1":
        run_cases(names.split(","), *(int(x) for x in sys.argv[2:5]))
        return
    common.require_cuda()
    for st, ms, mc in KNOBS:
        env = dict(os.environ, DMS_SWEEP_CHILD="1", DMS_DECODE_STAGES=str(st),
                   DMS_DECODE_MAX_SPLITS=str(ms), DMS_DECODE_MIN_CHUNK=str(mc))
        subprocess.run([sys.executable, os.path.abspath(__file__), names, str(st), str(ms), str(mc)],
                       env=env, check=True)


if __name__ == "__main__":
    main()
