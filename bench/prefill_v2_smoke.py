"""One-shot GPU smoke test of sparse_prefill v2 (csrc/kernels/sparse_prefill_sm90.cu) on an H200
/ H100: which kernel runs, correctness against the float64 oracle (dms_ext.reference through
tests/bounds.dms_bound, per-element error bound), and v2 vs the mma.sync kernel
(DMS_PREFILL_V2=0, read once per process, so the old kernel is timed in a subprocess; also v2
without TMA for the band key tiles, DMS_PREFILL_V2_TMA=0 (every key gathered with cp.async,
no kept-list / band merge), with 2 K stages instead of 3, DMS_PREFILL_V2_KSTAGES=2, without the
warpgroup ping-pong, DMS_PREFILL_V2_PINGPONG=0, and
without the persistent grid, DMS_PREFILL_V2_PERSISTENT=0; those last three columns are skipped
when the run would pass ~100 s) vs cuDNN
dense causal at Hq 32 / Hkv 8 / D 128 bf16, window 512: 4k / 16k / 32k CR 1 and 32k CR 8.
Runs in about 100 s (optional columns are skipped past that).

  python3 bench/prefill_v2_smoke.py            # both tables
  python3 bench/prefill_v2_smoke.py --no-check # timings only
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)

import dms_ext  # noqa: E402,F401
from dms_ext import reference  # noqa: E402

TIMED = [(4096, 1), (16384, 1), (32768, 1), (32768, 8)]
HQ, HKV, D, W = 32, 8, 128, 512


def flag_prob(n, cr, w):
    if cr <= 1 or n <= w + 1:
        return 0.0
    return float(min(1.0, max(0.0, 1.0 - (n / cr - w - 1) / (n - w - 1))))


def visible_pairs(lg, w, group):
    d = torch.zeros_like(lg, dtype=torch.bool)
    d[:-1] = lg[1:] > 0
    d = d.t()
    hkv, n = d.shape
    t = torch.arange(n, device=d.device, dtype=torch.int64)
    window = torch.clamp(t + 1, max=w + 1).sum() * hkv
    kept = (~d).to(torch.int64).cumsum(1)
    older = kept[:, : max(0, n - w - 1)].sum()
    return int((window + older).item()) * group


def events_ms(fn, reps):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def timing_worker(out_path, with_cudnn):
    """Times the timed shapes with whatever kernel this process dispatches to; writes JSON and
    a sample of output rows (every 97th token) for the v2 / old comparison."""
    dev, dtype = "cuda", torch.bfloat16
    G, scale = HQ // HKV, 1.0 / math.sqrt(D)
    res = {}
    i32 = dict(dtype=torch.int32, device=dev)
    for n, cr in TIMED:
        gen = torch.Generator(device=dev).manual_seed(n)
        q = torch.randn(n, HQ, D, device=dev, dtype=dtype, generator=gen)
        k = torch.randn(n, HKV, D, device=dev, dtype=dtype, generator=gen)
        v = torch.randn(n, HKV, D, device=dev, dtype=dtype, generator=gen)
        p = flag_prob(n, cr, W)
        lg = torch.where(torch.rand(n, HKV, device=dev, generator=gen) < p, 1.0, -1.0).float()
        k_cache = torch.zeros(1, 64, D, device=dev, dtype=dtype)
        st = (k_cache, torch.zeros_like(k_cache), torch.zeros(1, HKV, 1, **i32),
              torch.zeros(1, HKV, **i32), torch.zeros(1, HKV, W + 1, **i32), torch.zeros(1, **i32))
        slots, cu = torch.zeros(1, **i32), torch.tensor([0, n], **i32)
        fn = lambda: torch.ops.dms.sparse_prefill(q, k, v, lg, slots, cu, *st, scale)  # noqa: E731
        reps = 5 if n >= 32768 and cr == 1 else 10
        ms = events_ms(fn, reps)
        out = fn()
        pairs = visible_pairs(lg, W, G)
        r = {"ms": ms, "tflops": 4.0 * D * pairs / (ms * 1e-3) / 1e12,
             "cr_got": n / reference.live_counts(lg.cpu(), W).double().mean().item()}
        if with_cudnn:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            qs = q.view(1, n, HQ, D).transpose(1, 2)
            ke = k.repeat_interleave(G, dim=1).view(1, n, HQ, D).transpose(1, 2)
            ve = v.repeat_interleave(G, dim=1).view(1, n, HQ, D).transpose(1, 2)
            if cr == 1:
                try:
                    def sdpa():
                        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                            return F.scaled_dot_product_attention(qs, ke, ve, is_causal=True, scale=scale)
                    r["cudnn"] = events_ms(sdpa, reps)
                    r["err_cudnn"] = (sdpa().transpose(1, 2).reshape(n, HQ, D).float() - out.float()).abs().max().item()
                except Exception as e:  # noqa: BLE001
                    r["cudnn"] = f"{type(e).__name__}"
            del qs, ke, ve
        torch.save(out[::97].cpu(), f"{out_path}.{n}.{cr}.pt")
        res[f"{n}/{cr}"] = r
        del q, k, v, out
        torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump(res, f)


def which_kernel():
    """Kernel names the op launches for a small call (profiler)."""
    from test_prefill import _small_inputs
    args = _small_inputs(0)
    torch.ops.dms.sparse_prefill(*args)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.ops.dms.sparse_prefill(*args)
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if "kernel" in e.name.lower()}
    return sorted(n[:60] for n in names)


CASES = [
    ("fresh L=1000 G=4 D128", dict(hist=[0], chunks=[1000], hkv=2, group=4, d=128, window=16, rate=0.6)),
    ("hist 700 + 900 G=4 w=100", dict(hist=[700], chunks=[900], hkv=2, group=4, d=128, window=100, rate=0.5)),
    ("G=1 L=257 hist 130", dict(hist=[130], chunks=[257], hkv=2, group=1, d=128, window=24, rate=0.6)),
    ("G=8 L=130 hist 383 bs128", dict(hist=[383], chunks=[130], hkv=2, group=8, d=128, window=64, rate=0.8, block_size=128)),
    ("G=3 unequal batch", dict(hist=[0, 900, 0, 3, 260, 0], chunks=[1, 300, 129, 2, 5, 40], hkv=2, group=3, d=128, window=32, rate=0.7, block_size=32)),
    ("fp16 D64 G=7 batch", dict(hist=[10, 0, 333, 1], chunks=[100, 2, 513, 1], hkv=3, group=7, d=64, window=20, rate=0.4, dtype="fp16")),
    ("bf16 D64 G=5 rate 1.0", dict(hist=[400], chunks=[300], hkv=1, group=5, d=64, window=40, rate=1.0)),
    ("fp16 D128 rate 0.0", dict(hist=[400], chunks=[300], hkv=1, group=4, d=128, window=40, rate=0.0, dtype="fp16")),
    ("long L=4096 w=512 r=.875", dict(hist=[0], chunks=[4096], hkv=2, group=4, d=128, window=512, rate=0.875)),
]


def check_worker(out_path, names):
    """Runs the named correctness cases (all when empty) with this process's kernel choice."""
    from test_prefill import run_case
    dev = os.environ.get("DMS_SMOKE_DEVICE", "cuda")   # "cpu": a dry run of this script's plumbing
    res = {"kernels": which_kernel() if dev == "cuda" else [], "cases": []}
    for idx, (name, kw) in enumerate(CASES):
        if names and name not in names:
            continue
        kw = dict(kw)
        kw["dtype"] = torch.float16 if kw.get("dtype") == "fp16" else torch.bfloat16
        buf = io.StringIO()
        t0 = time.time()
        status = "PASS"
        try:
            with contextlib.redirect_stdout(buf):
                run_case(name, device=dev, check_cpu=False, seed=idx + 1, **kw)
        except AssertionError as e:
            status = "FAIL: " + str(e).splitlines()[0][:90]
        except (Exception, BaseException) as e:  # noqa: BLE001  (pytest's Skipped is a BaseException)
            if isinstance(e, KeyboardInterrupt):
                raise
            status = f"ERROR: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        m = re.search(r"max\|out-ref\| (\S+)\s+max err / bound (\S+)", buf.getvalue())
        err, ratio = (m.group(1), m.group(2)) if m else ("-", "-")
        res["cases"].append([name, err, ratio, status, time.time() - t0])
        with open(out_path, "w") as f:      # partial results survive a hang
            json.dump(res, f)
        if status.startswith("ERROR"):
            break                           # a CUDA error poisons the context
    with open(out_path, "w") as f:
        json.dump(res, f)


def spawn(args, env, timeout):
    e = dict(os.environ, **env)
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, env=e,
                           capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as t:
        return "TIMEOUT", (t.stdout or b"").decode(errors="replace") if isinstance(t.stdout, bytes) else str(t.stdout or "")


def run_checks(tmp, env, names, timeout):
    path = os.path.join(tmp, f"check_{abs(hash(str(env))) % 10**8}.json")
    rc, log = spawn(["--check-worker", path] + (["--cases"] + names if names else []), env, timeout)
    res = {"kernels": [], "cases": []}
    if os.path.exists(path):
        with open(path) as f:
            res = json.load(f)
    res["rc"] = rc
    res["log"] = log[-1500:]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cudnn", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--check-worker", help=argparse.SUPPRESS)
    ap.add_argument("--cases", nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    a = ap.parse_args()
    if a.worker:
        timing_worker(a.worker, a.cudnn)
        return
    if a.check_worker:
        check_worker(a.check_worker, a.cases)
        return
    t0 = time.time()
    print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU", "| DMS_PREFILL_V2 =", os.environ.get("DMS_PREFILL_V2", "(unset: v2 on)"))
    tmp = tempfile.mkdtemp()
    ok = True
    if not a.no_check:
        res = run_checks(tmp, {}, [], 75)
        print("kernels launched by sparse_prefill:", res.get("kernels"))
        if not any("prefill_v2" in k for k in res.get("kernels", [])):
            print("WARNING: the v2 kernel (prefill_v2_kernel) was NOT launched: the cases below "
                  "test the old kernel (DMS_PREFILL_V2=0 set? not an sm_90 device? a build "
                  "without compute_90a?)")
            ok = False
        print("\ncorrectness vs float64 oracle (error bound: tests/bounds.attention_bound)")
        print(f"{'case':32s} {'max|out-ref|':>12s} {'err/bound':>10s}  {'s':>5s}  status")
        for name, err, ratio, status, sec in res["cases"]:
            print(f"{name:32s} {err:>12s} {ratio:>10s}  {sec:5.1f}  {status}")
        bad = [c[0] for c in res["cases"] if c[3] != "PASS"]
        done = len(res["cases"]) == len(CASES)
        if res["rc"] != 0 or not done:
            print(f"check worker rc={res['rc']} after {len(res['cases'])} / {len(CASES)} cases; log tail:\n{res['log']}")
        if bad or not done:
            ok = False
            todo = bad + ([CASES[len(res['cases'])][0]] if not done and len(res["cases"]) < len(CASES) else [])
            todo = todo[:3]
            print(f"\nbisection on {todo} (PASS / FAIL per variant; TIMEOUT = hang):")
            variants = [("old kernel", {"DMS_PREFILL_V2": "0"}),
                        ("v2 no TMA", {"DMS_PREFILL_V2_TMA": "0"}),
                        ("v2 2 K stages", {"DMS_PREFILL_V2_KSTAGES": "2"}),
                        ("v2 one CTA per item", {"DMS_PREFILL_V2_PERSISTENT": "0"}),
                        ("v2 no ping-pong", {"DMS_PREFILL_V2_PINGPONG": "0"}),
                        ("v2 always mask", {"DMS_PREFILL_V2_DEBUG": "1"}),
                        ("v2 serial GEMMs", {"DMS_PREFILL_V2_DEBUG": "2"}),
                        ("v2 all off", {"DMS_PREFILL_V2_DEBUG": "3", "DMS_PREFILL_V2_PINGPONG": "0",
                                        "DMS_PREFILL_V2_PERSISTENT": "0"})]
            for label, env in variants:
                r = run_checks(tmp, env, todo, 40)
                got = {c[0]: f"{c[3][:4]} ({c[2]})" for c in r["cases"]}
                print(f"  {label:22s} rc={r['rc']}: " + ", ".join(f"{n}: {got.get(n, 'not run')}" for n in todo))
    if not a.no_time:
        res = {}
        budget, est = 100.0, 0.0   # total seconds; the last worker's time estimates the next
        for label, env in (("v2", {"DMS_PREFILL_V2": "1"}),
                           ("old", {"DMS_PREFILL_V2": "0"}),
                           ("notma", {"DMS_PREFILL_V2": "1", "DMS_PREFILL_V2_TMA": "0"}),
                           ("k2", {"DMS_PREFILL_V2": "1", "DMS_PREFILL_V2_KSTAGES": "2"}),
                           ("nopp", {"DMS_PREFILL_V2": "1", "DMS_PREFILL_V2_PINGPONG": "0"}),
                           ("npers", {"DMS_PREFILL_V2": "1", "DMS_PREFILL_V2_PERSISTENT": "0"})):
            path = os.path.join(tmp, f"{label}.json")
            left = budget - (time.time() - t0)
            if label in ("k2", "nopp", "npers") and left < est + 5:
                print(f"skipping the {label} column ({time.time() - t0:.0f} s so far, ~{est:.0f} s per column)")
                res[label] = {}
                continue
            tw = time.time()
            rc, log = spawn(["--worker", path] + (["--cudnn"] if label == "v2" else []), env,
                            90 if label in ("v2", "old", "notma") else max(30, min(90, int(left))))
            est = time.time() - tw
            if rc != 0 or not os.path.exists(path):
                print(f"{label} timing worker failed (rc={rc}):\n{log[-2500:]}")
                res[label] = {}
                ok = False
                continue
            with open(path) as f:
                res[label] = json.load(f)
        print("\ntimings (Hq 32, Hkv 8, D 128, bf16, w 512, fresh prompt; ms = median CUDA events)")
        print(f"{'shape':12s} {'CR got':>6s} {'v2 ms':>8s} {'noTMA ms':>8s} {'2Kst ms':>8s} {'noPP ms':>8s} {'1CTA ms':>8s} {'old ms':>8s} {'old/v2':>7s} {'cuDNN ms':>9s} "
              f"{'x cuDNN':>8s} {'v2 TF/s':>8s} {'old TF/s':>8s} {'|v2-old|':>9s} {'|v2-cuDNN|':>10s}")
        for n, cr in TIMED:
            key = f"{n}/{cr}"
            v2, old = res.get("v2", {}).get(key, {}), res.get("old", {}).get(key, {})
            nopp = res.get("nopp", {}).get(key, {})
            notma = res.get("notma", {}).get(key, {})
            k2 = res.get("k2", {}).get(key, {})
            npers = res.get("npers", {}).get(key, {})
            f = lambda x, p=3: f"{x:.{p}f}" if isinstance(x, float) else ("-" if x is None else str(x))  # noqa: E731
            diff = None
            try:
                a2 = torch.load(os.path.join(tmp, f"v2.json.{n}.{cr}.pt"))
                a1 = torch.load(os.path.join(tmp, f"old.json.{n}.{cr}.pt"))
                diff = (a2.float() - a1.float()).abs().max().item()
            except Exception:  # noqa: BLE001
                pass
            sp = old.get("ms") / v2["ms"] if v2.get("ms") and old.get("ms") else None
            dense = res.get("v2", {}).get(f"{n}/1", {}).get("cudnn")   # dense causal: the CR 1 row's
            xc = dense / v2["ms"] if isinstance(dense, float) and v2.get("ms") else None
            print(f"{n // 1024:>3d}k CR{cr:<6g} {f(v2.get('cr_got'), 2):>6s} {f(v2.get('ms')):>8s} {f(notma.get('ms')):>8s} {f(k2.get('ms')):>8s} {f(nopp.get('ms')):>8s} {f(npers.get('ms')):>8s} {f(old.get('ms')):>8s} "
                  f"{f(sp, 2):>7s} {f(dense):>9s} {f(xc, 2):>8s} {f(v2.get('tflops'), 0):>8s} "
                  f"{f(old.get('tflops'), 0):>8s} {f(diff, 4):>9s} {f(v2.get('err_cudnn'), 4):>10s}")
        print("targets: x cuDNN >= 0.85 at 16k/32k CR1, >= 0.7 at 4k CR1; 32k CR8 >= 5x cuDNN(CR1) "
              "and >= 500 TF/s on kept pairs. |v2-old|: max abs diff on every 97th token (bf16). "
              "noTMA: v2 with DMS_PREFILL_V2_TMA=0 (band tiles gathered with cp.async, no kept-list "
              "merge: the kernel before TMA). 2Kst: DMS_PREFILL_V2_KSTAGES=2 (2 K stages as before, not 3). noPP: v2 with DMS_PREFILL_V2_PINGPONG=0 (no warpgroup ping-pong); 1CTA: "
              "DMS_PREFILL_V2_PERSISTENT=0 (one CTA per work item instead of a persistent grid).")
    print(f"\n{'OK' if ok else 'FAILURES'} in {time.time() - t0:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
