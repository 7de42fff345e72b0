"""bench/bench_e2e.py --smoke: the end-to-end bench's code path on the CPU ops, tiny shapes."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

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


def _row_notes(stdout: str, L: int, path: str, dist: str) -> dict:
    """The table row of (context, path, dist): its batch, achieved CR and live-length stats."""
    m = re.search(rf"^\| {L} \| {re.escape(path)} \| {dist} \| (\d+) \|.*achieved CR ([\d.]+), live "
                  rf"lengths (\d+)\.\.(\d+) \(([\d.]+)% of heads at L\)", stdout, re.M)
    assert m, (L, path, dist, stdout[-3000:])
    b, cr, lo, hi, full = m.groups()
    return dict(B=int(b), cr=float(cr), lo=int(lo), hi=int(hi), full=float(full))


def test_bench_e2e_smoke_all_dists_bf16_and_fp8():
    """--dists uniform,skewed,heavy --kv-dtype fp8: one DMS row per (dist, pool dtype), each
    labelled with its dist, the lengths following the rule (floored at window + 1 = 33)."""
    L = 400
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_e2e.py"), "--smoke",
                        "--contexts", str(L), "--steps", "2", "--kv-dtype", "fp8",
                        "--dists", "uniform,skewed,heavy"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(
                           [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "NOT SANE" not in p.stdout and "failed" not in p.stdout and "FAILED" not in p.stdout
    dense_b = int(re.search(rf"^\| {L} \| dense \([A-Z_]+\) \| - \| (\d+) \|", p.stdout, re.M).group(1))
    names = {"uniform": "DMS CR 8", "skewed": "DMS skewed", "heavy": "DMS heavy"}
    rows = {(d, kv): _row_notes(p.stdout, L, names[d] + kv, d) for d in names for kv in ("", " fp8")}
    for (d, kv), r in rows.items():
        assert 33 <= r["lo"] <= r["hi"] <= L, (d, kv, r)
    for kv in ("", " fp8"):
        u, sk, hv = rows["uniform", kv], rows["skewed", kv], rows["heavy", kv]
        # uniform: [0.5, 1.5] x L/8 = 25..75, floored at 33; CR about 8 (a bit less: the floor)
        assert u["hi"] <= 75 and u["full"] == 0 and 6.5 <= u["cr"] <= 8.5, u
        # skewed: exactly a quarter of the heads at L, the rest the window (+ 1):
        # CR = L / (L/4 + 3/4 * 33) = 3.21
        assert sk["full"] == 25.0 and sk["lo"] == 33 and sk["hi"] == L, sk
        assert abs(sk["cr"] - L / (L / 4 + 0.75 * 33)) < 0.05, sk
        # heavy: per-head CR log-uniform in [1, 64] -> n in [L/64, L] (floored at 33); about CR 4
        assert 2.8 <= hv["cr"] <= 5.5 and hv["hi"] > L // 2, hv
        # the same budget holds fewer sequences with the longer distributions
        assert sk["B"] < u["B"] and hv["B"] < u["B"] and min(sk["B"], hv["B"]) > dense_b > 0
    for d in names:
        assert 1.6 * rows[d, ""]["B"] <= rows[d, " fp8"]["B"] <= 2.4 * rows[d, ""]["B"], d
    summ = [x for x in p.stdout.splitlines() if x.startswith("SUMMARY:")][-1]
    for label in ("DMS", "DMS fp8", "DMS skewed", "DMS skewed fp8", "DMS heavy", "DMS heavy fp8"):
        assert re.search(rf"[,:] {label} B\d+ \d+ tok/s", summ), (label, summ)


def test_bench_e2e_dist_lens_follow_make_lens_rules_on_the_synthetic_state():
    """dms_lens / dms_fit / DMSState (CPU tensors only): each distribution's rule, the window
    floor, and ring flags at each head's own eviction rate."""
    import math

    import torch
    bench = os.path.join(ROOT, "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import bench_e2e as be

    s = be.Shape(layers=4, hidden=64, hq=8, hkv=4, d=16, inter=64, vocab=100)
    L, cr, window = 4096, 8.0, 32
    R = window + 1
    gen = torch.Generator().manual_seed(0)
    n = {d: be.dms_lens(s, 256, L, cr, window, gen, d) for d in be.DISTS}
    for d, x in n.items():
        assert x.shape == (s.layers, 256, s.hkv) and x.dtype == torch.int64, d
        assert int(x.min()) >= R and int(x.max()) <= L, d
    u = n["uniform"].double()
    assert int(u.min()) >= round(0.5 * L / cr) and int(u.max()) <= round(1.5 * L / cr)
    assert abs(u.mean() / (L / cr) - 1) < 0.02
    sk = n["skewed"]
    assert int((sk == L).sum()) == sk.numel() // 4 and bool(((sk == L) | (sk == R)).all())
    hv = n["heavy"].double()
    log_cr = torch.log(L / hv)
    assert float(log_cr.min()) >= -1e-9 and float(log_cr.max()) <= math.log(64) + 0.02
    for q in (0.25, 0.5, 0.75):  # log-uniform: the q-quantile of log CR is q * ln 64
        assert abs(float(log_cr.quantile(q)) - q * math.log(64)) < 0.15, q
    assert abs(float((L / hv.mean()) - 64 * math.log(64) / 63)) < 0.3   # CR of the mean: 4.22
    # Window floor: a skewed head keeps window + 1 (the ring), not make_lens's own 512.
    assert be.dms_lens(s, 4, 256, cr, 32, gen, "skewed").unique().tolist() == [33, 256]
    with pytest.raises(ValueError):
        be.dms_lens(s, 4, L, cr, window, gen, "zipf")

    # dms_fit at a budget: exactly the rule over the fitted batch, every layer's pool sized for
    # the layer that needs most; fewer sequences under skewed / heavy than uniform.
    bs, grow, esize, budget = 16, 8, 2, 64 * 2**20
    fit = {d: be.dms_fit(s, L, cr, window, bs, grow, budget, esize, gen, 0, d) for d in be.DISTS}
    for d, (B, lens, blocks) in fit.items():
        assert lens.shape == (s.layers, B, s.hkv), d
        need = int(((lens + grow + bs - 1) // bs).sum((1, 2)).max())
        assert blocks == need and s.layers * blocks * 2 * bs * s.d * esize <= budget, d
    assert fit["skewed"][0] < fit["uniform"][0] and fit["heavy"][0] < fit["uniform"][0]
    B, lens, blocks = fit["skewed"]
    assert int((lens == L).sum()) == lens.numel() // 4

    # The synthetic state: seq_lens are the drawn lengths; a full-context head's window tokens
    # are all kept (flag 0), a window-only head's all evicted (flag 1) but the undecided newest.
    st = be.DMSState(s, lens, L, window, bs, grow, blocks, torch.float32, torch.device("cpu"), gen,
                     1.0 - ((lens - R).double() / (L - R)).clamp(0, 1))
    for li, Ly in enumerate(st.layers):
        assert torch.equal(Ly["seq_lens"].long(), lens[li])
        ring = Ly["ring"].long()
        order = (torch.arange(L - R, L) % R)                       # oldest .. newest slot
        flags = (ring[..., order] & 1)
        assert torch.equal((ring[..., order] >> 1), lens[li][..., None] - R + torch.arange(R))
        full, win = lens[li] == L, lens[li] == R
        assert int(flags[full].sum()) == 0
        assert bool((flags[win][:, :-1] == 1).all()) and int(flags[win][:, -1].sum()) == 0
        assert int(Ly["free_top"]) == blocks - int(((lens[li] + bs - 1) // bs).sum())
