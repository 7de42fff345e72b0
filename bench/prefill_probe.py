"""Timeline probe of sparse_prefill v2's consumer warpgroups, for tuning on a GPU.

Needs a probe build (never the library's normal one):
    DMS_NVCC_EXTRA="-DDMS_PREFILL_PROBE" python3 setup.py build_ext --inplace
With DMS_PREFILL_V2_DEBUG=16 every v2 launch then prints one PPROBE line per (CTA, consumer
warpgroup) after it ends: the clock64 cycles lane 0 of the warpgroup's first warp spent per phase of
its work items (q: waiting for the item's Q; first: tile 0, its S and softmax with no GEMM to
overlap; loop: the steady tiles, of which wait: the K / V mbarrier waits; last: the last P V;
epi: the epilogue's stores), its tiles and items, and the globaltimer span; and one PPROD line per CTA, the producer's thread 0:
cycles working items out (make), waiting for the consumers' release of Q (qe), issuing Q (q), and
waiting for free K / V stages (ke, ve). This script runs
bench_prefill.py's fresh-prompt rows under that setting, keeps the last launch of each row and
prints, per row, the kernel span and the phases per work item and per steady tile (microseconds
at the clock the probe measured: cycles / ns of the same warpgroups).

    python3 bench/prefill_probe.py [--lens 32768] [--crs 8 1]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"PPROBE cta (\d+) wg (\d+) ns (\d+) cyc (\d+) tiles (\d+) q (\d+) first (\d+) loop (\d+) "
                  r"wait (\d+) last (\d+) epi (\d+) items (\d+)")
FIELDS = ("cta", "wg", "ns", "cyc", "tiles", "q", "first", "loop", "wait", "last", "epi", "items")
PROD = re.compile(r"PPROD cta (\d+) cyc (\d+) make (\d+) qe (\d+) q (\d+) ke (\d+) ve (\d+)")
PROD_FIELDS = ("cta", "cyc", "make", "qe", "q", "ke", "ve")


def _last_records(pattern, fields, text: str) -> list:
    """The records `pattern` matches in text (dicts of fields), of the last launch only: a launch
    starts at its record of CTA 0 (PPROBE: warpgroup 0)."""
    launches = []
    for m in pattern.finditer(text):
        r = dict(zip(fields, (int(x) for x in m.groups())))
        if r["cta"] == 0 and r.get("wg", 0) == 0:
            launches.append([])
        if launches:
            launches[-1].append(r)
    return launches[-1] if launches else []


def last_launch(text: str) -> list:
    """The PPROBE records (one per consumer warpgroup) of the last launch in text."""
    return _last_records(LINE, FIELDS, text)


def last_producers(text: str) -> list:
    """The PPROD records (one per CTA, the producer's thread 0) of the last launch in text."""
    return _last_records(PROD, PROD_FIELDS, text)


def summarize_producers(prods: list, recs: list, ghz: float) -> dict:
    """Per work item (the CTA's items: its first consumer warpgroup's) and per key tile, in us."""
    items = {r["cta"]: r["items"] for r in recs if r["wg"] == 0}
    tiles = {r["cta"]: r["tiles"] for r in recs if r["wg"] == 0}
    n_items = sum(items.get(p["cta"], 0) for p in prods)
    n_tiles = sum(tiles.get(p["cta"], 0) for p in prods)
    us = lambda k: sum(p[k] for p in prods) / ghz / 1e3  # noqa: E731
    return {"make_per_item": us("make") / max(1, n_items), "qe_per_item": us("qe") / max(1, n_items),
            "q_per_item": us("q") / max(1, n_items), "ke_per_tile": us("ke") / max(1, n_tiles),
            "ve_per_tile": us("ve") / max(1, n_tiles)}


def summarize(recs: list) -> dict:
    """Per-row figures from one launch's records (warpgroups with at least one item)."""
    recs = [r for r in recs if r["items"] > 0]
    ghz = sum(r["cyc"] for r in recs) / max(1, sum(r["ns"] for r in recs))
    us = lambda cyc: cyc / ghz / 1e3  # noqa: E731
    items = sum(r["items"] for r in recs)
    tiles = sum(r["tiles"] for r in recs)
    steady = max(1, tiles - items)  # the loop runs tiles 1 .. n - 1 of each item
    tot = {k: sum(r[k] for r in recs) for k in ("q", "first", "loop", "wait", "last", "epi", "cyc")}
    per_item = {k: us(tot[k]) / max(1, items) for k in ("q", "first", "last", "epi")}
    return {"wgs": len(recs), "ghz": ghz, "span_us": max(r["ns"] for r in recs) / 1e3,
            "items_per_wg": items / max(1, len(recs)), "tiles_per_item": tiles / max(1, items),
            "loop_per_tile": us(tot["loop"]) / steady, "wait_per_tile": us(tot["wait"]) / steady,
            "item_overhead": sum(per_item.values()), **{f"{k}_per_item": v for k, v in per_item.items()},
            "busy_share": (tot["q"] + tot["first"] + tot["loop"] + tot["last"] + tot["epi"]) / max(1, tot["cyc"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", type=int, nargs="+", default=[32768])
    ap.add_argument("--crs", type=float, nargs="+", default=[8, 1])
    a = ap.parse_args()
    env = dict(os.environ, DMS_PREFILL_V2_DEBUG="16")
    print("| N | CR | span us | GHz | items / wg | tiles / item | steady tile us | of it K/V wait us "
          "| per item: q / first / last / epi us | item overhead in steady tiles "
          "| producer per item: make / Q-release wait / Q issue us | producer per tile: K / V stage wait us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in a.lens:
        for cr in a.crs:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_prefill.py"), "--lens", str(n), "--crs",
                       f"{cr:g}", "--no-flex", "--fp8-lens", "--extra", "--target-s", "0.01", "--results-dir", tmp]
                out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            recs = last_launch(out.stdout)
            if not recs:
                print(f"| {n} | {cr:g} | no PPROBE lines (a probe build? rc {out.returncode}: "
                      f"{out.stderr.strip().splitlines()[-1:] if out.stderr.strip() else ''}) |")
                continue
            s = summarize(recs)
            prods = last_producers(out.stdout)
            pr = summarize_producers(prods, recs, s["ghz"]) if prods else None
            prod = (f"{pr['make_per_item']:.2f} / {pr['qe_per_item']:.2f} / {pr['q_per_item']:.2f} | "
                    f"{pr['ke_per_tile']:.3f} / {pr['ve_per_tile']:.3f}") if pr else "- | -"
            print(f"| {n} | {cr:g} | {s['span_us']:.0f} | {s['ghz']:.2f} | {s['items_per_wg']:.1f} | "
                  f"{s['tiles_per_item']:.1f} | {s['loop_per_tile']:.3f} | {s['wait_per_tile']:.3f} | "
                  f"{s['q_per_item']:.2f} / {s['first_per_item']:.2f} / {s['last_per_item']:.2f} / "
                  f"{s['epi_per_item']:.2f} | {s['item_overhead'] / s['loop_per_tile']:.2f} | {prod} |", flush=True)


if __name__ == "__main__":
    main()
