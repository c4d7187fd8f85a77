"""bench.py: the baseline's FLOP accounting and one tiny end-to-end run (no timing is asserted: bench.py is a
benchmark, these only keep it correct and runnable), and the memory estimate against real optimizer state and
saved tensors."""
import json

import pytest
import torch

import bench
from conftest import TINY as _TINY, exit_message
from model import ModelConfig, Transformer
from optim import build_optimizer

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


# ---- the GPU memory estimate (--memory; train.py prints it on CUDA) ------------------------------------------

@pytest.mark.parametrize("optimizer, frozen", [("adamw", ()), ("muon", ()), ("adamw", ("embed.weight",))])
def test_state_bytes_are_the_optimizer_state_after_a_real_step(optimizer, frozen):
    """params, grads and optimizer bytes equal the tensors a real step leaves (AdamW's moments and step counters,
    Muon's momentum buffers), exactly; a frozen parameter (LoRA) has neither gradient nor state."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY))
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    opt = build_optimizer(model, optimizer, 1e-3, 0.1, (0.9, 0.95))
    x = torch.randint(0, TINY["vocab_size"], (2, 17))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, parts = model(x[:, :-1], x[:, 1:])
    (parts["ce"] + parts["mtp"].sum() + parts["balance"]).backward()
    opt.step()
    states = [s for o in getattr(opt, "optimizers", [opt]) for s in o.state.values()]
    assert len(states) == sum(p.requires_grad for p in model.parameters())  # every trained parameter has its state
    assert bench.state_bytes(model, optimizer) == {
        "params": sum(p.nbytes for p in model.parameters()),
        "grads": sum(p.grad.nbytes for p in model.parameters() if p.grad is not None),
        "optimizer": sum(t.nbytes for s in states for t in s.values())}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_activation_estimate_matches_a_direct_measurement(dtype):
    """Activations fitted at batch 1 and 2 of 16 tokens, scaled to batch 4 x 64 tokens, match the saved tensors of a
    forward at batch 4 x 64 within 10% (the fit is linear: it lands within 1% here); under bf16 the weights' copies
    are the fixed part, about the bf16 size of the matmul weights."""
    cfg = ModelConfig(**{**TINY, "max_seq_len": 64})
    fixed, per_token = bench.activation_bytes(cfg, dtype, 16)
    direct = bench.saved_bytes(Transformer(cfg), 4, 64, dtype)
    assert abs(fixed + 4 * 64 * per_token - direct) <= 0.1 * direct
    matmul = sum(p.numel() for n, p in Transformer(cfg).named_parameters() if p.dim() >= 2 and n != "embed.weight")
    assert (0.5 * 2 * matmul < fixed < 1.5 * 2 * matmul) if dtype == "bfloat16" else fixed < 0.01 * direct


def test_saved_bytes_count_each_storage_once_and_not_the_weights():
    """A tensor saved by several ops (and its views) counts once; the fp32 parameters never count as activations."""
    cfg = ModelConfig(**TINY)
    model = Transformer(cfg)
    weights = sum(p.nbytes for p in model.parameters())
    assert 0 < bench.saved_bytes(model, 1, 8, "float32") < weights  # fp32: every weight would be saved by its op


def test_bench_memory_prints_the_estimate_for_both_optimizers(tmp_path, capsys):
    """bench.py --memory on the CPU: bfloat16 unless asked otherwise, AdamW and Muon, and each largest batch_size
    is the last one whose total fits."""
    config = tmp_path / "tiny.py"
    config.write_text("".join(f"{k} = {v!r}\n" for k, v in {**TINY, "max_seq_len": 64}.items()) + "batch_size = 3\n")
    bench.main([str(config), "--memory", "--memory_seq_len=16", f"--json={tmp_path / 'm.json'}"])
    printed = capsys.readouterr().out
    est = json.loads((tmp_path / "m.json").read_text())["memory"]
    assert "estimated, not yet measured" in printed and "Muon" in printed and "bench.py: " not in printed
    assert est["dtype"] == "bfloat16" and est["batch_size"] == 3 and set(est["optimizers"]) == {"adamw", "muon"}
    assert est["activations"] == est["activations_fixed"] + 3 * est["activations_per_seq"]
    for o in est["optimizers"].values():
        base = o["params"] + o["grads"] + o["optimizer"] + est["activations_fixed"]
        assert o["total"] == base + est["activations"] - est["activations_fixed"]
        for gb, b in o["fits"].items():
            assert base + b * est["activations_per_seq"] <= int(gb) * 1e9 < base + (b + 1) * est["activations_per_seq"]
    bench.main([str(config), "--memory", "--dtype=float32", "--memory_seq_len=16", f"--json={tmp_path / 'm.json'}"])
    assert json.loads((tmp_path / "m.json").read_text())["memory"]["dtype"] == "float32"
