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
