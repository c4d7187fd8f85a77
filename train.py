"""
Train a DeepSeek-V3-style model. Single process:

    python train.py config/train_fineweb.py
    python train.py config/train_tiny.py --max_iters=100     # CPU smoke run

DDP on one node (or several, with torchrun's usual --nnodes/--node_rank/--master_addr flags):

    torchrun --standalone --nproc_per_node=8 train.py config/train_fineweb.py

FSDP (parameters, gradients and optimizer state sharded over the processes) for a model that outgrows DDP:

    torchrun --standalone --nproc_per_node=8 train.py config/train_fineweb_xl.py --fsdp=True

Every setting below can be overridden by a config file or --key=value (see configurator.py, --help lists them).
The script reads top to bottom: settings, setup, data, model and optimizer, resume, then the training loop
with evaluation, checkpointing and logging inline.
"""
import gc
import inspect
import json
import math
import os
import sys
import time
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (fingerprint, full_state, load_checkpoint, load_lora_base, load_weights, resume, rng_state,
                        save_checkpoint)
from configurator import UserError, configure, config_keys
from data.fineweb import SAMPLE_DIR, prepare_sample
from data.loader import (ASSISTANT, BOS, ChatReader, ShardReader, atomic_write, check_token_ids, get_tokenizer,
                         hub_conversations, read_conversations)
from lora import TARGETS, add_lora, adapter_state, checkpoint_hash
from optim import build_optimizer
from model import ModelConfig, Transformer, autocast_context, fully_shard_model, gpu_peak_flops, init_distributed
from sample import generate_tokens
import tasks

# -----------------------------------------------------------------------------------------------
# default settings (config/train_fineweb.py holds the real run)
# I/O
out_dir = 'out'
data_dir = 'data/fineweb_edu'    # folder of .npy token shards with their meta.json (data/fineweb.py)
init_from = 'scratch'            # 'scratch' | 'resume' (from out_dir/ckpt.pt) | a pretrained out_dir to fine-tune:
                                 # its weights and model config (a model setting given here must fit them)
eval_interval = 250              # steps between val evals (and checkpoints)
eval_iters = 20                  # val batches per eval: the same batches every time; 0 = the whole val split once
always_save_checkpoint = True    # save at every eval, not only when val loss improves
log_interval = 10
sample_tokens = 32               # tokens sampled at each eval (every rank; rank 0 prints), 0 = off
sample_prompt = 'The mitochondria is'
hellaswag_interval = 0           # steps between HellaSwag evals, 0 = off
hellaswag_path = ''              # '' = hellaswag.py's default (downloaded once into its cache)
hellaswag_limit = 0              # items per HellaSwag eval, 0 = all 10,042
wandb_log = False
wandb_project = 'nanodeepseek'
wandb_run_name = 'run'
# chat fine-tuning (SFT, config/sft_tiny.py): conversations instead of shards, loss on the assistant's tokens only
chat_data = ''                   # '' = pretraining on data_dir; else comma-separated sources: 'tasks' (tasks.py's
                                 # generated problems), a .jsonl(.gz) of {"messages": [...]}, 'smoltalk', 'gsm8k'
chat_tasks = 2000                # generated training conversations per task, for 'tasks'
chat_drills = 0                  # 'tasks' also gets this many copy drills ("Repeat: 41" -> "Repeated: 41.", tasks.py)
chat_guess = ''                  # comma-separated tasks whose replies name a random operand (tasks.guess): the format
                                 # without the decision, for GRPO to learn from its reward (config/sft_tiny_guess.py)
chat_eval_interval = 0           # steps between greedy exact-match evals on held-out tasks, 0 = off
chat_eval_n = 20                 # held-out problems per task per eval
chat_eval_samples = 0            # k: also sampled pass@1, k replies per problem at temperature 1 (0: greedy only)
# LoRA (lora.py): train low-rank adapters on a pretrained model (init_from) instead of all its weights
lora_rank = 0                    # 0 = off (full fine-tuning); r of the adapters
lora_alpha = 16.0                # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0               # dropout on the adapters' input
lora_targets = ','.join(TARGETS) # MLA projections (wq | wq_a, wq_b; wkv_a, wkv_b, wo) and dense/shared SwiGLU w1-w3
lora_experts = False             # also the routed experts: stacked per-expert adapters through the grouped matmuls
lora_tokens = 'replies'          # with chat_data, also train these tokens' embedding and head rows (lora.TokenRows):
                                 # 'chat' the 4 chat tokens (pretraining never saw them), 'replies' those and every
                                 # token of a training reply, '' none
# data / batch
batch_size = 16                  # sequences per micro-step per process
total_batch_size = 524288        # tokens per optimizer step; gradient accumulation = this / (batch_size*max_seq_len*world)
# optimizer and the learning-rate schedule
optimizer = 'adamw'              # 'adamw' | 'muon': Muon for the hidden matrices, AdamW for the rest (optim.py); both
                                 # use learning_rate and weight_decay (Muon's updates are scaled to AdamW's RMS)
muon_momentum = 0.95
learning_rate = 6e-4
min_lr = 6e-5
max_iters = 19073
warmup_iters = 715
lr_decay_iters = 19073
lr_schedule = 'cosine'           # 'cosine' (warmup, cosine to min_lr) | 'wsd' (warmup, stable, linear decay)
wsd_decay_frac = 0.2             # WSD: the last fraction of lr_decay_iters decays linearly to min_lr
weight_decay = 0.1
beta1 = 0.9                      # AdamW's betas
beta2 = 0.95
grad_clip = 1.0                   # max global gradient norm; 0 = no clipping (the norm is still logged)
# the DeepSeek-V3 objective (see v3_loss) and its schedules
mtp_lambda = 0.3                 # weight of the MTP loss
mtp_lambda_late = 0.1            # MTP weight after mtp_late_iter (V3: 0.3 -> 0.1 when LR decay starts)
mtp_late_iter = -1               # -1: keep mtp_lambda for the whole run
balance_alpha = 1e-4             # alpha of the complementary sequence-wise balance loss
bias_update_speed = 1e-3         # gamma of the aux-loss-free balancer (0 freezes the expert bias)
bias_freeze_iter = -1            # V3 freezes the bias for the last tokens; -1: never
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'   # autocast dtype: 'bfloat16' | 'float32'
                                 # (no 'float16': its gradients underflow without a GradScaler; bf16 needs none)
compile = torch.cuda.is_available()
seed = 1337
peak_flops = 0.0                 # for MFU; 0 = look the GPU up in model.PEAK_FLOPS
fsdp = False                     # under torchrun: shard parameters, gradients and optimizer state over the processes
                                 # (FSDP2, model.fully_shard_model) instead of DDP's full copy on each, for a model
                                 # whose training state outgrows one GPU (config/train_fineweb_xl.py)
# model: every ModelConfig field is a setting too (defaults in model.py)
globals().update({f.name: f.default for f in fields(ModelConfig)})
# -----------------------------------------------------------------------------------------------
config = configure(config_keys(globals()), sys.argv[1:], description=__doc__)
globals().update(config)  # the settings live in these globals, and `config` is what the checkpoint records


def fail(message):
    sys.exit(f"train.py: error: {message}")  # one line, no traceback, exit status 1


def one_line_user_errors(kind, error, traceback):
    """The one error path for what the modules raise: a UserError (a bad setting, path, file or checkpoint; see
    configurator.py) ends the run like fail(), on every rank that raises it; anything else is a bug and keeps its
    traceback."""
    if issubclass(kind, UserError):
        print(f"train.py: error: {error}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, traceback)


sys.excepthook = one_line_user_errors


# ---- check the settings: a mistake stops here, in one line, before anything is built or written -----------
for _name in ("batch_size", "total_batch_size", "eval_interval", "log_interval"):
    if globals()[_name] < 1:
        fail(f"{_name} must be at least 1, got {globals()[_name]}")
for _name in ("eval_iters", "max_iters", "warmup_iters", "lr_decay_iters", "sample_tokens", "hellaswag_interval",
              "hellaswag_limit", "learning_rate", "min_lr", "weight_decay", "bias_update_speed", "mtp_lambda",
              "mtp_lambda_late", "balance_alpha"):
    if globals()[_name] < 0:
        fail(f"{_name} must be >= 0, got {globals()[_name]}")
if grad_clip < 0:
    fail(f"grad_clip must be >= 0 (0 turns clipping off), got {grad_clip}")
if not 0 <= wsd_decay_frac <= 1:
    fail(f"wsd_decay_frac must be in [0, 1], got {wsd_decay_frac}")
for _name, _choices in (("lr_schedule", ("cosine", "wsd")), ("optimizer", ("adamw", "muon"))):
    if globals()[_name] not in _choices:
        fail(f"{_name} must be one of {_choices}, not {globals()[_name]!r}")
if lora_rank and init_from == "scratch":
    fail("lora_rank > 0 adapts a pretrained model: set init_from to its out_dir (or 'resume')")
if lora_rank and optimizer != "adamw":
    fail("LoRA adapters train with AdamW (lora.py says why): use optimizer='adamw'")
if lora_rank % 8 and lora_experts and device.startswith("cuda"):
    fail(f"lora_experts on CUDA needs lora_rank a multiple of 8 (grouped_mm's alignment), got {lora_rank}")
if fsdp and lora_rank:
    fail("fsdp=True does not take LoRA: train the adapters with DDP (their optimizer state is small; the frozen "
         "model is what FSDP would shard)")
if fsdp and int(os.environ.get("WORLD_SIZE", 1)) < 2:
    fail("fsdp=True shards the model over processes: launch with torchrun --nproc_per_node=N (N >= 2), or drop "
         "--fsdp=True to train in one process")
if dtype == "float16":
    fail("dtype='float16' is not supported for training: without a GradScaler most of its gradients underflow "
         "to 0; use dtype='bfloat16' (same speed, no scaler needed) or 'float32'")
if dtype not in ("float32", "bfloat16"):
    fail(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
if not (device == "cpu" or device == "cuda" or device.startswith("cuda:") and device[5:].isdigit()):
    fail(f"device must be 'cpu', 'cuda' or 'cuda:N', not {device!r}")
if device.startswith("cuda") and not torch.cuda.is_available():
    fail(f"device={device!r} but this PyTorch ({torch.__version__}) sees no CUDA GPU: use --device=cpu "
         "(with --dtype=float32 --compile=False) or install a CUDA build of PyTorch")

# ---- setup: processes, device, precision ----------------------------------------------------------
ddp, rank, local_rank, world, device = init_distributed(device)  # ddp: under torchrun (with fsdp: FSDP, not DDP)
master = rank == 0
device_type = "cuda" if device.startswith("cuda") else "cpu"
torch.manual_seed(seed)
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
ctx = autocast_context(device_type, dtype, compile)
ckpt_path = os.path.join(out_dir, "ckpt.pt")
# the model config: the settings, except that resuming or fine-tuning takes every model setting left at its
# default from the checkpoint (so an SFT config names no architecture); one set on purpose must fit it
if init_from == "resume" and not os.path.isfile(ckpt_path):
    fail(f"init_from='resume' but there is no checkpoint at {ckpt_path}")
if init_from not in ("scratch", "resume") and not os.path.isfile(os.path.join(init_from, "ckpt.pt")):
    fail(f"init_from must be 'scratch', 'resume' or a pretrained out_dir holding a ckpt.pt, not {init_from!r}")
base = None if init_from == "scratch" else load_checkpoint(ckpt_path if init_from == "resume" else init_from)
if init_from == "resume" and "reference" in base:  # grpo.py's checkpoints record their reference model
    fail(f"{ckpt_path} is a grpo.py checkpoint: resume it with python grpo.py --init_from=resume --out_dir={out_dir}")
saved = asdict(ModelConfig.from_dict(base["model_config"])) if base else {}
cfg = ModelConfig(**{f.name: saved.get(f.name, f.default) if config[f.name] == f.default else config[f.name]
                     for f in fields(ModelConfig)})


def log(*args):
    if master:
        print(*args, flush=True)


# ---- data ------------------------------------------------------------------------------------------
tokens_per_micro = batch_size * cfg.max_seq_len * world
if total_batch_size % tokens_per_micro:
    fail(f"total_batch_size={total_batch_size} is not a multiple of batch_size * max_seq_len * world_size = "
         f"{tokens_per_micro}: change total_batch_size or batch_size")
grad_accum = total_batch_size // tokens_per_micro
log(f"tokens per step: {total_batch_size:,} = {batch_size} x {cfg.max_seq_len} x {world} processes x "
    f"{grad_accum} accumulation steps")


def chat_conversations(split):
    """The conversations of chat_data's sources for split 'train' or 'val' (held-out: never a training one)."""
    out = []
    for source in chat_data.split(","):
        if source == "tasks":
            out += tasks.sft_conversations(chat_tasks if split == "train" else max(chat_tasks // 10, 1),
                                           "train" if split == "train" else "heldout", seed,
                                           [t for t in chat_guess.split(",") if t], chat_drills)
        elif source in ("smoltalk", "gsm8k"):
            out += hub_conversations(source, split)
        else:  # a file: every 10th conversation is held out
            out += [c for i, c in enumerate(read_conversations(source)) if (i % 10 == 0) == (split == "val")]
    return out


trained_only = bool(chat_data) and not compile  # SFT: the head on the trained positions only (model.forward)
def lora_token_rows(conversations):
    """The token ids whose embedding and head rows LoRA trains (lora_tokens): the 4 chat tokens and, for 'replies',
    every token of a training reply."""
    ids = set(range(BOS, ASSISTANT + 1))
    if lora_tokens == "replies":
        for messages in conversations:
            ids.update(t for m in messages if m["role"] == "assistant" for t in enc.encode_ordinary(m["content"]))
    return sorted(ids)


unknown = [t for t in chat_guess.split(",") if t and t not in tasks.TASKS]
if unknown:
    fail(f"chat_guess names unknown tasks {unknown}: choose from {', '.join(tasks.TASKS)}")
if lora_tokens not in ("", "chat", "replies"):
    fail(f"lora_tokens must be 'chat', 'replies' or '', not {lora_tokens!r}")
if chat_data:
    train_convs = chat_conversations("train")
    train_data = ChatReader(train_convs, batch_size, cfg.max_seq_len, rank, world, seed)
    val_data = ChatReader(chat_conversations("val"), batch_size, cfg.max_seq_len, rank, world, seed, shuffle=False)
    log(f"chat data: {train_data.n_conversations:,} training conversations in {train_data.n_windows:,} rows, "
        f"{val_data.n_conversations:,} held out ({train_data.n_dropped + val_data.n_dropped} longer than "
        f"max_seq_len dropped)")
else:
    # the bundled FineWeb-Edu sample (config/train_tiny.py's data_dir) is tokenized on first use
    if os.path.realpath(data_dir) == str(SAMPLE_DIR) and not (SAMPLE_DIR / "meta.json").exists():
        if master:
            prepare_sample(SAMPLE_DIR)
        if ddp:
            dist.barrier()
    train_data = ShardReader(data_dir, "train", batch_size, cfg.max_seq_len, rank, world, seed, cfg.vocab_size)
    val_data = ShardReader(data_dir, "val", batch_size, cfg.max_seq_len, rank, world, seed, cfg.vocab_size,
                           shuffle=False)
enc = get_tokenizer()
if sample_tokens:  # the prompt must fit the model's vocabulary (a smaller one would index past the embedding)
    sample_ids = check_token_ids(enc.encode_ordinary(sample_prompt), cfg.vocab_size, "sample_prompt")
if hellaswag_interval:  # find (rank 0: download) the file now, not at the first HellaSwag eval hours from now
    import hellaswag
    hellaswag_file = hellaswag.resolve_data_path(hellaswag_path or None)
    hellaswag_items = hellaswag_limit or None
    if fsdp:  # rank r scores items r::world, and under FSDP every rank must run as many forwards: equal shares
        n_items = len(hellaswag.load_examples(hellaswag_file, hellaswag_items))
        hellaswag_items = n_items - n_items % world
        if not hellaswag_items:
            fail(f"HellaSwag under FSDP needs at least one item per process: {n_items} items, {world} processes")
        log(f"HellaSwag under FSDP: {hellaswag_items:,} of its {n_items:,} items, an equal share per process")

# ---- model, optimizer, resume -----------------------------------------------------------------------
raw_model = Transformer(cfg).to(device)  # the module itself: checkpoints, bias updates, sampling
if init_from not in ("scratch", "resume"):  # fine-tuning: the pretrained weights, a fresh optimizer and step 0
    load_weights(raw_model, base, init_from)
    log(f"initialised from {init_from} (its step {base.get('step')})")
if init_from == "resume" and bool(lora_rank) != ("lora" in base):
    fail(f"{ckpt_path} is {'a LoRA' if 'lora' in base else 'a full fine-tuning'} run: resume it with "
         f"{'its lora_rank' if 'lora' in base else 'lora_rank=0'}")
if lora_rank:  # freeze the model, add the adapters; the checkpoint records the base's path and weights' hash
    rows = lora_token_rows(train_convs) if lora_tokens and chat_data and cfg.vocab_size > ASSISTANT else None
    lora = dict(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets.split(","),
                experts=lora_experts, token_rows=rows)
    if init_from == "resume":
        saved = base["lora"]
        changed = ", ".join(f"lora_{k}={saved[k]!r}" for k in lora if saved[k] != lora[k])
        if changed:
            fail(f"{ckpt_path} trained its adapters with {changed}: resume with the same LoRA settings")
        lora = saved
        load_lora_base(raw_model, lora, ckpt_path)
    else:
        lora.update(base=init_from, hash=checkpoint_hash(base))  # what it stores, not weights merged here (TF32)
    n_base = sum(p.numel() for p in raw_model.parameters())
    n_train = add_lora(raw_model, lora_rank, lora_alpha, lora_dropout, lora["targets"], lora_experts, rows)
    log(f"LoRA rank {lora_rank} on {lora_targets}{' and the routed experts' if lora_experts else ''}"
        f"{f' and {len(rows)} tokens embedding and head rows ({lora_tokens})' if rows else ''}: "
        f"{n_train:,} trainable parameters, {100 * n_train / n_base:.2f}% of the model's {n_base:,}")
if fsdp:  # before the optimizer, which takes the shards as its parameters, and before resume fills them
    fully_shard_model(raw_model, bf16=dtype == "bfloat16")
opt = build_optimizer(raw_model, optimizer, learning_rate, weight_decay, (beta1, beta2), muon_momentum)
step, tokens_seen, best_val, train_time = 0, 0, float("inf"), 0.0  # train_time: seconds in training steps
os.makedirs(out_dir, exist_ok=True)
if init_from == "resume":
    resume(ckpt_path, raw_model, opt, cfg, world, ckpt=base)
    train_data.load_state_dict(base["data"][rank])
    step, tokens_seen, best_val = base["step"], base["tokens"], base["best_val_loss"]
    train_time = base.get("train_time", 0.0)
    log(f"resumed from {ckpt_path} at step {step} ({tokens_seen:,} tokens)")
    if master:  # a run that crashed after its last checkpoint logged steps that will now run again: drop them
        for name in ("log.jsonl", "eval.jsonl"):
            path = os.path.join(out_dir, name)
            if os.path.exists(path):
                with open(path) as f:
                    keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
                atomic_write(path, lambda f: f.writelines(keep), mode="w")
base = None  # the checkpoint's tensors (optimizer state included) are no longer needed
start_step = step

rep = raw_model.param_report()
log(f"parameters: {rep['total'] / 1e6:.1f}M total, {rep['active'] / 1e6:.1f}M active per token "
    f"(+{rep['active_with_mtp'] - rep['active']:,} in MTP), flops/token {raw_model.flops_per_token() / 1e9:.3f} G")
if device_type == "cuda" and master:  # the MoE's grouped_mm path on this GPU, and the memory this run should take
    from bench import memory_estimate, memory_lines
    from model import DTYPES, grouped_mm_path, sdpa_path
    log(grouped_mm_path(torch.cuda.get_device_capability(device), DTYPES[dtype])[1])
    log(sdpa_path(cfg, device, dtype)[1])  # a config whose attention falls to SDPA's math kernel says so here
    log("\n".join(memory_lines(memory_estimate(raw_model, [optimizer], batch_size, dtype, seq_len=256))))
    if fsdp:
        log(f"  (without sharding: FSDP divides params, grads and optimizer state by the {world} processes)")
model = raw_model  # what the loop calls: compiled and/or DDP-wrapped (FSDP shards raw_model itself)
if compile:
    log("compiling the model... (about a minute)")
    model = torch.compile(model)
if ddp and not fsdp:
    # DDP would otherwise overwrite every rank's expert-load counters with rank 0's at each forward
    # (forward_sync_buffers replaces the deprecated broadcast_buffers in torch 2.13+)
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, **no_buffer_sync)
peak = peak_flops or gpu_peak_flops(device)
jsonl = open(os.path.join(out_dir, "log.jsonl"), "a") if master else None
if wandb_log and master:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)


def v3_loss(parts, mtp_lambda):
    """DeepSeek-V3's training objective, weighed here and only here (the model returns the parts):
        L = CE_main + mtp_lambda / D * sum_k CE_k + balance_alpha * sum over MoE layers of L_Bal
    CE_k is MTP depth k's cross-entropy (V3 eq. 25: lambda averaged over the D depths) and L_Bal the complementary
    sequence-wise balance loss (eq. 17-20), which only backs up the bias balancer, so alpha is tiny.
    Returns (L, the MTP mean) as tensors."""
    mtp = parts["mtp"].sum() / max(cfg.n_mtp, 1)
    return parts["ce"] + mtp_lambda * mtp + balance_alpha * parts["balance"], mtp


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


@torch.no_grad()
def evaluate():
    """Main-head and MTP val loss per trained token, over the same eval_iters batches every time (eval_iters=0: the
    whole val split once), across all ranks. Each batch's mean is weighted by its trained tokens: chat rows train
    only the replies, and a batch holding a few long free-text replies must not count like one of short answers."""
    model.eval()
    val_data.reset()
    batches = val_data.one_pass() if eval_iters == 0 else (val_data.next_batch() for _ in range(eval_iters))
    n_batches = -(-len(val_data.order) // val_data.batch_size) if eval_iters == 0 else eval_iters
    sums = torch.zeros(4, device=device)  # CE x tokens, MTP CE x tokens (all depths), their token counts
    # a progress bar on a terminal only: redirected to a log, its redraws would bury the eval line
    for x, y in tqdm(batches, total=n_batches, desc=f"val @ step {step}", unit="batch", leave=False,
                     disable=not (master and sys.stderr.isatty())):
        x, y = x.to(device), y.to(device)
        with ctx:
            _, parts = model(x, y, trained_only=trained_only)
        n = (y >= 0).sum()  # depth k's labels are y[:, k:]; a count of 0 has a NaN mean, which weighs nothing
        n_mtp = torch.stack([(y[:, k:] >= 0).sum() for k in range(1, cfg.n_mtp + 1)]) if cfg.n_mtp else n.new_zeros(0)
        sums += torch.stack([torch.where(n > 0, parts["ce"] * n, 0),
                             torch.where(n_mtp > 0, parts["mtp"] * n_mtp, 0).sum(), n, n_mtp.sum()])
    if ddp:
        dist.all_reduce(sums)
    model.train()
    return (sums[:2] / sums[2:].clamp_min(1)).tolist()


def sample_text():
    """A few tokens from sample_prompt through sample.py's decoding, with a generator of its own (sampling
    never shifts the training RNG)."""
    g = torch.Generator(device=device).manual_seed(seed)
    try:
        with ctx:
            tokens = list(generate_tokens(raw_model, sample_ids, max_new_tokens=sample_tokens, temperature=0.8,
                                          top_k=200, generator=g, n_vocab=enc.n_vocab))
    except ValueError as e:  # e.g. prompt + sample_tokens longer than max_seq_len
        return f"<no sample: {e}>"
    return repr(enc.decode(tokens))


def stop_if_non_finite(bad_step):
    """Every rank learns the first step with a non-finite loss on ANY rank (MAX all-reduce) and stops with the
    same message; a rank that stopped alone would leave the others blocked in their next collective."""
    if ddp:
        dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
    if bad_step.item() >= 0:
        fail(f"non-finite loss at step {bad_step.item()}; stopping without writing a checkpoint (last good "
             f"checkpoint: {ckpt_path}). Try a lower learning_rate.")


def next_batch():
    """(the reader's state BEFORE this batch, x, y): a checkpoint stores the state before the prefetched batch,
    which is not trained on yet."""
    state = train_data.state_dict()
    x, y = train_data.next_batch()
    if device_type == "cuda":  # async only from pinned memory; the copy's event keeps the pinned block from reuse
        return state, x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return state, x, y


def write_checkpoint():
    """Rank 0 writes the model, optimizer, settings, position and every rank's data-loader state. First every
    loss since the last log must be finite, and under DDP the ranks must agree on every parameter and expert bias
    (the DDP buffer trap, or any other divergence, would show here, before a bad checkpoint is written). Under
    FSDP every rank gathers the shards with rank 0 (full_state): the file is the one DDP writes."""
    stop_if_non_finite(bad_step)
    if fsdp:
        raw_model.reshard()  # an eval forward leaves the root's weights gathered: the shards are the state
    data_states = [data_state]
    if ddp:
        data_states, prints = [None] * world, [None] * world
        dist.all_gather_object(data_states, data_state)
        dist.all_gather_object(prints, fingerprint(raw_model))
        if any(p != prints[0] for p in prints):
            fail(f"DDP ranks disagree on parameters/expert biases at step {step}")
    model_state = adapter_state(raw_model) if lora_rank else raw_model.state_dict()
    opt_state = opt.state_dict()
    if fsdp:
        model_state, opt_state = full_state(model_state, master), full_state(opt_state, master)
    if master:
        save_checkpoint(ckpt_path, {
            "model": model_state, "optimizer": opt_state,
            "model_config": asdict(cfg), "config": config, "step": step, "tokens": tokens_seen,
            "best_val_loss": best_val, "train_time": train_time, "rng": rng_state(), "data": data_states,
            **({"lora": lora} if lora_rank else {})})
    log(f"saved {ckpt_path} (step {step})")


# ---- the loop -----------------------------------------------------------------------------------------
bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss, on device
data_state, x, y = next_batch()
t0, t_steps = time.time(), 0
while True:
    last_step = step == max_iters

    # evaluate, sample, checkpoint; not at the step a resumed run starts from: that was done before it stopped
    eval_step = step % eval_interval == 0 or last_step
    resumed_here = init_from == "resume" and step == start_step and not last_step
    if eval_step and not resumed_here:
        train_time += time.time() - t0  # evaluation time is not training time
        val_ce, val_mtp = evaluate()
        line = f"step {step}: val loss {val_ce:.4f}" + (f", val mtp {val_mtp:.4f}" if cfg.n_mtp else "")
        record = {"step": step, "tokens": tokens_seen, "time": train_time, "val_loss": val_ce, "val_mtp": val_mtp}
        if hellaswag_interval and (step % hellaswag_interval == 0 or last_step):
            with ctx:  # the plain module: the compiled one would recompile for every batch shape
                hs = hellaswag.evaluate(raw_model, hellaswag_file, device, limit=hellaswag_items)
            line += f", hellaswag acc {hs['acc']:.4f} acc_norm {hs['acc_norm']:.4f} (n={hs['n']})"
            record.update({"hellaswag_acc": hs["acc"], "hellaswag_acc_norm": hs["acc_norm"]})
        # The chat eval and the sample run on every rank, rank 0 printing them, not on rank 0 alone while the others
        # wait in their next collective: under FSDP every forward needs all ranks, and under DDP an eval longer than
        # NCCL's default 10-minute timeout would end the run. (Only the checkpoint write is rank 0's alone.)
        if chat_eval_interval and (step % chat_eval_interval == 0 or last_step):
            import chat  # held-out tasks (greedy, sampled, prior rules)
            with ctx:
                res = chat.evaluate(raw_model, enc, chat_eval_n, seed, samples=chat_eval_samples)
            line += ", held-out tasks:\n" + tasks.format_results(res)
            record.update({f"task_{t}{k}": r[v] for t, r in res.items()
                           for k, v in (("", "accuracy"), ("_pass1", "pass1"), ("_prior", "prior"))})
        log(line)
        if master:
            with open(os.path.join(out_dir, "eval.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            if wandb_log:
                wandb.log({"val/" + k: v for k, v in record.items()}, step=step)
        if sample_tokens:
            log(f"sample: {sample_text()}")
        if not math.isfinite(val_ce):  # val losses are all-reduced: every rank stops here together
            fail(f"non-finite val loss at step {step}; not writing a checkpoint")
        improved = val_ce < best_val
        best_val = min(best_val, val_ce)
        if step > 0 and (improved or always_save_checkpoint or last_step):
            write_checkpoint()
        t0, t_steps = time.time(), 0
    if last_step:
        break

    # one optimizer step over grad_accum micro-batches
    lr = get_lr(step)
    for group in opt.param_groups:
        group["lr"] = lr
    lam = mtp_lambda_late if 0 <= mtp_late_iter <= step else mtp_lambda
    logged = torch.zeros(4, device=device)  # loss, ce, mtp, alpha * balance, averaged over micro-steps
    for micro in range(grad_accum):
        if fsdp:  # reduce-scatter gradients only on the last micro-step; until then each rank accumulates the
            # whole model's unsharded gradients (fp32), which config/train_fineweb_xl.py's memory figures count
            raw_model.set_requires_gradient_sync(micro == grad_accum - 1)
        elif ddp:  # all-reduce gradients only on the last micro-step
            model.require_backward_grad_sync = micro == grad_accum - 1
        with ctx:
            _, parts = model(x, y, trained_only=trained_only)
        loss, mtp = v3_loss(parts, lam)
        data_state, x, y = next_batch()  # overlaps with the backward pass on GPU
        (loss / grad_accum).backward()
        logged += torch.stack([loss, parts["ce"], mtp, balance_alpha * parts["balance"]]).detach() / grad_accum
    # clip_grad_norm_ with max_norm 0 would zero every gradient: 0 means off, as in nanoGPT (norm still logged)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if fsdp:
        grad_norm = grad_norm.full_tensor()  # a DTensor over the shards' gradients, the same on every rank
    opt.step()
    opt.zero_grad(set_to_none=True)
    gamma = 0.0 if 0 <= bias_freeze_iter <= step or lora_rank else bias_update_speed  # LoRA: frozen too
    load_max, load_min = raw_model.update_expert_bias(gamma, dist.all_reduce if ddp else None)
    bad_step = torch.where((bad_step < 0) & ~torch.isfinite(logged[0]), step, bad_step)  # no host sync here
    step += 1
    tokens_seen += total_batch_size
    t_steps += 1

    if step % log_interval == 0 or step == max_iters:
        if ddp:
            dist.all_reduce(logged)
            logged /= world
        stop_if_non_finite(bad_step)
        dt = time.time() - t0
        train_time += dt
        tok_s = t_steps * total_batch_size / dt
        loss, ce, mtp, bal = logged.tolist()
        mfu = raw_model.estimate_mfu(tok_s / world, peak) if peak else None
        rec = {"step": step, "loss": loss, "ce": ce, "mtp": mtp, "balance": bal, "lr": lr,
               "grad_norm": grad_norm.item(), "tok_per_s": tok_s, "mfu": mfu, "tokens": tokens_seen,
               "time": train_time, "load_max": load_max.item() if load_max is not None else None,
               "load_min": load_min.item() if load_min is not None else None, "mtp_lambda": lam, "gamma": gamma}
        load = f" | load {rec['load_max']:.2f}/{rec['load_min']:.2f}" if load_max is not None else ""
        log(f"step {step}/{max_iters} | loss {loss:.4f} (ce {ce:.4f} mtp {mtp:.4f} bal {bal:.2e}) | lr {lr:.2e} "
            f"| grad {rec['grad_norm']:.3f} | {tok_s:,.0f} tok/s" + (f" | mfu {100 * mfu:.1f}%" if mfu else "") + load)
        if master:
            jsonl.write(json.dumps(rec) + "\n")
            jsonl.flush()
            if wandb_log:
                wandb.log(rec, step=step)
        t0, t_steps = time.time(), 0

log(f"done: {step} steps, {tokens_seen:,} tokens in {train_time:.0f} s of training, best val loss {best_val:.4f}, "
    f"checkpoint {ckpt_path}")
if ddp:
    dist.barrier()  # leave together
    del model  # the DDP wrapper holds the process group: without it, destroy_process_group frees the group and joins
    gc.collect()  # gloo's worker threads while Python still runs (see model.init_distributed); gc: a cheap guard
    dist.destroy_process_group()
