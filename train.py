"""
Train a DeepSeek-V3-style model. Single process:

    python train.py config/train_fineweb.py
    python train.py config/train_tiny.py --max_iters=100     # CPU smoke run

DDP on one node (or several, with torchrun's usual --nnodes/--node_rank/--master_addr flags):

    torchrun --standalone --nproc_per_node=8 train.py config/train_fineweb.py

Every setting below can be overridden by a config file or --key=value (see configurator.py, --help lists them).
"""
import contextlib
import inspect
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from configurator import configure, config_keys
from data.fineweb import DataError, ShardReader
from model import ModelConfig, Transformer, load_state

# -----------------------------------------------------------------------------------------------
# default settings (config/train_fineweb.py holds the real run)
# I/O
out_dir = 'out'
data_dir = 'data/fineweb_edu'    # folder of .npy token shards with their meta.json (data/fineweb.py)
init_from = 'scratch'            # 'scratch' | 'resume' (from out_dir/ckpt.pt)
eval_interval = 250              # steps between val evals (and checkpoints)
eval_iters = 20                  # val batches per eval: the same batches every time
always_save_checkpoint = True    # save at every eval, not only when val loss improves
log_interval = 10
sample_tokens = 32               # tokens sampled at each eval (rank 0), 0 = off
sample_prompt = 'The mitochondria is'
hellaswag_interval = 0           # steps between HellaSwag evals, 0 = off
hellaswag_path = ''              # '' = hellaswag.py's default (downloaded once into its cache)
hellaswag_limit = 0              # items per HellaSwag eval, 0 = all 10,042
wandb_log = False
wandb_project = 'nanodeepseek'
wandb_run_name = 'run'
# data / batch
batch_size = 16                  # sequences per micro-step per process
total_batch_size = 524288        # tokens per optimizer step; gradient accumulation = this / (batch_size*max_seq_len*world)
# AdamW and the learning-rate schedule
learning_rate = 6e-4
min_lr = 6e-5
max_iters = 19073
warmup_iters = 715
lr_decay_iters = 19073
lr_schedule = 'cosine'           # 'cosine' (warmup, cosine to min_lr) | 'wsd' (warmup, stable, linear decay)
wsd_decay_frac = 0.2             # WSD: the last fraction of lr_decay_iters decays linearly to min_lr
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# DeepSeek-V3 schedules
mtp_lambda_late = 0.1            # MTP weight after mtp_late_iter (V3: 0.3 -> 0.1 when LR decay starts)
mtp_late_iter = -1               # -1: keep mtp_lambda for the whole run
bias_update_speed = 1e-3         # gamma of the aux-loss-free balancer (0 freezes the expert bias)
bias_freeze_iter = -1            # V3 freezes the bias for the last tokens; -1: never
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'   # autocast dtype: 'bfloat16' | 'float32'
compile = torch.cuda.is_available()
seed = 1337
peak_flops = 0.0                 # for MFU; 0 = look the GPU up in PEAK_FLOPS
# model: every ModelConfig field is a setting too (defaults in model.py)
globals().update({f.name: f.default for f in fields(ModelConfig)})
# -----------------------------------------------------------------------------------------------

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "B200": 2250e12, "A100": 312e12, "A10G": 125e12,
              "L4": 121e12, "4090": 165e12}


def main():
    config = configure(config_keys(globals()), sys.argv[1:], description=__doc__)
    globals().update(config)
    if compile and dtype != "bfloat16":
        sys.exit("train.py: error: compile=True needs dtype='bfloat16': under torch.compile the MoE's grouped_mm "
                 "accepts bf16 only (or set compile=False)")
    try:
        train(config)
    except DataError as e:
        sys.exit(f"train.py: error: {e}")
    except ResumeError as e:
        sys.exit(f"train.py: error: {e}")


class ResumeError(Exception):
    pass


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    if lr_schedule == 'wsd':
        decay_start = int(lr_decay_iters * (1 - wsd_decay_frac))
        if it < decay_start:
            return learning_rate
        return learning_rate + (min_lr - learning_rate) * (it - decay_start) / (lr_decay_iters - decay_start)
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def save_checkpoint(path, ckpt):
    """Atomic: write a temp file, then rename over the old checkpoint (a crash mid-write keeps the old one)."""
    tmp = path + ".tmp"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fingerprint(model):
    """Per-tensor float64 sums (plain and of squares) of all parameters and expert biases: equal on every
    DDP rank iff the ranks agree (checked at each checkpoint; the DDP buffer trap would show up here)."""
    out = []
    for name, t in list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n.endswith("gate.bias")]:
        t = t.detach().double()
        out += [t.sum().item(), t.square().sum().item()]
    return out


def train(config):
    # ---- processes and devices --------------------------------------------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
        dev = f"cuda:{local_rank}" if device.startswith("cuda") else device
        if dev.startswith("cuda"):
            torch.cuda.set_device(dev)
    else:
        rank, world, dev = 0, 1, device
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device_type = "cuda" if dev.startswith("cuda") else "cpu"
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    autocast = (contextlib.nullcontext() if ptdtype == torch.float32
                else torch.autocast(device_type=device_type, dtype=ptdtype))

    cfg = ModelConfig(**{f.name: config[f.name] for f in fields(ModelConfig)})
    tokens_per_micro = batch_size * cfg.max_seq_len * world
    if total_batch_size % tokens_per_micro:
        raise DataError(f"total_batch_size={total_batch_size} is not a multiple of batch_size * max_seq_len * "
                        f"world_size = {tokens_per_micro}: change total_batch_size or batch_size")
    grad_accum = total_batch_size // tokens_per_micro
    log(f"tokens per step: {total_batch_size:,} = {batch_size} x {cfg.max_seq_len} x {world} processes x "
        f"{grad_accum} accumulation steps")

    train_data = ShardReader(data_dir, "train", batch_size, cfg.max_seq_len, rank, world, seed, cfg.vocab_size)
    val_data = ShardReader(data_dir, "val", batch_size, cfg.max_seq_len, rank, world, seed, cfg.vocab_size,
                           shuffle=False)

    # ---- model, optimizer, resume -----------------------------------------------------------
    model = Transformer(cfg).to(dev)
    raw_model = model
    optimizer = torch.optim.AdamW(raw_model.param_groups(weight_decay), lr=learning_rate, betas=(beta1, beta2),
                                  fused=True)  # one kernel for all tensors, CUDA and CPU (6x faster step on CPU)
    step, tokens_seen, best_val = 0, 0, float("inf")
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if init_from == "resume":
        if not os.path.isfile(ckpt_path):
            raise ResumeError(f"init_from='resume' but there is no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=dev, weights_only=False)
        diff = {k: (v, getattr(cfg, k, None)) for k, v in ckpt["model_config"].items() if getattr(cfg, k, None) != v}
        if diff:
            pretty = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ResumeError(f"{ckpt_path} was trained with another model config ({pretty}); resume with the same "
                              "model settings or use another out_dir")
        load_state(raw_model, ckpt["model"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        step, tokens_seen, best_val = ckpt["step"], ckpt["tokens"], ckpt["best_val_loss"]
        data_states = ckpt["data"]
        if len(data_states) != world:
            raise ResumeError(f"{ckpt_path} was written by {len(data_states)} processes, now there are {world}: "
                              "resume with the same number of processes to continue the data stream exactly")
        train_data.load_state_dict(data_states[rank])
        set_rng_state(ckpt["rng"])
        log(f"resumed from {ckpt_path} at step {step} ({tokens_seen:,} tokens)")
        del ckpt
    elif init_from != "scratch":
        raise ResumeError(f"init_from must be 'scratch' or 'resume', not {init_from!r}")

    rep = raw_model.param_report()
    log(f"parameters: {rep['total'] / 1e6:.1f}M total, {rep['active'] / 1e6:.1f}M active per token "
        f"(+{rep['active_with_mtp'] - rep['active']:,} in MTP), flops/token {raw_model.flops_per_token() / 1e9:.3f} G")
    if compile:
        log("compiling the model... (about a minute)")
        model = torch.compile(model)
    fwd_model = model  # compiled (or not), never DDP-wrapped: eval and sampling need no gradient sync
    if ddp:
        # DDP would otherwise overwrite every rank's expert-load counters with rank 0's at each forward
        # (forward_sync_buffers replaces the deprecated broadcast_buffers in torch 2.13+)
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, **no_buffer_sync)
    all_reduce = (lambda t: dist.all_reduce(t)) if ddp else None

    peak = peak_flops or next((v for k, v in PEAK_FLOPS.items()
                               if device_type == "cuda" and k in torch.cuda.get_device_name(dev)), 0.0)
    jsonl = open(os.path.join(out_dir, "log.jsonl"), "a") if master else None
    if wandb_log and master:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)

    @torch.no_grad()
    def evaluate():
        fwd_model.eval()
        val_data.reset()  # the same val batches every time
        sums = torch.zeros(2, device=dev)
        for _ in tqdm(range(eval_iters), desc=f"val @ step {step}", unit="batch", leave=False, disable=not master):
            x, y = (t.to(dev) for t in val_data.next_batch())
            with autocast:
                _, losses = fwd_model(x, y)
            sums += torch.stack([losses["ce"], losses["mtp"]])
        if ddp:
            dist.all_reduce(sums)
        fwd_model.train()
        ce, mtp = (sums / (eval_iters * world)).tolist()
        return ce, mtp

    def checkpoint():
        states = [None] * world
        if ddp:
            dist.all_gather_object(states, data_state)
            prints = [None] * world
            dist.all_gather_object(prints, fingerprint(raw_model))
            if any(p != prints[0] for p in prints):
                raise RuntimeError(f"DDP ranks disagree on parameters/expert biases at step {step}")
        else:
            states = [data_state]
        if master:
            if bad_step.item() >= 0:
                raise SystemExit(f"train.py: non-finite loss at step {bad_step.item()}; not writing a checkpoint")
            save_checkpoint(ckpt_path, {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "model_config": asdict(cfg),
                "config": config, "step": step, "tokens": tokens_seen, "best_val_loss": best_val,
                "rng": rng_state(), "data": states, "ddp_fingerprints": prints if ddp else None})

    def eval_and_save(final=False):
        nonlocal best_val
        ce, mtp = evaluate()
        line = f"step {step}: val loss {ce:.4f}" + (f", val mtp {mtp:.4f}" if cfg.n_mtp else "")
        record = {"step": step, "tokens": tokens_seen, "val_loss": ce, "val_mtp": mtp}
        if hellaswag_interval and (step % hellaswag_interval == 0 or final):
            import hellaswag
            fwd_model.eval()
            with autocast:
                hs = hellaswag.evaluate(fwd_model, hellaswag_path or None, dev, limit=hellaswag_limit or None)
            fwd_model.train()
            line += f", hellaswag acc {hs['acc']:.4f} acc_norm {hs['acc_norm']:.4f} (n={hs['n']})"
            record.update({"hellaswag_acc": hs["acc"], "hellaswag_acc_norm": hs["acc_norm"]})
        log(line)
        if master:
            with open(os.path.join(out_dir, "eval.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            if wandb_log:
                wandb.log({"val/" + k: v for k, v in record.items()}, step=step)
            if sample_tokens:
                log(f"sample: {sample_text()!r}")
        if not math.isfinite(ce):
            raise SystemExit(f"train.py: non-finite val loss at step {step}; not writing a checkpoint")
        improved = ce < best_val
        best_val = min(best_val, ce)
        if step > 0 and (improved or always_save_checkpoint or final):
            checkpoint()
            log(f"saved {ckpt_path} (step {step})")

    def sample_text():
        try:
            from data.fineweb import get_tokenizer
            enc = get_tokenizer()
        except DataError as e:
            return f"<no tokenizer: {e}>"
        prompt = torch.tensor([enc.encode_ordinary(sample_prompt)], device=dev)
        g = torch.Generator(device=dev).manual_seed(seed)  # own generator: sampling never shifts the training RNG
        with autocast:
            new = torch.cat([t for t in raw_model.generate(prompt, sample_tokens, 0.8, 200, None, g)])
        return enc.decode([t for t in new.tolist() if t < enc.n_vocab])

    # ---- the loop -----------------------------------------------------------------------------
    def next_batch():
        # the reader's state BEFORE a prefetched batch is what a checkpoint must store: that batch is not used yet
        nonlocal data_state
        data_state = train_data.state_dict()
        x, y = train_data.next_batch()
        if device_type == "cuda":
            return x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True)
        return x, y

    bad_step = torch.full((), -1, dtype=torch.long, device=dev)  # first step with a non-finite loss, on device
    t0, t_steps, start_step, data_state = time.time(), 0, step, None
    x, y = next_batch()
    while step < max_iters:
        if step % eval_interval == 0 and not (init_from == "resume" and step == start_step):
            eval_and_save()
            t0, t_steps = time.time(), 0
        lr = get_lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        lam = mtp_lambda_late if 0 <= mtp_late_iter <= step else cfg.mtp_lambda
        parts = torch.zeros(4, device=dev)  # loss, ce, mtp, balance, averaged over micro-steps
        for micro in range(grad_accum):
            if ddp:  # all-reduce gradients only on the last micro-step
                model.require_backward_grad_sync = micro == grad_accum - 1
            with autocast:
                _, losses = model(x, y, mtp_lambda=lam)
            x, y = next_batch()  # overlaps with the backward pass on GPU
            (losses["loss"] / grad_accum).backward()
            parts += torch.stack([losses[k].detach().float() for k in ("loss", "ce", "mtp", "balance")]) / grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        gamma = 0.0 if 0 <= bias_freeze_iter <= step else bias_update_speed
        load_max, load_min = raw_model.update_expert_bias(gamma, all_reduce)
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(parts[0]), step, bad_step)
        step += 1
        tokens_seen += total_batch_size
        t_steps += 1

        if step % log_interval == 0 or step == max_iters:
            if ddp:
                dist.all_reduce(parts)
                parts /= world
            if bad_step.item() >= 0:
                raise SystemExit(f"train.py: non-finite loss at step {bad_step.item()}; stopping without "
                                 f"writing a checkpoint (last good checkpoint: {ckpt_path}). Try a lower learning_rate.")
            dt = time.time() - t0
            tok_s = t_steps * total_batch_size / dt
            loss, ce, mtp, bal = parts.tolist()
            mfu = raw_model.estimate_mfu(tok_s / world, peak) if peak else None
            rec = {"step": step, "loss": loss, "ce": ce, "mtp": mtp, "balance": bal, "lr": lr,
                   "grad_norm": grad_norm.item(), "tok_per_s": tok_s, "mfu": mfu, "tokens": tokens_seen,
                   "load_max": load_max.item() if load_max is not None else None,
                   "load_min": load_min.item() if load_min is not None else None, "mtp_lambda": lam, "gamma": gamma}
            load = f" | load {rec['load_max']:.2f}/{rec['load_min']:.2f}" if load_max is not None else ""
            log(f"step {step}/{max_iters} | loss {loss:.4f} (ce {ce:.4f} mtp {mtp:.4f} bal {bal:.2e}) | lr {lr:.2e} "
                f"| grad {rec['grad_norm']:.3f} | {tok_s:,.0f} tok/s" + (f" | mfu {100 * mfu:.1f}%" if mfu else "")
                + load)
            if master:
                jsonl.write(json.dumps(rec) + "\n")
                jsonl.flush()
                if wandb_log:
                    wandb.log(rec, step=step)
            t0, t_steps = time.time(), 0

    eval_and_save(final=True)
    log(f"done: {step} steps, {tokens_seen:,} tokens, best val loss {best_val:.4f}, checkpoint {ckpt_path}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
