"""dms_ext.eval: task generators, checkpoint loading, and a CPU smoke run of the CLI on a tiny
random DMS model (every task and method, table / JSON written)."""
import json
import os

import pytest
import torch

import dms_ext  # noqa: F401  (loads the op library)
from dms_ext import eval as E
from dms_ext.models import DMSForCausalLM, ModelConfig, convert_to_dms


def tiny_dms(variant="borrowed", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden=32, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=64, window=4,
                      intermediate=64, max_position=128)
    m = convert_to_dms(DMSForCausalLM(cfg), variant)
    with torch.no_grad():                    # some logits > 0: the cache evicts something
        for _, p, rows in m.eviction_parameters():
            if rows is not None:
                p[rows] = torch.randn_like(p[rows]) * 0.7
            elif p.dim() == 2:
                p.copy_(torch.randn_like(p) * 0.07)
    return m.eval()


@pytest.mark.parametrize("kind", E.TASKS)
def test_task_structure(kind):
    g = torch.Generator().manual_seed(1)
    t = E.make_task(kind, 3, 96, 64, g, pairs=5, queries=3, values=3)
    k0, v0, f0, nk, nv, nf = E._layout(64)
    assert t.ids.shape == (3, 96) and t.answer.shape == (3, 96)
    for b in range(3):
        ids = t.ids[b].tolist()
        ans = t.answer[b].nonzero().flatten().tolist()
        assert ids[0] == 0 and all(p >= t.prefix for p in ans)
        assert len(ans) == {"niah": 1, "mk": 3, "mv": 3}[kind]
        ctx = ids[:t.prefix]
        if kind == "mk":
            pairs = {ctx[i]: ctx[i + 1] for i in range(len(ctx) - 1) if k0 <= ctx[i] < v0}
            assert all(pairs[ids[p]] == ids[p + 1] for p in ans)
        else:
            key = ids[t.prefix]
            at = ctx.index(key)
            m = len(ans)
            assert ctx.count(key) == 1
            assert ids[at + 1:at + 1 + m] == ids[t.prefix + 1:t.prefix + 1 + m]
            assert all(v0 <= x < f0 for x in ids[at + 1:at + 1 + m])


def test_load_project_and_reference_formats(tmp_path):
    m = tiny_dms("adapter")
    m.save_pretrained(str(tmp_path / "ours"))
    a = E.load_model(str(tmp_path / "ours"), max_position=256)
    assert a.cfg.variant == "adapter" and a.cfg.max_position == 256
    # The reference's format: dms_* fields in a Qwen3 config, NVIDIA's adapter names.
    d = json.load(open(tmp_path / "ours" / "config.json"))
    for k in ("dms", "dms_ext_config"):
        d.pop(k)
    d.update(dms_window_size=4, dms_alpha_scale=100.0, dms_initial_alpha_offset=5.0,
             dms_separate_alpha=True, dms_alpha_per="head")
    os.makedirs(tmp_path / "ref")
    json.dump(d, open(tmp_path / "ref" / "config.json", "w"))
    sd = {k.replace(".dms_norm.", ".dms_proj_alpha_norm.").replace(".dms_proj.", ".dms_proj_alpha."): v
          for k, v in m.state_dict().items()}
    torch.save(sd, tmp_path / "ref" / "pytorch_model.bin")
    b = E.load_model(str(tmp_path / "ref"))
    assert b.cfg.variant == "adapter" and b.cfg.window == 4
    ids = torch.randint(0, 64, (2, 40))
    torch.testing.assert_close(b(ids, attention="dms"), m(ids, attention="dms"))
    # A retrofit_experiment dms.pt
    torch.save({"adapter_cr8": {"model": {k: v.to(torch.bfloat16) for k, v in m.state_dict().items()},
                                "cfg": m.cfg.__dict__}}, tmp_path / "dms.pt")
    c = E.load_model(str(tmp_path / "dms.pt"))
    assert c.cfg.variant == "adapter"
    with pytest.raises(ValueError):
        E.load_model(str(tmp_path / "dms.pt"), run="nope")


def test_cli_smoke(tmp_path):
    m = tiny_dms("borrowed")
    m.save_pretrained(str(tmp_path / "ckpt"))
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:    # one thread: tiny ops on a loaded machine are much slower with several
        rc = E.main(["--model", str(tmp_path / "ckpt"), "--lengths", "40,56", "--samples", "2",
                     "--batch", "2", "--pairs", "4", "--queries", "2", "--values", "2",
                     "--out", str(out), "--no-progress", "--device", "cpu", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    rows = json.load(open(out / "longctx.json"))["rows"]
    assert len(rows) == len(E.TASKS) * 2 * len(E.METHODS)
    md = open(out / "longctx.md").read()
    assert "| task | length |" in md and "niah" in md
    by = {(r["task"], r["length"], r["method"]): r for r in rows}
    for t in E.TASKS:
        for n in (40, 56):
            dms = by[(t, n, "dms")]
            assert 0 <= dms["acc"] <= 1 and dms["cr"] >= 1
            assert by[(t, n, "dense")]["cr"] == 1.0
            # The heuristics run at the DMS live KV (rounded up).
            for h in ("window", "h2o", "tova"):
                assert by[(t, n, h)]["live"] == pytest.approx(float(int(-(-dms["live"] // 1))))


def test_heuristics_need_dms_and_lengths_checked():
    m = tiny_dms()
    with pytest.raises(ValueError):
        E.evaluate(m, ["niah"], [64], ["window"], samples=1, progress=False)
    with pytest.raises(ValueError):
        E.evaluate(m, ["niah"], [4096], ["dms"], samples=1, progress=False)
