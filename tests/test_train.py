"""train.py end to end on CPU (as a process, the way users run it; forked from conftest's servers, which have imported
torch, except the tiny run's fresh interpreter): loss falls, exact resume, real 2-process DDP, the learning-rate
schedules, a NaN on one rank stopping every rank, clear errors."""
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT, TORCHRUN, cached_hellaswag, downloads, hellaswag_standin, ok, run, run_forked, save_ckpt, \
    tiny_model, train_args


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Token shards of the bundled 150-document FineWeb-Edu sample, made with data/fineweb.py --input."""
    out = tmp_path_factory.mktemp("shards")
    ok(run("data/fineweb.py", "--input", "data/fineweb_edu_sample.jsonl.gz", "--out_dir", out, "--shard_size",
           "20000", "--num_workers", "1"))
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


def run_train(out_dir, data_dir, *args, launch=(), check=True, timeout=600, fresh=False, **env):
    """train.py (after `launch`: torchrun, a launcher script) with the tiny settings, then args (later ones win), as
    conftest.run_forked's process (torchrun: its launcher; the workers are fresh processes), or fresh."""
    cmd = [*launch, "train.py", *train_args(), f"--out_dir={out_dir}", f"--data_dir={data_dir}", *args]
    p = (run if fresh else run_forked)(*cmd, timeout=timeout, **env)
    return ok(p) if check else p


def read_log(out_dir, name="log.jsonl"):
    return [json.loads(line) for line in open(out_dir / name)]


def load(out_dir):
    return torch.load(out_dir / "ckpt.pt", weights_only=True)


def test_tiny_run_lowers_loss_and_logs(tmp_path, shards):
    """The real thing: GPT-2 vocab, shards of the FineWeb-Edu sample, a fresh `python train.py`. 20 steps of 512
    tokens (4 micro-batches of 2 x 64: at batch 4 each 50304-wide logits tensor is above glibc's mmap threshold and is
    page-faulted in anew at every use) take the training loss from 10.83 to 8.33 and the val loss from 10.85 to 8.29."""
    out = tmp_path / "run"
    p = run_train(out, shards, "--vocab_size=50304", "--learning_rate=1e-2", "--min_lr=1e-3", "--max_iters=20",
                  "--lr_decay_iters=20", "--eval_interval=10", "--batch_size=2", fresh=True)
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 21))
    assert log[0]["loss"] > 10.5 and log[0]["ce"] == pytest.approx(10.83, abs=0.1)  # ~ln(50304) at init
    assert log[-1]["ce"] < log[0]["ce"] - 2.0, (log[0]["ce"], log[-1]["ce"])
    assert {"ce", "mtp", "balance", "lr", "grad_norm", "tok_per_s", "load_max", "load_min"} <= set(log[-1])
    assert log[-1]["loss"] == pytest.approx(log[-1]["ce"] + 0.3 * log[-1]["mtp"] + log[-1]["balance"], rel=1e-5)
    evals = read_log(out, "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 10, 20] and evals[-1]["val_loss"] < evals[0]["val_loss"] - 2
    assert "val loss" in p.stdout and "done: 20 steps" in p.stdout
    ckpt = load(out)
    assert ckpt["step"] == 20 and ckpt["tokens"] == 20 * 512
    biases = [v for k, v in ckpt["model"].items() if k.endswith("gate.bias")]
    assert len(biases) == 2 and all(b.abs().sum() > 0 for b in biases)  # the balancer moved the biases


def test_bundled_sample_is_prepared_on_first_use(tmp_path):
    """data_dir = the bundled sample's shard dir (config/train_tiny.py) with no meta.json: train.py tokenizes the
    sample there first. SAMPLE_DIR is pointed at a temporary folder so that the repository's copy is left alone."""
    sample_dir = tmp_path / "sample_shards"
    launcher = tmp_path / "launcher.py"
    launcher.write_text("import os, sys, runpy; sys.path.insert(0, os.getcwd()); from pathlib import Path; "
                        "import data.fineweb as f; f.SAMPLE_DIR = Path(sys.argv.pop(1)).resolve(); "
                        "runpy.run_path('train.py', run_name='__main__')\n")
    cmd = [launcher, sample_dir, *train_args(vocab_size=50304), "--max_iters=2", "--eval_interval=100",
           "--eval_iters=1", "--batch_size=2", f"--out_dir={tmp_path / 'out'}", f"--data_dir={sample_dir}"]
    p = ok(run_forked(*cmd))
    assert "tokenizing the bundled FineWeb-Edu sample" in p.stdout and "1 val, 4 train" in p.stdout
    assert "done: 2 steps" in p.stdout
    meta = json.loads((sample_dir / "meta.json").read_text())
    assert meta["complete"] and meta["docs"] == 150 and [s["split"] for s in meta["shards"]] == ["val"] + ["train"] * 4
    p = ok(run_forked(*cmd, "--max_iters=0"))  # the second run finds the shards (and trains no step)
    assert "tokenizing the bundled" not in p.stdout and "done: 0 steps" in p.stdout


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_exact_even_after_a_crash(tmp_path, small_shards, optimizer):
    """A resumed run continues bit for bit. Then a crash: a run that dies after its last checkpoint has logged steps
    that the resumed run trains again; the resumed run drops those records, so log.jsonl and eval.jsonl hold each
    step once, and everything equals an uninterrupted run's."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--lr_decay_iters=16", "--eval_interval=8", f"--optimizer={optimizer}"]
    run_train(straight, small_shards, "--max_iters=16", *common)
    run_train(split, small_shards, "--max_iters=8", *common)
    at_step_8 = (split / "ckpt.pt").read_bytes()
    for crash in (False, True):
        run_train(split, small_shards, "--max_iters=16", "--init_from=resume", *common)
        a, b = read_log(straight), read_log(split)
        assert [r["step"] for r in b] == list(range(1, 17)) and [e["step"] for e in read_log(split, "eval.jsonl")] \
            == [0, 8, 16]
        assert [(r["loss"], r["ce"], r["mtp"], r["balance"]) for r in a] == \
            [(r["loss"], r["ce"], r["mtp"], r["balance"]) for r in b]
        ca, cb = load(straight), load(split)
        assert ca["model"].keys() == cb["model"].keys()
        for k in ca["model"]:
            assert torch.equal(ca["model"][k], cb["model"][k]), k  # weights AND expert biases, bit for bit
        assert ca["data"] == cb["data"] and ca["tokens"] == cb["tokens"]
        (split / "ckpt.pt").write_bytes(at_step_8)  # as if it had died after logging step 16, before its checkpoint


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_two_processes_match_single_process(tmp_path, small_shards, optimizer):
    """Muon too: every rank orthogonalises the same all-reduced gradients, so the ranks stay identical."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["--max_iters=6", "--lr_decay_iters=6", "--eval_interval=100", f"--optimizer={optimizer}"]
    run_train(single, small_shards, *common)  # batch 4 x 2 accumulation steps
    p = run_train(ddp, small_shards, *common, launch=TORCHRUN)  # 2 ranks x batch 4: the same 8 windows per step
    assert "tokens per step: 512 = 4 x 64 x 2 processes x 1 accumulation steps" in p.stdout
    assert [r["loss"] for r in read_log(ddp)] == pytest.approx([r["loss"] for r in read_log(single)], rel=1e-4)
    cs, cd = load(ddp), load(single)  # the ranks agreed at the checkpoint (train.py compares their fingerprints)
    for k in cs["model"]:
        torch.testing.assert_close(cs["model"][k], cd["model"][k], rtol=1e-3, atol=1e-4)
        if k.endswith("gate.bias"):
            assert cs["model"][k].abs().sum() > 0 and torch.equal(cs["model"][k], cd["model"][k]), k  # same counts



# One process, one gloo rank: train.py's DDP teardown, then the gloo worker threads still alive (counted by name).
DDP_TEARDOWN = """import glob, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from model import init_distributed
def workers():
    return sum(open(f).read().strip() == "pt_gloo_runloop" for f in glob.glob("/proc/self/task/*/comm"))
init_distributed("cpu")
model = DDP(torch.nn.Linear(4, 4))
model(torch.ones(2, 4)).sum().backward()
before = workers()
del model
dist.destroy_process_group()
print(before, workers())
"""


def test_ddp_teardown_joins_the_gloo_threads():
    """After train.py's teardown (del the DDP wrapper, destroy_process_group) no gloo worker thread is left: one
    alive at interpreter exit may free a finished collective's tensor there, needs the GIL and aborts the process
    (SIGABRT, 'terminate called without an active exception'). model.init_distributed imports
    torch.distributed.nn.functional before the group exists; imported later (by DDP), its default arguments hold it."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = ok(run("-c", DDP_TEARDOWN, timeout=120, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port)))
    before, after = map(int, p.stdout.split())
    if before == 0:
        pytest.skip("this torch does not name gloo's worker threads pt_gloo_runloop")
    assert after == 0, f"{after} gloo worker threads outlived destroy_process_group"

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
    run_train(tmp_path, small_shards, "--max_iters=12", "--eval_interval=100", "--learning_rate=1e-3", "--min_lr=1e-4",
              "--warmup_iters=3", "--lr_decay_iters=11", f"--lr_schedule={schedule}", "--wsd_decay_frac=0.5")
    assert _C[4] == pytest.approx(5.5e-4) and _C[0] == pytest.approx(1e-3)  # half way, and the top, of the cosine
    assert [r["lr"] for r in read_log(tmp_path)] == pytest.approx(EXPECTED_LR[schedule], rel=1e-12)


def test_grad_clip_zero_means_off(tmp_path, small_shards):
    """grad_clip=0 trains exactly like a clip that never bites (1e9), and the loss falls; before, 0 clipped every
    gradient to norm 0, so the model never moved. The logged grad norm is the real one either way."""
    for clip in ("0.0", "1e9"):
        run_train(tmp_path / clip, small_shards, f"--grad_clip={clip}", "--max_iters=6", "--lr_decay_iters=6",
                  "--eval_interval=100")
    off, huge = read_log(tmp_path / "0.0"), read_log(tmp_path / "1e9")
    assert [(r["loss"], r["grad_norm"]) for r in off] == [(r["loss"], r["grad_norm"]) for r in huge]
    assert all(0 < r["grad_norm"] < 1e9 for r in off) and off[-1]["ce"] < off[0]["ce"] - 0.03, off  # 6.25 -> 6.18 here


def test_non_finite_loss_stops_without_checkpoint(tmp_path, small_shards):
    p = run_train(tmp_path, small_shards, "--max_iters=20", "--learning_rate=1e30", "--warmup_iters=0",
                  "--grad_clip=0.0", "--eval_interval=1000", "--log_interval=5", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and not (tmp_path / "ckpt.pt").exists()
    assert "non-finite loss at step" in p.stderr.strip().splitlines()[-1]


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
    "n_activated_experts_0": (["--n_activated_experts=0"], ["n_activated_experts"]),
    "compile_without_bf16": (["--compile=True", "--dtype=float32"], ["needs dtype='bfloat16'"]),
    "no_checkpoint": (["--init_from=resume", "--out_dir={tmp}/empty"], ["init_from='resume' but there is no checkpoint"]),
    "batch_not_divisible": (["--total_batch_size=500"], ["total_batch_size=500 is not a multiple"]),
    "unknown_optimizer": (["--optimizer=sgd"], ["optimizer must be one of ('adamw', 'muon'), not 'sgd'"]),
    "resume_with_other_optimizer": (["--init_from=resume", "--optimizer=muon"],
                                    ["optimizer state (optimizer='adamw') does not fit", "resume with optimizer='adamw'"]),
    "negative_grad_clip": (["--grad_clip=-1.0"], ["grad_clip must be >= 0 (0 turns clipping off), got -1.0"]),
    "float16": (["--dtype=float16"], ["dtype='float16' is not supported for training", "use dtype='bfloat16'"]),
    **{f"{k}_0": ([f"--{k}=0"], [f"{k} must be at least 1, got 0"]) for k in ("eval_interval", "batch_size",
                                                                              "log_interval")},
    "eval_iters_negative": (["--eval_iters=-1"], ["eval_iters must be >= 0, got -1"]),  # 0: the whole val split
    "unknown_lr_schedule": (["--lr_schedule=linear"], ["lr_schedule must be one of ('cosine', 'wsd'), not 'linear'"]),
    "bad_init_from": (["--init_from=gpt2"], ["init_from must be 'scratch', 'resume' or a pretrained out_dir",
                                              "not 'gpt2'"]),
    "device_gpu": (["--device=gpu"], ["device must be 'cpu', 'cuda' or 'cuda:N', not 'gpu'"]),
    "device_cuda_without_cuda": (["--device=cuda"], ["device='cuda' but this PyTorch", "sees no CUDA GPU"]),
    "prompt_beyond_vocab": (["--sample_tokens=4"], ["sample_prompt encodes to token id", "vocab_size is 512"]),
    "hellaswag_missing_file": (["--hellaswag_interval=1", "--hellaswag_path={tmp}/none.jsonl"], ["no HellaSwag file at"]),
}


@pytest.mark.parametrize("case", sorted(CLEAR_ERRORS))
def test_clear_errors(case, tmp_path, small_shards, trained_tiny):
    """A user mistake stops train.py with one line and exit 1, before it writes anything: the run's out_dir is
    left as it was (here: a trained checkpoint and its logs, byte for byte)."""
    if case == "device_cuda_without_cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args, expected = CLEAR_ERRORS[case]
    out = shutil.copytree(trained_tiny, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    p = run_train(out, small_shards, "--max_iters=4", *[a.replace("{tmp}", str(tmp_path)) for a in args], check=False)
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
    p = run_train(out, shards, "--vocab_size=50304", "--max_iters=2", "--eval_interval=2", "--hellaswag_interval=2",
                  "--sample_tokens=4", launch=[*TORCHRUN, script], **env)
    assert [line.split()[0] for line in downloads(tmp_path)] == ["0"]  # one download, by rank 0
    evals = read_log(out, "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2] and all(0 <= e["hellaswag_acc"] <= 1 for e in evals)
    assert p.stdout.count("(n=8)") == 2 and "done: 2 steps" in p.stdout
    assert cached_hellaswag(tmp_path) == ["hellaswag_val.jsonl"]
    assert (tmp_path / "cache/nanodeepseek/hellaswag/hellaswag_val.jsonl").read_bytes() == \
        (tmp_path / "standin_hellaswag.jsonl").read_bytes()


def test_torchrun_with_hellaswag_offline_stops_every_rank_in_one_line(tmp_path, shards):
    """Offline with HellaSwag on and no cached file: rank 0's failed download is every rank's error, at start-up,
    in one line; no rank waits forever for rank 0 and nothing is written."""
    script, env = hellaswag_standin(tmp_path, n_items=0)
    out = tmp_path / "out"
    p = run_train(out, shards, "--vocab_size=50304", "--max_iters=2", "--hellaswag_interval=2",
                  launch=[*TORCHRUN, script], check=False, timeout=300, **env)
    assert p.returncode != 0 and "[rank0]: Traceback" not in p.stderr and "[rank1]: Traceback" not in p.stderr
    assert len(downloads(tmp_path)) == 1
    stops = [line.split("train.py: error: ", 1)[1] for line in p.stderr.splitlines() if "train.py: error: " in line]
    assert len(stops) == 2 and stops[0] == stops[1], p.stderr[-3000:]  # both ranks ("[rankN]: " first), one line
    assert "cannot download HellaSwag" in stops[0] and "--data_path" in stops[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "config").glob("*.py")
                                           if not p.name.startswith("grpo_")))  # grpo.py's: test_grpo.py
def test_config_files_are_valid(config, tmp_path):
    """Every shipped config parses (known keys, right types) and builds a valid ModelConfig: a pretraining config
    gets as far as the data, which is missing here. An SFT config gets a stand-in pretrained checkpoint of the
    context length it expects: sft_tiny then runs its step-0 eval offline, sft_fineweb stops at its Hub data."""
    args = [f"config/{config}", f"--data_dir={tmp_path / 'none'}", "--device=cpu", "--dtype=float32",
            "--compile=False", f"--out_dir={tmp_path / 'out'}"]
    if config.startswith("sft_"):
        seq = {"sft_tiny.py": 128, "sft_fineweb.py": 1024}[config]
        base = save_ckpt(tmp_path / "base", tiny_model(0, vocab_size=50304, max_seq_len=seq))
        args += [f"--init_from={base}", "--max_iters=0", "--eval_iters=1", "--chat_eval_interval=0"]
    p = run_forked("train.py", *args, timeout=300, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    if config == "sft_tiny.py":
        assert p.returncode == 0 and "done: 0 steps" in p.stdout, p.stderr[-1000:]
    elif config == "sft_fineweb.py":
        assert p.returncode == 1 and "HuggingFaceTB/smol-smoltalk" in last and "chat_data='tasks'" in last, last
    else:
        assert p.returncode == 1 and "meta.json missing" in last, p.stderr[-500:]


def test_help_lists_every_setting():
    p = ok(run_forked("train.py", "--help"))
    assert "--bias_update_speed=0.001" in p.stdout and "--kv_lora_rank=256" in p.stdout and "--yarn=False" in p.stdout


# python nan_on_rank_1.py train.py ARGS: train.py with the training loss of rank 1 (only) made NaN from its third
# forward on. Each rank writes the message it stops with to rank<R>.txt and waits for the other at a barrier, so
# that torchrun (which kills the other workers once one exits) cannot cut a rank off before it has reported.
NAN_ON_RANK_1 = """import os, runpy, sys
sys.path.insert(0, os.getcwd())
import model
import torch.distributed as dist
rank = os.environ["RANK"]
if rank == "1":
    forward, calls = model.Transformer.forward, []
    def poisoned(self, idx, targets=None, **kw):
        logits, parts = forward(self, idx, targets, **kw)
        if parts is not None and self.training:
            calls.append(1)
            if len(calls) > 2:
                parts["ce"] = parts["ce"] * float("nan")
        return logits, parts
    model.Transformer.forward = poisoned
sys.argv = sys.argv[1:]
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
    p = run_train(tmp_path / "out", small_shards, "--max_iters=10", "--eval_interval=100", launch=[*TORCHRUN, script],
                  check=False, timeout=150, REPORT_DIR=str(tmp_path))
    assert p.returncode != 0 and "[rank0]: Traceback" not in p.stderr and "[rank1]: Traceback" not in p.stderr
    stops = [(tmp_path / f"rank{r}.txt").read_text() if (tmp_path / f"rank{r}.txt").exists() else None for r in (0, 1)]
    assert stops[0] == stops[1] and "train.py: error: non-finite loss at step 2;" in stops[0], stops
    assert not (tmp_path / "out" / "ckpt.pt").exists()
