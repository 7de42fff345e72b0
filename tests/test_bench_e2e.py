"""bench/bench_e2e.py --smoke: the end-to-end bench's code path on the CPU ops, tiny shapes."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_e2e_smoke_runs_both_paths():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_e2e.py"), "--smoke",
                        "--contexts", "200,400", "--steps", "2"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       # a script's sys.path starts at bench/: the in-place build is at ROOT
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(
                           [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    m = re.findall(r"L(\d+) dense B(\d+) \d+ tok/s, DMS B(\d+) \d+ tok/s", p.stdout)
    assert [x[0] for x in m] == ["200", "400"], p.stdout[-2000:]
    for _, dense_b, dms_b in m:
        # Same KV budget, CR 8: DMS fits several times the batch.
        assert int(dms_b) > 2 * int(dense_b) > 0
    assert "NOT SANE" not in p.stdout and "failed" not in p.stdout


def test_bench_e2e_smoke_fp8_runs_bf16_and_fp8_dms_rows():
    """--kv-dtype fp8: dense, the bf16 DMS row and the fp8 DMS row in one run; at the same KV
    budget the fp8 pools hold about twice the batch."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_e2e.py"), "--smoke",
                        "--contexts", "200", "--steps", "2", "--kv-dtype", "fp8"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(
                           [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    m = re.findall(r"L(\d+) dense B(\d+) \d+ tok/s, DMS B(\d+) \d+ tok/s, x[\d.]+, "
                   r"DMS fp8 B(\d+) \d+ tok/s", p.stdout)
    assert [x[0] for x in m] == ["200"], p.stdout[-2000:]
    _, dense_b, bf16_b, fp8_b = (int(x) for x in m[0])
    assert int(bf16_b) > 2 * dense_b > 0
    assert 1.8 * bf16_b <= fp8_b <= 2.2 * bf16_b, (bf16_b, fp8_b)
    assert "| 200 | DMS CR 8 fp8 |" in p.stdout and "| 200 | DMS CR 8 |" in p.stdout
    assert "NOT SANE" not in p.stdout and "failed" not in p.stdout and "FAILED" not in p.stdout
