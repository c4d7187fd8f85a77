"""bench.py: the baseline's FLOP accounting and one tiny end-to-end run (no timing is asserted: bench.py is a
benchmark, these only keep it correct and runnable)."""
import json

import pytest

import bench
from conftest import TINY as _TINY, exit_message
from model import ModelConfig, Transformer

TINY = {**_TINY, "vocab_size": 512, "n_layers": 2}


def test_dense_flops_formula_and_matched_baseline():
    """The baseline's FLOPs formula counts its own parameters, and the matched hidden size gives our FLOPs up to
    rounding."""
    cfg = ModelConfig(**TINY)
    dense = bench.DenseGPT(cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, 200)
    matmul = sum(p.numel() for n, p in dense.named_parameters() if p.dim() == 2 and not n.startswith("embed"))
    attn = 6 * cfg.n_layers * cfg.n_heads * 2 * (cfg.dim // cfg.n_heads) * cfg.max_seq_len
    assert bench.dense_flops_per_token(cfg.vocab_size, cfg.dim, cfg.n_layers, 200, cfg.max_seq_len) == 6 * matmul + attn
    target = Transformer(cfg).flops_per_token()
    for multiple in (1, 8):
        hidden = bench.matched_mlp_hidden(cfg, target, multiple)
        got = bench.dense_flops_per_token(cfg.vocab_size, cfg.dim, cfg.n_layers, hidden, cfg.max_seq_len)
        assert hidden % multiple == 0 and abs(got - target) <= 6 * cfg.n_layers * 2 * cfg.dim * multiple / 2


def bench_run(tmp_path, *args, extra="", **model):
    """bench.main on a train.py config file of the tiny model (bench.py takes its model settings and batch_size,
    and skips the training settings); returns bench.json."""
    config = tmp_path / "tiny.py"
    config.write_text("".join(f"{k} = {v!r}\n" for k, v in {**TINY, **model}.items()) + "batch_size = 2\n" + extra)
    bench.main([str(config), "--device=cpu", "--warmup=1", "--steps=1", "--rounds=1", f"--json={tmp_path / 'b.json'}",
                *args])
    return json.loads((tmp_path / "b.json").read_text())


def test_bench_runs_end_to_end(tmp_path, capsys):
    res = bench_run(tmp_path, "--decode_tokens=4", extra="learning_rate = 1e-3\n")
    printed = capsys.readouterr().out
    assert "ratio ours / baseline" in printed and "decode" in printed
    assert res["ours"]["tok_per_s"] > 0 and res["baseline"]["tok_per_s"] > 0 and res["ratio"] > 0
    assert res["batch_size"] == 2 and res["ours"]["flops_per_token"] == Transformer(ModelConfig(**TINY)).flops_per_token()
    assert res["decode"]["cache_bytes_per_token_bf16"] == 2 * 2 * (16 + 4)


def test_bench_dense_baseline_is_this_model_all_dense(tmp_path, capsys):
    """--baseline_model=dense: the baseline is our Transformer with every block (the MTP block too) dense, so with
    inter_dim = (n_shared + n_activated) * moe_inter_dim it has our FLOPs per token but for the router's."""
    res = bench_run(tmp_path, "--baseline_model=dense", "--optimizer=muon", "--decode_tokens=2", inter_dim=48)
    assert res["optimizer"] == "muon"  # both models timed with the training optimizer
    assert "this model with every block dense, inter_dim 48" in capsys.readouterr().out
    assert res["baseline"]["model"] == "dense" and res["baseline"]["tok_per_s"] > 0
    assert 0.99 * res["ours"]["flops_per_token"] <= res["baseline"]["flops_per_token"] < res["ours"]["flops_per_token"]


@pytest.mark.parametrize("argv, expected", [
    (["nowhere.py", "--device=cpu"], "config file not found: nowhere.py"),
    (["BAD", "--device=cpu"], "bench.py: error: bad ModelConfig: dim must be a multiple of 8"),
    (["--device=gpu"], "bench.py: error: unknown --device='gpu': use cpu, cuda or cuda:N"),
    (["--device=cpu", "--baseline_model=mlp"], "baseline_model must be one of ('gpt', 'dense'), not 'mlp'")])
def test_bench_errors_are_one_line_before_any_timing(tmp_path, capsys, argv, expected):
    (tmp_path / "bad.py").write_text("dim = 36\n")
    assert expected in exit_message(bench.main, [str(tmp_path / "bad.py") if a == "BAD" else a for a in argv])
    assert "bench.py:" not in capsys.readouterr().out  # stopped before the header line, i.e. before any work
