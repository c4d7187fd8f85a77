"""train.py end to end on CPU: loss falls, exact resume, real 2-process DDP, atomic checkpoints, clear errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

TINY = ["--device=cpu", "--dtype=float32", "--compile=False", "--vocab_size=512", "--dim=32", "--n_layers=2",
        "--n_heads=2", "--inter_dim=64", "--moe_inter_dim=16", "--kv_lora_rank=16", "--qk_nope_head_dim=8",
        "--qk_rope_head_dim=4", "--v_head_dim=8", "--n_routed_experts=8", "--n_shared_experts=1",
        "--n_activated_experts=2", "--max_seq_len=64", "--init_std=0.02", "--batch_size=4", "--total_batch_size=512",
        "--learning_rate=3e-3", "--min_lr=3e-4", "--warmup_iters=3", "--log_interval=1", "--eval_iters=2",
        "--sample_tokens=0", "--bias_update_speed=1e-2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_data, gpt2_enc):
    """Token shards of the 150-document FineWeb-Edu sample, made with data/fineweb.py --input."""
    out = tmp_path_factory.mktemp("shards")
    subprocess.run([sys.executable, "data/fineweb.py", "--input", str(shared_data / "fineweb_edu_sample/training_data.csv"),
                    "--out_dir", str(out), "--shard_size", "20000", "--num_workers", "1"],
                   cwd=ROOT, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def small_shards(shards, tmp_path_factory):
    """The same shards with every token id taken mod 512: text-like statistics at a vocab that keeps the model's
    head (and so every test step) cheap on a 2-core CPU."""
    out = tmp_path_factory.mktemp("small_shards")
    meta = json.loads((shards / "meta.json").read_text())
    for s in meta["shards"]:
        np.save(out / s["file"], (np.load(shards / s["file"]) % 512).astype(np.uint16))
    meta.update(vocab_size=512, eot=50256 % 512, tokenizer="gpt2 mod 512 (test data)")
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def run_train(out_dir, data_dir, *args, nproc=None, check=True):
    launcher = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = launcher + ["train.py", *TINY, f"--out_dir={out_dir}", f"--data_dir={data_dir}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: threads only add contention
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def load(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=False)


def test_tiny_run_lowers_loss_and_logs(tmp_path, shards):
    """The real thing: GPT-2 vocab, shards of the FineWeb-Edu sample."""
    out = tmp_path / "run"
    p = run_train(out, shards, "--vocab_size=50304", "--learning_rate=1e-2", "--min_lr=1e-3", "--max_iters=30",
                  "--lr_decay_iters=30", "--eval_interval=15")
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    assert log[0]["loss"] > 10.5 and log[0]["ce"] == pytest.approx(10.83, abs=0.1)  # ~ln(50304) at init
    assert log[-1]["ce"] < log[0]["ce"] - 2.0, (log[0]["ce"], log[-1]["ce"])
    for key in ("ce", "mtp", "balance", "lr", "grad_norm", "tok_per_s", "load_max", "load_min"):
        assert key in log[-1]
    assert log[-1]["loss"] == pytest.approx(log[-1]["ce"] + 0.3 * log[-1]["mtp"] + log[-1]["balance"], rel=1e-5)
    evals = [json.loads(line) for line in open(out / "eval.jsonl")]
    assert [e["step"] for e in evals] == [0, 15, 30] and evals[-1]["val_loss"] < evals[0]["val_loss"] - 2
    assert "val loss" in p.stdout and "done: 30 steps" in p.stdout
    ckpt = load(out)
    assert ckpt["step"] == 30 and ckpt["tokens"] == 30 * 512
    biases = [v for k, v in ckpt["model"].items() if k.endswith("gate.bias")]
    assert len(biases) == 2 and all(b.abs().sum() > 0 for b in biases)  # the balancer moved the biases


def test_resume_is_exact(tmp_path, small_shards):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--lr_decay_iters=16", "--eval_interval=8"]
    run_train(straight, small_shards, "--max_iters=16", *common)
    run_train(split, small_shards, "--max_iters=8", *common)
    run_train(split, small_shards, "--max_iters=16", "--init_from=resume", *common)
    a, b = read_log(straight), read_log(split)
    assert [r["step"] for r in b] == list(range(1, 17))
    for ra, rb in zip(a, b):
        assert (ra["loss"], ra["ce"], ra["mtp"], ra["balance"]) == (rb["loss"], rb["ce"], rb["mtp"], rb["balance"])
    ca, cb = load(straight), load(split)
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k  # weights AND expert biases, bit for bit
    assert ca["data"] == cb["data"] and ca["tokens"] == cb["tokens"]


def test_ddp_two_processes_match_single_process(tmp_path, small_shards):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["--max_iters=6", "--lr_decay_iters=6", "--eval_interval=100"]
    run_train(single, small_shards, *common)  # batch 4 x 2 accumulation steps
    p = run_train(ddp, small_shards, *common, nproc=2)  # 2 ranks x batch 4: the same 8 windows per step
    assert "tokens per step: 512 = 4 x 64 x 2 processes x 1 accumulation steps" in p.stdout
    s, d = read_log(single), read_log(ddp)
    for rs, rd in zip(s, d):
        assert rd["loss"] == pytest.approx(rs["loss"], rel=1e-4), (rs, rd)
    cs, cd = load(ddp), load(single)
    prints = cs["ddp_fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1]  # parameters and expert biases identical on both ranks
    for k in cs["model"]:
        torch.testing.assert_close(cs["model"][k], cd["model"][k], rtol=1e-3, atol=1e-4)
        if k.endswith("gate.bias"):
            assert cs["model"][k].abs().sum() > 0
            assert torch.equal(cs["model"][k], cd["model"][k]), k  # same global counts -> same sign updates


def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    import train
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(train.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no half-written temp file left behind


def test_lr_schedules():
    import train
    train.learning_rate, train.min_lr, train.warmup_iters, train.lr_decay_iters = 1.0, 0.1, 10, 110
    train.lr_schedule = "cosine"
    assert train.get_lr(0) == pytest.approx(1 / 11) and train.get_lr(9) == pytest.approx(10 / 11)
    assert train.get_lr(10) == pytest.approx(1.0) and train.get_lr(60) == pytest.approx(0.55)
    assert train.get_lr(110) == train.get_lr(500) == 0.1
    train.lr_schedule, train.wsd_decay_frac = "wsd", 0.2
    assert train.get_lr(50) == 1.0 and train.get_lr(88) == 1.0
    assert train.get_lr(99) == pytest.approx(1.0 + (0.1 - 1.0) * 11 / 22)


def test_non_finite_loss_stops_without_checkpoint(tmp_path, small_shards):
    out = tmp_path / "nan"
    p = run_train(out, small_shards, "--max_iters=20", "--learning_rate=1e30", "--warmup_iters=0", "--grad_clip=0.0",
                  "--eval_interval=1000", "--log_interval=5", check=False)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()[-1]
    assert "non-finite loss at step" in err and "Traceback" not in p.stderr
    assert not (out / "ckpt.pt").exists()


def test_clear_errors(tmp_path, small_shards):
    # resume into another model config
    out = tmp_path / "cfg"
    run_train(out, small_shards, "--max_iters=2", "--eval_interval=100")
    p = run_train(out, small_shards, "--max_iters=4", "--init_from=resume", "--dim=48", check=False)
    assert p.returncode == 1 and "another model config" in p.stderr and "dim: checkpoint 32 vs now 48" in p.stderr
    assert "Traceback" not in p.stderr
    # missing data
    p = run_train(tmp_path / "x", tmp_path / "no_such_dir", "--max_iters=1", check=False)
    assert p.returncode == 1 and "meta.json missing" in p.stderr and "Traceback" not in p.stderr
    # unknown key and wrong type, from train.py's own command line
    p = run_train(tmp_path / "x", small_shards, "--learnig_rate=1e-3", check=False)
    assert p.returncode == 1 and "did you mean 'learning_rate'" in p.stderr
    p = run_train(tmp_path / "x", small_shards, "--batch_size=big", check=False)
    assert p.returncode == 1 and "expects int" in p.stderr
    p = run_train(tmp_path / "x", small_shards, "--compile=True", "--dtype=float32", check=False)
    assert p.returncode == 1 and "needs dtype='bfloat16'" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and "--bias_update_speed=0.001" in p.stdout and "--kv_lora_rank=256" in p.stdout
