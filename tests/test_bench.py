"""bench.py: the baseline's FLOP accounting and one tiny end-to-end run (no timing is asserted: bench.py is a
benchmark, these only keep it correct and runnable)."""
import json

import pytest

import bench
from conftest import TINY as _TINY
from model import ModelConfig, Transformer

TINY = {**_TINY, "vocab_size": 512, "n_layers": 2}


def test_dense_flops_formula_counts_the_baseline_parameters():
    cfg = ModelConfig(**TINY)
    hidden = 200
    dense = bench.DenseGPT(cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, hidden)
    matmul = sum(p.numel() for n, p in dense.named_parameters() if p.dim() == 2 and not n.startswith("embed"))
    attn = 6 * cfg.n_layers * cfg.n_heads * 2 * (cfg.dim // cfg.n_heads) * cfg.max_seq_len
    assert bench.dense_flops_per_token(cfg.vocab_size, cfg.dim, cfg.n_layers, hidden, cfg.max_seq_len) == 6 * matmul + attn


def test_matched_baseline_has_our_flops_up_to_rounding():
    cfg = ModelConfig(**TINY)
    target = Transformer(cfg).flops_per_token()
    for multiple in (1, 8):
        hidden = bench.matched_mlp_hidden(cfg, target, multiple)
        got = bench.dense_flops_per_token(cfg.vocab_size, cfg.dim, cfg.n_layers, hidden, cfg.max_seq_len)
        assert hidden % multiple == 0
        assert abs(got - target) <= 6 * cfg.n_layers * 2 * cfg.dim * multiple / 2


def test_bench_runs_end_to_end(tmp_path, capsys):
    config = tmp_path / "tiny.py"
    # a train.py config file: bench.py takes its model settings and batch_size, and skips the training settings
    config.write_text("".join(f"{k} = {v!r}\n" for k, v in TINY.items()) + "batch_size = 2\nlearning_rate = 1e-3\n")
    out = tmp_path / "bench.json"
    bench.main([str(config), "--device=cpu", "--warmup=1", "--steps=1", "--rounds=1",
                "--decode_tokens=4", f"--json={out}"])
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "ratio ours / baseline" in printed and "decode" in printed
    assert res["ours"]["tok_per_s"] > 0 and res["baseline"]["tok_per_s"] > 0 and res["ratio"] > 0
    assert res["batch_size"] == 2 and res["ours"]["flops_per_token"] == Transformer(ModelConfig(**TINY)).flops_per_token()
    assert res["decode"]["cache_bytes_per_token_bf16"] == 2 * 2 * (16 + 4)


def test_bench_dense_baseline_is_this_model_all_dense(tmp_path, capsys):
    """--baseline_model=dense: the baseline is our Transformer with every block (the MTP block too) dense, so with
    inter_dim = (n_shared + n_activated) * moe_inter_dim it has our FLOPs per token but for the router's."""
    config = tmp_path / "tiny.py"
    tiny = {**TINY, "inter_dim": 48}  # (1 shared + 2 activated) x 16
    config.write_text("".join(f"{k} = {v!r}\n" for k, v in tiny.items()) + "batch_size = 2\n")
    out = tmp_path / "bench.json"
    bench.main([str(config), "--device=cpu", "--baseline_model=dense", "--optimizer=muon", "--warmup=1", "--steps=1",
                "--rounds=1", "--decode_tokens=2", f"--json={out}"])
    res = json.loads(out.read_text())
    assert res["optimizer"] == "muon"  # both models timed with the training optimizer
    assert "this model with every block dense, inter_dim 48" in capsys.readouterr().out
    assert res["baseline"]["model"] == "dense" and res["baseline"]["tok_per_s"] > 0
    assert res["baseline"]["flops_per_token"] == pytest.approx(res["ours"]["flops_per_token"], rel=0.01)
    assert res["baseline"]["flops_per_token"] < res["ours"]["flops_per_token"]
    with pytest.raises(SystemExit, match="baseline_model must be 'gpt' or 'dense'"):
        bench.main([str(config), "--device=cpu", "--baseline_model=mlp"])


def test_bench_rejects_a_missing_or_bad_model_config(tmp_path):
    with pytest.raises(SystemExit, match="config file not found: nowhere.py"):
        bench.main(["nowhere.py", "--device=cpu"])
    bad = tmp_path / "bad.py"
    bad.write_text("dim = 36\n")
    with pytest.raises(SystemExit, match="bench.py: error: bad ModelConfig: dim must be a multiple of 8"):
        bench.main([str(bad), "--device=cpu"])


def test_bench_bad_device_and_baseline_are_one_line_before_any_timing(capsys):
    with pytest.raises(SystemExit, match="bench.py: error: device must be 'cpu', 'cuda' or 'cuda:N', not 'gpu'"):
        bench.main(["--device=gpu"])
    with pytest.raises(SystemExit, match="baseline_model must be 'gpt' or 'dense', not 'mlp'"):
        bench.main(["--device=cpu", "--baseline_model=mlp"])
    assert "bench.py:" not in capsys.readouterr().out  # stopped before the header line, i.e. before any work
