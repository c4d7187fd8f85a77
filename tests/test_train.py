"""train.py end to end on CPU (as a subprocess, the way users run it): loss falls, exact resume, real 2-process
DDP, the learning-rate schedules, a NaN on one rank stopping every rank, clear errors."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, downloads, hellaswag_standin

TINY = ["--device=cpu", "--dtype=float32", "--compile=False", "--vocab_size=512", "--dim=32", "--n_layers=2",
        "--n_heads=2", "--inter_dim=64", "--moe_inter_dim=16", "--kv_lora_rank=16", "--qk_nope_head_dim=8",
        "--qk_rope_head_dim=4", "--v_head_dim=8", "--n_routed_experts=8", "--n_shared_experts=1",
        "--n_activated_experts=2", "--max_seq_len=64", "--init_std=0.02", "--batch_size=4", "--total_batch_size=512",
        "--learning_rate=3e-3", "--min_lr=3e-4", "--warmup_iters=3", "--log_interval=1", "--eval_iters=2",
        "--sample_tokens=0", "--bias_update_speed=1e-2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Token shards of the bundled 150-document FineWeb-Edu sample, made with data/fineweb.py --input."""
    out = tmp_path_factory.mktemp("shards")
    subprocess.run([sys.executable, "data/fineweb.py", "--input", "data/fineweb_edu_sample.jsonl.gz",
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
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


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


def test_bundled_sample_is_prepared_on_first_use(tmp_path):
    """data_dir = the bundled sample's shard dir (config/train_tiny.py) with no meta.json: train.py tokenizes the
    sample there first. SAMPLE_DIR is pointed at a temporary folder so that the repository's copy is left alone."""
    sample_dir = tmp_path / "sample_shards"
    launcher = ("import sys, runpy; from pathlib import Path; import data.fineweb as f; "
                "f.SAMPLE_DIR = Path(sys.argv.pop(1)).resolve(); runpy.run_path('train.py', run_name='__main__')")
    cmd = [sys.executable, "-c", launcher, str(sample_dir), *TINY, "--vocab_size=50304", "--max_iters=2",
           "--eval_interval=100", "--eval_iters=1", f"--out_dir={tmp_path / 'out'}", f"--data_dir={sample_dir}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tokenizing the bundled FineWeb-Edu sample" in p.stdout and "1 val, 4 train" in p.stdout
    assert "done: 2 steps" in p.stdout
    meta = json.loads((sample_dir / "meta.json").read_text())
    assert meta["complete"] and meta["docs"] == 150 and [s["split"] for s in meta["shards"]] == ["val"] + ["train"] * 4
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       timeout=600)  # the second run finds the shards and does not tokenize again
    assert p.returncode == 0 and "tokenizing the bundled" not in p.stdout


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_exact(tmp_path, small_shards, optimizer):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--lr_decay_iters=16", "--eval_interval=8", f"--optimizer={optimizer}"]
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


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_two_processes_match_single_process(tmp_path, small_shards, optimizer):
    """Muon too: every rank orthogonalises the same all-reduced gradients, so the ranks stay identical."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["--max_iters=6", "--lr_decay_iters=6", "--eval_interval=100", f"--optimizer={optimizer}"]
    run_train(single, small_shards, *common)  # batch 4 x 2 accumulation steps
    p = run_train(ddp, small_shards, *common, nproc=2)  # 2 ranks x batch 4: the same 8 windows per step
    assert "tokens per step: 512 = 4 x 64 x 2 processes x 1 accumulation steps" in p.stdout
    s, d = read_log(single), read_log(ddp)
    for rs, rd in zip(s, d):
        assert rd["loss"] == pytest.approx(rs["loss"], rel=1e-4), (rs, rd)
    cs, cd = load(ddp), load(single)  # the ranks agreed at the checkpoint (train.py compares their fingerprints)
    for k in cs["model"]:
        torch.testing.assert_close(cs["model"][k], cd["model"][k], rtol=1e-3, atol=1e-4)
        if k.endswith("gate.bias"):
            assert cs["model"][k].abs().sum() > 0
            assert torch.equal(cs["model"][k], cd["model"][k]), k  # same global counts -> same sign updates


# lr at steps 0..11 for learning_rate 1e-3, min_lr 1e-4, warmup_iters 3, lr_decay_iters 11, worked out by hand:
# warmup lr * (it + 1) / 4; cosine over steps 3..11: 1e-4 + 4.5e-4 * (1 + cos(pi * (it - 3) / 8)); then min_lr.
# WSD with wsd_decay_frac 0.5: flat until step int(11 * 0.5) = 5, then linear to 1e-4 at step 11 (-1.5e-4 a step).
_C = [1e-4 + 4.5e-4 * (1 + c) for c in (1.0, 0.9238795325112867, 0.7071067811865476, 0.3826834323650898, 0.0,
                                         -0.3826834323650898, -0.7071067811865476, -0.9238795325112867)]
EXPECTED_LR = {
    "cosine": [2.5e-4, 5e-4, 7.5e-4] + _C + [1e-4],
    "wsd": [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 8.5e-4, 7e-4, 5.5e-4, 4e-4, 2.5e-4, 1e-4],
}


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_lr_schedules(tmp_path, small_shards, schedule):
    """The lr train.py logs at every step equals the schedule's closed-form values (12 steps)."""
    out = tmp_path / schedule
    run_train(out, small_shards, "--max_iters=12", "--eval_interval=100", "--learning_rate=1e-3", "--min_lr=1e-4",
              "--warmup_iters=3", "--lr_decay_iters=11", f"--lr_schedule={schedule}", "--wsd_decay_frac=0.5")
    assert _C[4] == pytest.approx(5.5e-4) and _C[0] == pytest.approx(1e-3)  # half way, and the top, of the cosine
    assert [r["lr"] for r in read_log(out)] == pytest.approx(EXPECTED_LR[schedule], rel=1e-12)


def test_grad_clip_zero_means_off(tmp_path, small_shards):
    """grad_clip=0 trains exactly like a clip that never bites (1e9), and the loss falls; before, 0 clipped every
    gradient to norm 0, so the model never moved. The logged grad norm is the real one either way."""
    common = ["--max_iters=6", "--lr_decay_iters=6", "--eval_interval=100"]
    run_train(tmp_path / "off", small_shards, "--grad_clip=0.0", *common)
    run_train(tmp_path / "huge", small_shards, "--grad_clip=1e9", *common)
    off, huge = read_log(tmp_path / "off"), read_log(tmp_path / "huge")
    assert [(r["loss"], r["grad_norm"]) for r in off] == [(r["loss"], r["grad_norm"]) for r in huge]
    assert all(0 < r["grad_norm"] < 1e9 for r in off)
    assert off[-1]["ce"] < off[0]["ce"] - 0.03, (off[0]["ce"], off[-1]["ce"])  # 6.25 -> 6.18 here


def test_resume_after_a_crash_keeps_one_log_record_per_step(tmp_path, small_shards):
    """A run that dies after its last checkpoint has logged steps that the resumed run trains again. The resumed
    run drops those records, so log.jsonl and eval.jsonl hold each step once, equal to an uninterrupted run's."""
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    common = ["--lr_decay_iters=12", "--eval_interval=4"]
    run_train(straight, small_shards, "--max_iters=12", *common)
    run_train(crashed, small_shards, "--max_iters=8", *common)
    at_step_8 = (crashed / "ckpt.pt").read_bytes()
    run_train(crashed, small_shards, "--max_iters=12", "--init_from=resume", *common)
    (crashed / "ckpt.pt").write_bytes(at_step_8)  # as if it had died after logging step 12, before its checkpoint
    run_train(crashed, small_shards, "--max_iters=12", "--init_from=resume", *common)
    a, b = read_log(straight), read_log(crashed)
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    evals = [json.loads(line) for line in open(crashed / "eval.jsonl")]
    assert [e["step"] for e in evals] == [0, 4, 8, 12]


def test_non_finite_loss_stops_without_checkpoint(tmp_path, small_shards):
    out = tmp_path / "nan"
    p = run_train(out, small_shards, "--max_iters=20", "--learning_rate=1e30", "--warmup_iters=0", "--grad_clip=0.0",
                  "--eval_interval=1000", "--log_interval=5", check=False)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()[-1]
    assert "non-finite loss at step" in err and "Traceback" not in p.stderr
    assert not (out / "ckpt.pt").exists()


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory, small_shards):
    out = tmp_path_factory.mktemp("trained")
    run_train(out, small_shards, "--max_iters=2", "--eval_interval=100")
    return out


CLEAR_ERRORS = {
    "other_model_config": (["--init_from=resume", "--dim=48"], ["another model config", "dim: checkpoint 32 vs now 48"]),
    "missing_data": (["--data_dir={tmp}/no_such_dir"], ["meta.json missing"]),
    "unknown_key": (["--learnig_rate=1e-3"], ["did you mean 'learning_rate'"]),
    "wrong_type": (["--batch_size=big"], ["expects int"]),
    "compile_without_bf16": (["--compile=True", "--dtype=float32"], ["needs dtype='bfloat16'"]),
    "resume_without_checkpoint": (["--init_from=resume", "--out_dir={tmp}/empty"],
                                  ["init_from='resume' but there is no checkpoint"]),
    "batch_not_divisible": (["--total_batch_size=500"], ["total_batch_size=500 is not a multiple"]),
    "unknown_optimizer": (["--optimizer=sgd"], ["optimizer must be one of ('adamw', 'muon'), not 'sgd'"]),
    "resume_with_other_optimizer": (["--init_from=resume", "--optimizer=muon"],
                                    ["optimizer state (optimizer='adamw') does not fit", "resume with optimizer='adamw'"]),
    "negative_grad_clip": (["--grad_clip=-1.0"], ["grad_clip must be >= 0 (0 turns clipping off), got -1.0"]),
    "float16": (["--dtype=float16"], ["dtype='float16' is not supported for training", "use dtype='bfloat16'"]),
    "eval_interval_0": (["--eval_interval=0"], ["eval_interval must be at least 1, got 0"]),
    "eval_iters_0": (["--eval_iters=0"], ["eval_iters must be at least 1, got 0"]),
    "batch_size_0": (["--batch_size=0"], ["batch_size must be at least 1, got 0"]),
    "log_interval_0": (["--log_interval=0"], ["log_interval must be at least 1, got 0"]),
    "unknown_lr_schedule": (["--lr_schedule=linear"], ["lr_schedule must be one of ('cosine', 'wsd'), not 'linear'"]),
    "unknown_init_from": (["--init_from=gpt2"], ["init_from must be 'scratch', 'resume' or a pretrained out_dir",
                                                  "not 'gpt2'"]),
    "device_gpu": (["--device=gpu"], ["device must be 'cpu', 'cuda' or 'cuda:N', not 'gpu'"]),
    "device_cuda_without_cuda": (["--device=cuda"], ["device='cuda' but this PyTorch", "sees no CUDA GPU"]),
    "n_activated_experts_0": (["--n_activated_experts=0"], ["n_activated_experts"]),
    "prompt_beyond_vocab": (["--sample_tokens=4"], ["sample_prompt encodes to token id", "vocab_size is 512"]),
    "hellaswag_missing_file": (["--hellaswag_interval=1", "--hellaswag_path={tmp}/none.jsonl"],
                               ["no HellaSwag file at"]),
}


@pytest.mark.parametrize("case", sorted(CLEAR_ERRORS))
def test_clear_errors(case, tmp_path, small_shards, trained_tiny):
    """A user mistake stops train.py with one line and exit 1, before it writes anything: the run's out_dir is
    left as it was (here: a trained checkpoint and its logs, byte for byte)."""
    if case == "device_cuda_without_cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args, expected = CLEAR_ERRORS[case]
    out = tmp_path / "out"
    shutil.copytree(trained_tiny, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    p = run_train(out, small_shards, "--max_iters=4", *args, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert all(e in last for e in expected), last
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_torchrun_with_hellaswag_and_an_empty_cache(tmp_path, shards):
    """The README's multi-GPU command on 2 gloo ranks, as on a fresh machine: HellaSwag on from step 0 and no cached
    file. Rank 0 downloads once while rank 1 waits, then both score their half. Before, every rank downloaded into
    the same temp file and all but the first to finish died at step 0."""
    script, env = hellaswag_standin(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), "train.py",
           *TINY, "--vocab_size=50304", f"--out_dir={out}", f"--data_dir={shards}", "--max_iters=2",
           "--eval_interval=2", "--hellaswag_interval=2", "--sample_tokens=4"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [line.split()[0] for line in downloads(tmp_path)] == ["0"]  # one download, by rank 0
    evals = [json.loads(line) for line in open(out / "eval.jsonl")]
    assert [e["step"] for e in evals] == [0, 2] and all(0 <= e["hellaswag_acc"] <= 1 for e in evals)
    assert p.stdout.count("(n=8)") == 2 and "done: 2 steps" in p.stdout
    cache = tmp_path / "cache" / "nanodeepseek" / "hellaswag"
    assert [f.name for f in cache.iterdir()] == ["hellaswag_val.jsonl"]
    assert (cache / "hellaswag_val.jsonl").read_bytes() == (tmp_path / "standin_hellaswag.jsonl").read_bytes()


def test_torchrun_with_hellaswag_offline_stops_every_rank_in_one_line(tmp_path, shards):
    """Offline with HellaSwag on and no cached file: rank 0's failed download is every rank's error, at start-up,
    in one line; no rank waits forever for rank 0 and nothing is written."""
    script, env = hellaswag_standin(tmp_path, n_items=0)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), "train.py",
           *TINY, "--vocab_size=50304", f"--out_dir={out}", f"--data_dir={shards}", "--max_iters=2",
           "--hellaswag_interval=2"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0 and "[rank0]: Traceback" not in p.stderr and "[rank1]: Traceback" not in p.stderr
    assert len(downloads(tmp_path)) == 1
    stops = [line.split("train.py: error: ", 1)[1] for line in p.stderr.splitlines() if "train.py: error: " in line]
    assert len(stops) == 2 and stops[0] == stops[1], p.stderr[-3000:]  # both ranks ("[rankN]: " first), one line
    assert "cannot download HellaSwag" in stops[0] and "--data_path" in stops[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "config").glob("*.py")))
def test_config_files_are_valid(config, tmp_path):
    """Every shipped config parses (known keys, right types) and builds a valid ModelConfig: a pretraining config
    gets as far as the data, which is missing here. An SFT config gets a stand-in pretrained checkpoint of the
    context length it expects: sft_tiny then runs its step-0 eval offline, sft_fineweb stops at its Hub data."""
    args = [f"config/{config}", f"--data_dir={tmp_path / 'none'}", "--device=cpu", "--dtype=float32",
            "--compile=False", f"--out_dir={tmp_path / 'out'}"]
    if config.startswith("sft_"):
        from conftest import save_ckpt, tiny_model
        seq = {"sft_tiny.py": 128, "sft_fineweb.py": 1024}[config]
        base = save_ckpt(tmp_path / "base", tiny_model(0, vocab_size=50304, max_seq_len=seq))
        args += [f"--init_from={base}", "--max_iters=0", "--eval_iters=1", "--chat_eval_interval=0"]
    p = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    if config == "sft_tiny.py":
        assert p.returncode == 0 and "done: 0 steps" in p.stdout, p.stderr[-1000:]
    elif config == "sft_fineweb.py":
        assert p.returncode == 1 and "HuggingFaceTB/smol-smoltalk" in last and "chat_data='tasks'" in last, last
    else:
        assert p.returncode == 1 and "meta.json missing" in last, p.stderr[-500:]


def test_help_lists_every_setting():
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and "--bias_update_speed=0.001" in p.stdout and "--kv_lora_rank=256" in p.stdout
    assert "--yarn=False" in p.stdout


NAN_ON_RANK_1 = """
# Run train.py with the training loss of rank 1 (only) made NaN from its third forward on. Each rank writes the
# message it stops with to rank<R>.txt and waits for the other at a barrier, so that torchrun (which kills the
# other workers once one exits) cannot cut a rank off before it has reported.
import os, runpy, sys
sys.path.insert(0, os.getcwd())
import model
import torch.distributed as dist
rank = os.environ["RANK"]
if rank == "1":
    forward, calls = model.Transformer.forward, []
    def poisoned(self, idx, targets=None):
        logits, parts = forward(self, idx, targets)
        if parts is not None and self.training:
            calls.append(1)
            if len(calls) > 2:
                parts["ce"] = parts["ce"] * float("nan")
        return logits, parts
    model.Transformer.forward = poisoned
sys.argv = ["train.py"] + sys.argv[1:]
try:
    runpy.run_path("train.py", run_name="__main__")
except SystemExit as e:
    with open(os.path.join(os.environ["REPORT_DIR"], f"rank{rank}.txt"), "w") as f:
        f.write(str(e.code))
    dist.barrier()
    raise
"""


def test_non_finite_loss_on_one_ddp_rank_stops_every_rank(tmp_path, small_shards):
    """Every rank must learn of the NaN (all-reduced) and stop with the same message at the same step; before,
    rank 1 stopped alone and rank 0 died in (or, with NCCL, hung on) its next gradient all-reduce."""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *TINY,
           f"--out_dir={tmp_path / 'out'}", f"--data_dir={small_shards}", "--max_iters=10", "--eval_interval=100"]
    env = dict(os.environ, OMP_NUM_THREADS="1", REPORT_DIR=str(tmp_path))
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        _, stderr = p.communicate(timeout=150)
    except subprocess.TimeoutExpired:  # the ranks hang: kill the whole group, workers included
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail("the DDP run hung after a NaN on one rank")
    assert p.returncode != 0
    assert "[rank0]: Traceback" not in stderr and "[rank1]: Traceback" not in stderr, stderr[-2000:]
    stops = [(tmp_path / f"rank{r}.txt").read_text() if (tmp_path / f"rank{r}.txt").exists() else None for r in (0, 1)]
    assert stops[0] == stops[1] and "train.py: error: non-finite loss at step 2;" in stops[0], stops
    assert not (tmp_path / "out" / "ckpt.pt").exists()
