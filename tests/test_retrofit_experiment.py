"""bench/retrofit_experiment.py --tiny: phases resume from the checkpoint folder and the
report holds both evaluation sets (CPU, one retrofit, a few seconds)."""
import importlib.util
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location(
        "retrofit_experiment", os.path.join(ROOT, "bench", "retrofit_experiment.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_phases_resume(tmp_path):
    mod = _script()
    threads = torch.get_num_threads()
    out = str(tmp_path / "r")
    common = ["--tiny", "--threads", "1", "--out", out, "--no-progress", "--no-plot",
              "--runs", "borrowed:8"]
    try:
        assert mod.main(common + ["--phase", "pretrain"]) == 0
        res = json.load(open(os.path.join(out, "retrofit_tiny.json")))
        assert res["pretrain"]["done"] and not res["complete"]
        ck = torch.load(os.path.join(out, "ckpt", "pretrain.pt"), weights_only=False)
        assert ck["opt"] is None and ck["state"]["step"] == 30
        assert mod.main(common) == 0                   # the rest, pretraining not repeated
    finally:
        torch.set_num_threads(threads)
    res = json.load(open(os.path.join(out, "retrofit_tiny.json")))
    assert res["complete"] and len(res["invocations"]) == 2
    run = res["runs"]["borrowed_cr8"]
    assert {"eval", "tune"} <= set(run) and run["steps"] == 12
    md = open(os.path.join(out, "retrofit_tiny.md")).read()
    assert "sequence length **128**" in md and "## unseen seed" in md and "## tuning seed" in md
    assert os.path.exists(os.path.join(out, "retrofit_tiny_logs.tsv"))
