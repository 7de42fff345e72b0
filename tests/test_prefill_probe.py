"""bench/prefill_probe.py's parsing of a probe build's PPROBE lines (the GPU run itself needs a
-DDMS_PREFILL_PROBE build): the last launch is the one summarized, idle warpgroups are left out,
and the per-item / per-tile figures follow from the cycles and the clock the lines imply."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import prefill_probe as pp  # noqa: E402


def line(cta, wg, *, ns=1000, cyc=2000, tiles=10, q=100, first=200, loop=1600, wait=80, last=50, epi=40, items=2):
    return (f"PPROBE cta {cta} wg {wg} ns {ns} cyc {cyc} tiles {tiles} q {q} first {first} loop {loop} "
            f"wait {wait} last {last} epi {epi} items {items}")


def test_the_last_launch_is_kept():
    first = [line(c, w, q=999) for c in range(2) for w in range(2)]
    second = [line(c, w) for c in range(3) for w in range(2)]
    recs = pp.last_launch("\n".join(["N = 32768", *first, "CR 8: ...", *second]))
    assert len(recs) == 6 and all(r["q"] == 100 for r in recs)
    assert pp.last_launch("no probe lines here") == []


def test_summary_figures():
    # Two busy warpgroups at 2 cycles per ns (2 GHz) and one idle one (no items: left out).
    text = "\n".join([line(0, 0), line(0, 1, ns=1500, cyc=3000), line(1, 0, items=0, tiles=0, ns=10, cyc=5000)])
    s = pp.summarize(pp.last_launch(text))
    assert s["wgs"] == 2
    assert s["ghz"] == pytest.approx(2.0)
    assert s["span_us"] == pytest.approx(1.5)
    assert s["tiles_per_item"] == pytest.approx(5.0)
    # 3200 loop cycles over 20 - 4 steady tiles at 2 GHz: 0.1 us per tile; q 200 cycles over 4 items: 0.025 us.
    assert s["loop_per_tile"] == pytest.approx(0.1)
    assert s["q_per_item"] == pytest.approx(0.025)
    assert s["item_overhead"] == pytest.approx((200 + 400 + 100 + 80) / 2000 / 4)


def test_producer_figures_per_item_and_tile():
    recs = pp.last_launch("\n".join([line(0, 0, items=4, tiles=40), line(0, 1, items=4, tiles=40)]))
    prods = pp.last_producers("PPROD cta 0 cyc 9 make 8000 qe 4000 q 2000 ke 40000 ve 20000\n"
                              "PPROD cta 0 cyc 9 make 800 qe 400 q 200 ke 4000 ve 2000")
    assert len(prods) == 1 and prods[0]["make"] == 800  # the last launch's
    # At 2 GHz: 800 cycles over the CTA's 4 items = 0.1 us; 4000 cycles over its 40 tiles = 0.05 us.
    f = pp.summarize_producers(prods, recs, 2.0)
    assert f["make_per_item"] == pytest.approx(0.1)
    assert f["qe_per_item"] == pytest.approx(0.05)
    assert f["q_per_item"] == pytest.approx(0.025)
    assert f["ke_per_tile"] == pytest.approx(0.05)
    assert f["ve_per_tile"] == pytest.approx(0.025)
