"""python -m dms_ext.demo: progress bar, per-step live-token history, PNG plot, --model path."""
from __future__ import annotations

import struct
import zlib

import pytest
import torch

from dms_ext import demo


def _png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    return w, h, data


def test_demo_embedded_model_writes_plot_and_progress(tmp_path, capsys):
    png = tmp_path / "live.png"
    assert demo.main(["--layers", "2", "--prompt-len", "40", "--new-tokens", "30", "--window", "8",
                      "--batch", "2", "--device", "cpu", "--seed", "3", "--plot", str(png)]) == 0
    cap = capsys.readouterr()
    assert "29/29 steps" in cap.err and "tok/s" in cap.err
    assert f"plot: {png}" in cap.out and "2 layers x 2 KV heads over 29 steps" in cap.out
    w, h, data = _png_size(png)
    assert w > 100 and h > 100
    if data[25] == 2 and data.count(b"IDAT") == 1:  # built-in writer (RGB, one IDAT): decode it
        i = data.index(b"IDAT")
        n = struct.unpack(">I", data[i - 4:i])[0]
        raw = zlib.decompress(data[i + 4:i + 4 + n])
        assert len(raw) == h * (1 + 3 * w)
        assert len(set(raw[1:1 + 3 * w * h:3])) > 3


def test_generate_records_live_tokens_per_step():
    torch.manual_seed(0)
    cfg = demo.TinyConfig(num_layers=2, evict_rate=0.9, max_position=256)
    model = demo.TinyQwen3(cfg)
    cache = model.new_cache(window=4, block_size=8, num_blocks=64, max_seqs=1, device="cpu",
                            dtype=torch.float32)
    runner = demo._TinyRunner(model, cache)
    run = demo.generate(runner, [torch.randint(cfg.vocab_size, (20,))], 12)
    assert run.tokens.shape == (1, 12)
    assert run.history.shape == (12, 2, 2)
    assert run.dense_history == list(range(20, 32))
    final = torch.stack([cache.live_tokens(layer, run.seq_ids[0]) for layer in range(2)])
    assert torch.equal(run.history[-1], final)
    # The window keeps at least min(t + 1, w + 1) tokens; a 0.9 eviction rate keeps far fewer
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
                      "--no-progress", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "window 6, variant borrowed" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("all ")]
    dense, live = int(rows[0][1]), int(rows[0][2])
    assert dense == 2 * 2 * 2 * (24 + 9 - 1) and 0 < live <= dense
    _png_size(png)
