"""
One prepared GPU check (issue 31, item 4): everything a GPU session must show, in one command, one JSON report.

    python3 dev/gpu_check.py --out=gpu_check.json       # on a CUDA machine: meant to take under 8 minutes on an H100
    python dev/gpu_check.py --dry_run --out=r.json      # any CPU: the same steps at tiny size (tests/test_gpu_check.py)

Under the device tool (15 minutes of device time in all; plain `python3` holds PyTorch there), one call:

    run(command="PYTHONUNBUFFERED=1 python3 dev/gpu_check.py --out=$OUT/gpu_check.json", timeout_s=540)

It brings back $OUT/gpu_check.json (the report) and $OUT/gpu_check.log (every command's output). Nothing comes
from the network or from outside the repository: the tokenizer (data/gpt2.tiktoken.gz) and the FineWeb-Edu sample
(data/fineweb_edu_sample.jsonl.gz) ship with the repository. --budget_s (default 480) bounds the whole run: each
command's limit (LIMIT_S) is cut to what is left, so the report is written before the tool's timeout_s; it is
also rewritten after every step. After a failure, --only=bench,memory reruns some steps (sample, export and
hf_logits need train's checkpoint, so train runs with them). The time figures below are estimates: this script
was written in a session without a GPU, so its first GPU run is also its first timing.

The steps, each recorded with ok, its wall seconds, its key numbers, or the one-line error it stopped with (a
failed step does not stop the next one):
  tests     the tests whose outcome depends on a CUDA GPU: the repository marks none as GPU-only, so every test
            whose id says 'cuda' (pytest -k cuda: 9 tests at this writing, the grouped_mm guard's stand-ins,
            sdpa_path on every training config and the device-error tests);
            passed / failed / skipped counts and the failed ids (from pytest's junit XML)
  bench     bench.py on config/train_fineweb.py (bf16, compiled, batch 16 x 1024), its --json folded in: tokens/s
            and MFU against the FLOP-matched dense baseline, decode tokens/s with and without the latent cache,
            and its lines naming the MoE's grouped_mm path and the SDPA kernel MLA's attention gets (model.sdpa_path:
            CUDNN_ATTENTION or EFFICIENT_ATTENTION expected for qk 96 / v 64; MATH fails the step)
  memory    bench.py --memory's estimate at the config's batch_size next to torch.cuda.max_memory_allocated of
            real training steps at that batch size: eager (what the estimate models) here, compiled from bench
  train     200 train.py steps of the fineweb config on shards made from the bundled sample (prepare_sample
            into a temp dir; ~69k training tokens, so the run sees them ~95 times: a systems check, not a result).
            Budget: 200 steps x 32,768 tokens (batch 16 x 1024, 2 accumulation steps) = 6.6M tokens, ~65 s at
            100k tok/s (MFU ~12% at 1.16 GFLOP/token), + ~1 min compiling + 2 checkpoints of ~7 GB; warmup 20 and
            a cosine to step 200, so the losses move. Losses, val losses, tok/s and MFU from log.jsonl
  sample    sample.py on the checkpoint, greedy (fp32), plain and self-speculative (MTP drafts; bench.py has no
            speculative option): decode tok/s of each, drafts accepted, and the two texts must be equal
  export    export.py to a Hugging Face folder (fp32)
  hf_logits transformers' DeepseekV3ForCausalLM from that folder against our model on the GPU, fp32 with TF32
            off, on real text (tests/test_export.py's comparison): max |logit diff| (<= 1e-3; 1e-4 on the CPU),
            top-1 agreement, no missing/unexpected weights, greedy generation equal

--dry_run: config/train_tiny.py's model, a few steps, device cpu, float32 and no compile (bf16 compile is
impossible on the CPU), the guard's tests only; about a minute on the dev CPU. Without CUDA there is no
max_memory_allocated and no MFU: those numbers are null.
"""
import argparse
import gc
import importlib.metadata
import io
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

# what each step runs: on the GPU, and at tiny size on a CPU (--dry_run)
GPU = dict(
    tests=["tests", "-k", "cuda"],
    bench=["config/train_fineweb.py"],
    memory=["config/train_fineweb.py"],
    train=["config/train_fineweb.py", "--batch_size=16", "--total_batch_size=32768", "--max_iters=200",
           "--eval_interval=100", "--eval_iters=10", "--log_interval=10", "--warmup_iters=20",
           "--lr_decay_iters=200", "--hellaswag_interval=0"],
    sample=["--dtype=float32", "--max_new_tokens=100"],
    logits_tokens=256, logits_tol=1e-3)
DRY = dict(
    tests=["tests/test_gpu_guard.py", "-k", "cuda"],
    bench=["config/train_tiny.py", "--device=cpu", "--dtype=float32", "--compile=False", "--batch_size=2",
           "--warmup=1", "--steps=1", "--rounds=1", "--decode_tokens=4"],
    memory=["config/train_tiny.py", "--memory_seq_len=16", "--batch_size=1"],
    train=["config/train_tiny.py", "--device=cpu", "--dtype=float32", "--compile=False", "--batch_size=2",
           "--total_batch_size=512", "--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--log_interval=1",
           "--warmup_iters=1", "--lr_decay_iters=4", "--sample_tokens=4"],
    sample=["--device=cpu", "--dtype=float32", "--max_new_tokens=12"],
    logits_tokens=64, logits_tol=1e-4)
LIMIT_S = dict(tests=120, bench=210, memory=120, train=270, sample=90, export=90)  # seconds, cut to the budget
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1"}
GB = 1e9


class StepError(Exception):
    """A step's one-line failure, with whatever numbers it had already (recorded beside the error)."""

    def __init__(self, message, **data):
        super().__init__(message)
        self.data = data


def last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:400] if lines else "(no output)"


def python(ctx, name, *args):
    """`python ARGS` in the repository root, within LIMIT_S[name] and the budget; returns (stdout, stderr), both
    also appended to the log. A non-zero exit or a timeout raises StepError with the last line it printed."""
    left = ctx.deadline - time.time()
    if left < 15:
        raise StepError(f"not started: only {left:.0f} s of --budget_s left")
    limit = min(LIMIT_S[name], left)
    outs = [ctx.tmp / f"{name}_{len(ctx.runs)}.{s}" for s in ("out", "err")]
    ctx.runs.append(outs)
    cmd = [sys.executable, *map(str, args)]
    with open(outs[0], "w") as so, open(outs[1], "w") as se:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=so, stderr=se, env=ENV, start_new_session=True)
        try:
            p.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            timed_out = True
    out, err = (f.read_text(errors="replace") for f in outs)
    with open(ctx.log_path, "a") as log:
        log.write(f"\n$ python {' '.join(map(str, args))}   (exit {p.returncode})\n{out}\n[stderr]\n{err}\n")
    if timed_out:
        raise StepError(f"python {args[0]}: stopped at its limit of {limit:.0f} s (LIMIT_S or --budget_s)")
    if p.returncode:
        raise StepError(f"python {args[0]} exited {p.returncode}: {last_line(err or out)}")
    return out, err


# -----------------------------------------------------------------------------------------------------------------
# the steps: each takes the run's context and returns its key numbers (a dict), or raises

def tests(ctx):
    """pytest on the CUDA-dependent tests; counts from its junit XML."""
    xml = ctx.tmp / "junit.xml"
    try:
        python(ctx, "tests", "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *ctx.size["tests"])
        error = None
    except StepError as e:
        error = str(e)
    if not xml.exists():
        raise StepError(error or "pytest wrote no junit XML")
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    failed = []
    for suite in ET.parse(xml).getroot().iter("testsuite"):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
        failed += [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                   if c.find("failure") is not None or c.find("error") is not None]
    res = dict(selection=" ".join(ctx.size["tests"]), passed=counts["tests"] - counts["failures"] - counts["errors"]
               - counts["skipped"], failed=counts["failures"], errors=counts["errors"], skipped=counts["skipped"],
               failed_ids=failed)
    if error or failed or not counts["tests"]:
        raise StepError(error or "no test collected", **res)
    return res


def bench(ctx):
    """bench.py's training and decode numbers, its JSON folded in."""
    path = ctx.tmp / "bench.json"
    out, _ = python(ctx, "bench", "bench.py", *ctx.size["bench"], f"--json={path}")
    res = json.loads(path.read_text())
    ctx.bench = res
    ours, base, dec = res["ours"], res["baseline"], res["decode"]
    if not (ours["tok_per_s"] > 0 and base["tok_per_s"] > 0 and dec["cached_tok_per_s"] > 0):
        raise StepError("a tokens/s figure is not positive", json=res)
    rec = dict(tok_per_s=ours["tok_per_s"], mfu=ours["mfu"], baseline_tok_per_s=base["tok_per_s"],
               baseline_mfu=base["mfu"], ratio=res["ratio"], ratio_flop_normalised=res["ratio_flop_normalised"],
               decode_cached_tok_per_s=dec["cached_tok_per_s"], decode_uncached_tok_per_s=dec["uncached_tok_per_s"],
               decode_speedup=dec["cached_tok_per_s"] / dec["uncached_tok_per_s"],
               peak_mem_gb=ours["peak_mem_gb"], compile_warmup_s=ours["warmup_s"],
               grouped_mm=next((line for line in out.splitlines() if line.startswith("grouped_mm:")), None),
               sdpa=next((line for line in out.splitlines() if line.startswith("sdpa:")), None),
               json=res)
    if rec["sdpa"] is None or ": MATH" in rec["sdpa"]:  # the figures above would then time the unfused kernel
        raise StepError(f"MLA's attention is not on a fused SDPA kernel: {rec['sdpa']}", **rec)
    return rec


def measured_peak(cfg, batch_size, dtype, device):
    """torch.cuda.max_memory_allocated of two eager AdamW training steps at batch_size x max_seq_len, everything
    counted (weights, gradients, optimizer state, activations), in bytes; None on the CPU (the steps still run)."""
    from model import Transformer, autocast_context
    from optim import build_optimizer
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    opt = build_optimizer(model, "adamw", 1e-4, 0.1, (0.9, 0.95))
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.max_seq_len + 1), device=device)
    for _ in range(2):  # the second step holds the optimizer state the first one made
        with autocast_context(device.type, dtype):
            _, parts = model(x[:, :-1], x[:, 1:])
        (parts["ce"] + parts["mtp"].sum() + parts["balance"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_expert_bias(1e-3)
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    del model, opt, x, parts
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return peak


def memory(ctx):
    """bench.py --memory's estimate against a measured peak at the same batch size."""
    from configurator import configure
    from dataclasses import fields
    from model import ModelConfig
    path = ctx.tmp / "memory.json"
    python(ctx, "memory", "bench.py", *ctx.size["memory"], "--memory", f"--json={path}")
    est = json.loads(path.read_text())["memory"]
    adamw = est["optimizers"]["adamw"]
    settings = configure({f.name: f.default for f in fields(ModelConfig)}, [ctx.size["memory"][0]], quiet=True,
                         skip_unknown_file_keys=True)
    cfg = ModelConfig(**settings)
    B = est["batch_size"]
    peak = measured_peak(cfg, B, est["dtype"], ctx.device)
    bench_res = getattr(ctx, "bench", None)  # its compiled steps, at its batch size, above the weights
    compiled = (bench_res["ours"]["peak_mem_gb"] + adamw["params"] / GB
                if bench_res and bench_res["batch_size"] == B and bench_res["ours"]["peak_mem_gb"] else None)
    res = dict(batch_size=B, seq_len=est["seq_len"], dtype=est["dtype"], estimated_gb=adamw["total"] / GB,
               estimated_muon_gb=est["optimizers"]["muon"]["total"] / GB, activations_gb=est["activations"] / GB,
               state_gb=(adamw["params"] + adamw["grads"] + adamw["optimizer"]) / GB,
               fits_batch_size=adamw["fits"], measured_eager_gb=peak / GB if peak else None,
               measured_over_estimated=peak / adamw["total"] if peak else None, measured_compiled_gb=compiled)
    if not res["estimated_gb"] > res["state_gb"] > 0:
        raise StepError("the estimate is not above the training state", **res)
    return res


def train(ctx):
    """prepare_sample's shards in a temp dir, then train.py; its log.jsonl and eval.jsonl summarised."""
    from data.fineweb import prepare_sample
    shards, run = ctx.tmp / "shards", ctx.tmp / "run"
    prepare_sample(shards)
    python(ctx, "train", "train.py", *ctx.size["train"], f"--data_dir={shards}", f"--out_dir={run}")
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    warm = logs[1:] or logs  # the first record's time includes compiling
    mfus = [r["mfu"] for r in warm if r["mfu"] is not None]
    res = dict(steps=logs[-1]["step"], tokens=logs[-1]["tokens"], train_time_s=logs[-1]["time"],
               loss_first=logs[0]["loss"], loss_last=logs[-1]["loss"], loss_min=min(r["loss"] for r in logs),
               losses={r["step"]: round(r["loss"], 4) for r in logs},
               val_loss={e["step"]: e["val_loss"] for e in evals},
               tok_per_s=statistics.median(r["tok_per_s"] for r in warm), first_log_tok_per_s=logs[0]["tok_per_s"],
               mfu=statistics.median(mfus) if mfus else None, settings=" ".join(ctx.size["train"]))
    if getattr(ctx, "bench", None):  # the budget: these tokens at bench.py's rate
        res["seconds_at_bench_rate"] = res["tokens"] / ctx.bench["ours"]["tok_per_s"]
    if not all(math.isfinite(r["loss"]) for r in logs) or not (run / "ckpt.pt").exists():
        raise StepError("a non-finite loss or no checkpoint", **res)
    if not res["loss_last"] < res["loss_first"]:
        raise StepError("the loss did not go down", **res)
    ctx.run_dir = run
    return res


def need_checkpoint(ctx):
    run = getattr(ctx, "run_dir", None)
    if run is None:
        raise StepError("needs the train step's checkpoint (train failed or did not run)")
    return run


def decode_stats(err):
    """sample.py --stats's decode tokens/s and, when speculative, accepted/drafted, from its stderr."""
    tok = re.search(r"decode: (\d+) tokens in ([\d.]+) s", err)
    acc = re.search(r"accepted (\d+)/(\d+) drafts", err)
    return dict(decode_tokens=int(tok[1]), decode_tok_per_s=int(tok[1]) / max(float(tok[2]), 1e-9),
                accepted=int(acc[1]) if acc else None, drafted=int(acc[2]) if acc else None)


def sample(ctx):
    """Greedy sample.py, plain and speculative: speeds, acceptance, identical texts."""
    common = ["sample.py", f"--out_dir={need_checkpoint(ctx)}", "--start=The mitochondria is", "--num_samples=1",
              "--temperature=0", "--stop_at_eot=False", "--stats=True", *ctx.size["sample"]]
    plain_out, plain_err = python(ctx, "sample", *common)
    spec_out, spec_err = python(ctx, "sample", *common, "--speculative=True")
    plain, spec = decode_stats(plain_err), decode_stats(spec_err)
    res = dict(plain=plain, speculative=spec, speculative_speedup=spec["decode_tok_per_s"] / plain["decode_tok_per_s"],
               acceptance=spec["accepted"] / max(spec["drafted"], 1), same_text=plain_out == spec_out,
               text=plain_out.split("\n---------------")[0][:400])
    if not res["same_text"]:
        raise StepError("greedy speculative text differs from plain greedy text", **res)
    return res


def export(ctx):
    """export.py to a Hugging Face folder."""
    hf = ctx.tmp / "hf"
    _, err = python(ctx, "export", "export.py", f"--out_dir={need_checkpoint(ctx)}", f"--hf_dir={hf}")
    ctx.hf_dir = hf
    return dict(files={f.name: f.stat().st_size for f in sorted(hf.iterdir())}, line=last_line(err))


def real_tokens(n):
    """The first n tokens of the bundled FineWeb-Edu sample's documents, as build-nanogpt tokenizes them."""
    from data.fineweb import SAMPLE_FILE, file_documents, tokenize
    ids = []
    for text in file_documents(SAMPLE_FILE):
        ids += tokenize(text).tolist()
        if len(ids) >= n:
            return ids[:n]
    raise StepError(f"the bundled sample has fewer than {n} tokens")


def load_hf(path, device):
    """DeepseekV3ForCausalLM in fp32/eager from path, and what its loading reported missing, unexpected or
    mismatched (in its loading info or in transformers' log), as tests/test_export.py loads it."""
    from transformers import DeepseekV3ForCausalLM
    buf, logger = io.StringIO(), logging.getLogger("transformers")
    handler = logging.StreamHandler(buf)
    logger.addHandler(handler)
    try:
        hf, info = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                         output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    bad = [f"{k}: {info[k]}" for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]]
    bad += [line for line in buf.getvalue().splitlines() if re.search("UNEXPECTED|MISSING|newly initialized", line)]
    return hf.to(device).eval(), bad


def hf_logits(ctx):
    """transformers' logits against ours on ctx.device, fp32 (TF32 off), and greedy generation."""
    from checkpoint import load_model
    from sample import generate_tokens
    run, hf_dir = need_checkpoint(ctx), getattr(ctx, "hf_dir", None)
    if hf_dir is None:
        raise StepError("needs the export step's folder (export failed or did not run)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ours, _ = load_model(str(run), ctx.device)
    hf, bad = load_hf(hf_dir, ctx.device)
    T = min(ctx.size["logits_tokens"], ours.cfg.max_seq_len)
    idx = torch.tensor([real_tokens(T)], device=ctx.device)
    with torch.no_grad():
        a, b = ours(idx)[0].float(), hf(idx).logits.float()
        prompt = idx[:, :16]
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                             pad_token_id=50256)[0, 16:].tolist()
    mine = list(generate_tokens(ours, prompt[0].tolist(), 8, temperature=0, eot=50256))  # HF stops at its eos too
    res = dict(tokens=T, max_abs_diff=(a - b).abs().max().item(), max_abs_logit=a.abs().max().item(),
               top1_agreement=(a.argmax(-1) == b.argmax(-1)).float().mean().item(), tolerance=ctx.size["logits_tol"],
               greedy_equal=mine == theirs, loading_problems=bad)
    del ours, hf, a, b
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    if bad or not res["max_abs_diff"] <= res["tolerance"] or not res["greedy_equal"]:
        raise StepError(f"transformers differs: max |logit diff| {res['max_abs_diff']:.3g} (tolerance "
                        f"{res['tolerance']:g}), greedy equal {res['greedy_equal']}, loading problems {len(bad)}",
                        **res)
    return res


STEPS = [tests, bench, memory, train, sample, export, hf_logits]


# -----------------------------------------------------------------------------------------------------------------

def environment(device):
    """What ran the check: machine, GPU, versions, and the commit if the tree has its .git."""
    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                host=platform.node(), cpus=os.cpu_count())
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device),
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    gpu_memory_gb=torch.cuda.get_device_properties(device).total_memory / GB)
    try:
        info["transformers"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        info["transformers"] = None
    try:  # the device tool sends the working tree, perhaps without .git
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        info["commit"] = git.stdout.strip() if git.returncode == 0 else None
    except OSError:
        info["commit"] = None
    return info


def run_step(step, ctx):
    """One step, timed: {'ok', 'seconds', its numbers} or {'ok': False, 'seconds', 'error', what it had}."""
    print(f"gpu_check: {step.__name__} ...", flush=True)
    t0 = time.time()
    try:
        if ctx.deadline - t0 < 15:
            raise StepError(f"not started: only {ctx.deadline - t0:.0f} s of --budget_s left")
        rec = dict(ok=True, **step(ctx))
    except StepError as e:
        rec = dict(ok=False, error=str(e), **e.data)
    except (Exception, SystemExit) as e:  # a bug, a library's error, a UserError's exit: one line, and go on
        first = str(e).strip().splitlines()[:1] or [""]
        rec = dict(ok=False, error=f"{type(e).__name__}: {first[0][:400]}")
    rec = dict(ok=rec.pop("ok"), seconds=round(time.time() - t0, 2), **rec)
    print(f"gpu_check: {step.__name__} {'ok' if rec['ok'] else 'FAILED: ' + rec['error']} ({rec['seconds']:.1f} s)",
          flush=True)
    return rec


def write(path, report):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.json", help="the JSON report (a .log of all output goes beside it)")
    p.add_argument("--dry_run", action="store_true", help="tiny sizes on the CPU: what CI runs")
    p.add_argument("--budget_s", type=float, default=480, help="seconds for all steps together (default %(default)s)")
    p.add_argument("--only", default="", help="comma-separated steps to run (train runs too for its dependents)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (shards, checkpoint, HF folder)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    names = [s.__name__ for s in STEPS]
    only = set(filter(None, args.only.split(",")))
    if only - set(names):
        sys.exit(f"gpu_check.py: error: unknown step(s) {sorted(only - set(names))}: choose from {', '.join(names)}")
    if only & {"sample", "export", "hf_logits"}:
        only |= {"train"} | ({"export"} if "hf_logits" in only else set())
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: this PyTorch sees no CUDA GPU: use --dry_run on a CPU")
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ctx = SimpleNamespace(size=DRY if args.dry_run else GPU, device=torch.device("cpu" if args.dry_run else "cuda"),
                          tmp=tmp, runs=[], log_path=out.with_suffix(".log"), deadline=time.time() + args.budget_s)
    ctx.log_path.write_text("")
    report = dict(ok=False, dry_run=args.dry_run, seconds=None, environment=environment(ctx.device), steps={})
    t0 = time.time()
    for step in STEPS:
        if not only or step.__name__ in only:
            report["steps"][step.__name__] = run_step(step, ctx)
            write(out, report)
    report.update(ok=all(r["ok"] for r in report["steps"].values()), seconds=round(time.time() - t0, 1))
    write(out, report)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"gpu_check: {'all ok' if report['ok'] else 'FAILED'} in {report['seconds']} s; wrote {out}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
