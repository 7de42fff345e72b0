"""python -m dms_ext.demo: flags, speed lines, live-token history, the picture, --model path.

CPU only and small: every run here is a 2-layer model with a few dozen tokens.
"""
from __future__ import annotations

import os
import re
import sys

import pytest
import torch

from dms_ext import demo

SMALL = ["--layers", "2", "--hidden-heads", "4", "--kv-heads", "2", "--head-dim", "16",
         "--prompt-len", "40", "--window", "8", "--device", "cpu", "--seed", "3",
         "--kernel-iters", "2"]


def _png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("flags, flag", [
    (["--evict-rate", "1.5"], "--evict-rate"),
    (["--evict-rate", "-0.1"], "--evict-rate"),
    (["--layers", "0"], "--layers"),
    (["--new-tokens", "0"], "--new-tokens"),
    (["--window", "x"], "--window"),
    (["--hidden-heads", "6", "--kv-heads", "4"], "--hidden-heads"),
    (["--head-dim", "15"], "--head-dim"),
    (["--device", "tpu"], "--device"),
])
def test_bad_flag_is_an_argparse_error_naming_it(flags, flag, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(flags + ["--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err


def test_device_cuda_without_cuda_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        demo.main(["--device", "cuda"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device" in err and "CUDA is not available" in err and "--device cpu" in err


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--new-tokens NEW_TOKENS tokens generated per sequence", "(default: 256)",
                 "(default: 0.8)", "(default: auto)", "--evict-rate"):
        assert text in out


def test_new_tokens_1_reports_no_decode_speed(capsys):
    assert demo.main(SMALL + ["--new-tokens", "1", "--plot", "none"]) == 0
    cap = capsys.readouterr()
    decode = [line for line in cap.out.splitlines() if line.startswith("decode")]
    assert len(decode) == 1 and "no decode step ran" in decode[0] and "tok/s" not in decode[0]
    assert "tok/s" not in cap.err  # no progress bar without steps
    assert "picture" not in cap.out


def test_demo_prints_speed_table_and_kernel_time(tmp_path, capsys):
    png = tmp_path / "live.png"
    assert demo.main(SMALL + ["--new-tokens", "12", "--batch", "2", "--plot", str(png)]) == 0
    cap = capsys.readouterr()
    assert "11/11 steps" in cap.err and "tok/s" in cap.err
    assert re.search(r"^decode: +2 x 11 steps, [0-9.]+ tok/s", cap.out, re.M)
    assert "CR = seen / held" in cap.out
    rows = [line.split() for line in cap.out.splitlines() if line.strip().startswith("all ")]
    seen, held = int(rows[0][1]), int(rows[0][2])
    assert seen == 2 * 2 * 2 * (40 + 12 - 1) and 0 < held < seen   # layers x heads x seqs x tokens
    assert re.search(r"sparse_decode \(CPU twin.*us per call", cap.out)
    if png.exists():
        assert f"picture: {png}" in cap.out


def test_picture_written_when_matplotlib_present(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "live.png"
    assert demo.main(SMALL + ["--new-tokens", "6", "--no-progress", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert f"picture: {png} (2 layers x 2 KV heads over 5 decode steps" in out
    w, h = _png_size(png)
    assert w > 600 and h > 300


def test_default_picture_paths_are_unique(capsys):
    pytest.importorskip("matplotlib")
    paths = []
    for _ in range(2):
        assert demo.main(SMALL + ["--new-tokens", "2", "--no-progress"]) == 0
        m = re.search(r"^picture: (\S+) ", capsys.readouterr().out, re.M)
        paths.append(m.group(1))
    try:
        assert paths[0] != paths[1]
        for p in paths:
            _png_size(p)
    finally:
        for p in paths:
            os.unlink(p)


def test_without_matplotlib_prints_how_to_get_the_picture(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    png = tmp_path / "live.png"
    assert demo.main(SMALL + ["--new-tokens", "3", "--no-progress", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out and "pip install matplotlib" in out
    assert not png.exists()


def test_generate_records_live_tokens_per_step():
    torch.manual_seed(0)
    model = demo.random_model(layers=2, heads=4, kv_heads=2, head_dim=16, window=4,
                              evict_rate=0.9, max_position=256)
    cache = demo.DMSCache(2, 2, 16, window=4, block_size=8, num_blocks=64, max_seqs=2,
                          dtype=torch.float32, device="cpu")
    runner = demo._ModelRunner(model, cache)
    prompts = [torch.randint(demo.VOCAB, (20,)) for _ in range(2)]
    run = demo.generate(runner, prompts, 12)
    assert run.tokens.shape == (2, 12) and run.steps == 11
    assert run.history.shape == (12, 2, 2, 2)            # [steps + 1, seqs, layers, heads]
    assert run.dense_history == list(range(20, 32))
    for i, s in enumerate(run.seq_ids):
        final = torch.stack([cache.live_tokens(layer, s) for layer in range(2)])
        assert torch.equal(run.history[-1, i], final)
    # The window keeps min(t + 1, w + 1) tokens at least; a 0.9 eviction rate keeps far fewer
    # than all of them.
    assert int(run.history.min()) >= 5 and int(run.history[-1].max()) < 31


def test_demo_runs_a_local_hf_checkpoint(tmp_path, capsys):
    pytest.importorskip("transformers")
    from dms_ext import hf
    torch.manual_seed(1)
    m = hf.load_dms_model(dict(model_type="qwen3", vocab_size=101, hidden_size=64,
                               intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                               dms_window_size=6, dms_alpha_scale=100.0,
                               dms_initial_alpha_offset=5.0))
    m.save_pretrained(tmp_path / "ckpt")
    png = tmp_path / "hf.png"
    assert demo.main(["--model", str(tmp_path / "ckpt"), "--prompt-len", "24", "--new-tokens",
                      "9", "--batch", "2", "--block-size", "4", "--device", "cpu",
                      "--no-progress", "--kernel-iters", "2", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "window 6, variant borrowed" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("all ")]
    seen, held = int(rows[0][1]), int(rows[0][2])
    assert seen == 2 * 2 * 2 * (24 + 9 - 1) and 0 < held <= seen
