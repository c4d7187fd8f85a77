"""train.py --fsdp=True on 2 gloo ranks (CPU, fp32), run as users run it: the same losses as one process, AdamW and
Muon; exact resume FSDP -> FSDP, into DDP and back; the checkpoint read by sample.py and export.py; every eval
(val loss, HellaSwag, the chat eval, the sample) finishing on every rank; one-line refusals."""

import pytest
import torch

from conftest import TORCHRUN, hellaswag_standin, ok, one_line_error, run_forked, train_args
from test_train import load, read_log, run_train, shards, small_shards  # noqa: F401 (fixtures)

STEPS = ["--max_iters=8", "--lr_decay_iters=8", "--eval_interval=100"]


def fsdp(out_dir, data_dir, *args, **kw):
    """train.py --fsdp=True on 2 ranks (torchrun's flags first, then the script, then the settings)."""
    return run_train(out_dir, data_dir, "--fsdp=True", *args, launch=TORCHRUN, **kw)


def losses(out_dir):
    return [r["loss"] for r in read_log(out_dir)]


@pytest.fixture(scope="module")
def single(small_shards, tmp_path_factory):
    """One process, batch 4 x 2 accumulation steps, 8 AdamW steps: the reference."""
    out = tmp_path_factory.mktemp("single")
    run_train(out, small_shards, *STEPS)
    return out


def test_fsdp_equals_one_process_and_resumes_exactly_into_fsdp_and_ddp(tmp_path, small_shards, single):
    """2 ranks x batch 2 x 2 accumulation steps (the gradient reduce-scatter on the second only): the same 8 windows
    a step as one process. Straight: every loss within 1e-5 of one process's, and the weights. Then one run in four
    parts: FSDP to step 2, FSDP resumed to 4 (equal to the straight run bit for bit), DDP resumed from that FSDP
    checkpoint to 6, FSDP resumed from DDP's to 8: every loss still within 1e-5, each step logged once."""
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    p = fsdp(straight, small_shards, *STEPS, "--batch_size=2")
    assert "tokens per step: 512 = 2 x 64 x 2 processes x 2 accumulation steps" in p.stdout
    assert losses(straight) == pytest.approx(losses(single), abs=1e-5)
    cf, cs = load(straight), load(single)  # the same single-file format: full tensors, every key
    assert cf["model"].keys() == cs["model"].keys() and len(cf["data"]) == 2
    for k, v in cs["model"].items():
        torch.testing.assert_close(cf["model"][k], v, rtol=0, atol=1e-5)
    assert cf["optimizer"]["param_groups"] == cs["optimizer"]["param_groups"]

    split = ["--lr_decay_iters=8", "--eval_interval=2", "--batch_size=2"]
    fsdp(parts, small_shards, *split, "--max_iters=2")
    fsdp(parts, small_shards, *split, "--max_iters=4", "--init_from=resume")
    assert losses(parts) == losses(straight)[:4]
    run_train(parts, small_shards, *split, "--max_iters=6", "--init_from=resume", launch=TORCHRUN)  # DDP
    fsdp(parts, small_shards, *split, "--max_iters=8", "--init_from=resume")
    assert [r["step"] for r in read_log(parts)] == list(range(1, 9))
    assert losses(parts) == pytest.approx(losses(single), abs=1e-5)
    for k, v in load(parts)["model"].items():
        torch.testing.assert_close(v, cs["model"][k], rtol=0, atol=1e-5)


def test_fsdp_muon_equals_one_process(tmp_path, small_shards):
    """Muon on the shards: the expert stacks orthogonalised shard by shard (whole experts), the 2-D matrices
    gathered first (optim.orthogonalise)."""
    muon = ["--max_iters=4", "--lr_decay_iters=4", "--eval_interval=4", "--optimizer=muon"]
    run_train(tmp_path / "single", small_shards, *muon)
    fsdp(tmp_path / "fsdp", small_shards, *muon)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "single"), abs=1e-5)
    cf, cs = load(tmp_path / "fsdp"), load(tmp_path / "single")
    for k, v in cs["model"].items():
        torch.testing.assert_close(cf["model"][k], v, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def evaluated(shards, tmp_path_factory):
    """An FSDP run in bf16 (FSDP's mixed precision: bf16 blocks, fp32 gradient reduction) with every eval at steps
    0 and 2: val loss, HellaSwag (17 stand-in items: 16 scored, 8 a rank, so both run as many forwards), the chat
    eval and the sample. Before, rank 0 alone ran the chat eval and the sample, which hangs under FSDP."""
    tmp = tmp_path_factory.mktemp("evals")
    script, env = hellaswag_standin(tmp, n_items=17)
    out = tmp / "out"
    p = run_train(out, shards, "--vocab_size=50304", "--max_iters=2", "--eval_interval=2", "--hellaswag_interval=2",
                  "--chat_eval_interval=2", "--chat_eval_n=1", "--sample_tokens=4", "--dtype=bfloat16",
                  "--fsdp=True", launch=[*TORCHRUN, script], timeout=300, **env)
    return out, p


def test_fsdp_evals_finish_on_every_rank(evaluated):
    out, p = evaluated
    evals = read_log(out, "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2]
    for e in evals:
        assert 0 <= e["hellaswag_acc"] <= 1 and 10 < e["val_loss"] < 11.5 and "task_sort" in e, e
    assert p.stdout.count("(n=16)") == 2 and p.stdout.count("sample: ") == 2 and "done: 2 steps" in p.stdout
    ckpt = load(out)
    assert all(v.dtype == torch.float32 for k, v in ckpt["model"].items()), "fp32 master weights, not bf16 copies"


def test_fsdp_checkpoint_runs_in_sample_and_export(evaluated, tmp_path):
    out, _ = evaluated
    p = ok(run_forked("sample.py", f"--out_dir={out}", "--start=The cat", "--num_samples=1", "--max_new_tokens=4",
                      "--temperature=0", timeout=120))
    assert p.stdout.startswith("The cat") and len(p.stdout) > len("The cat")
    p = ok(run_forked("export.py", f"--out_dir={out}", f"--hf_dir={tmp_path / 'hf'}", timeout=120))
    assert "exported" in p.stderr
    assert (tmp_path / "hf" / "model.safetensors").stat().st_size > 0


@pytest.mark.parametrize("case", ["one_process", "lora"])
def test_fsdp_refusals_are_one_line(case, tmp_path, small_shards):
    """fsdp=True needs torchrun with 2+ processes, and does not take LoRA: one line before anything is built."""
    extra, expect = {"one_process": ([], "launch with torchrun --nproc_per_node=N (N >= 2)"),
                     "lora": (["--lora_rank=4", f"--init_from={tmp_path}"], "fsdp=True does not take LoRA")}[case]
    p = run_forked("train.py", *train_args(), f"--out_dir={tmp_path / 'out'}", f"--data_dir={small_shards}",
                   "--fsdp=True", *extra, timeout=120)
    assert expect in one_line_error(p, "train.py") and not (tmp_path / "out").exists()
