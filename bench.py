"""
Benchmark nanoDeepSeek against a dense GPT-2-style baseline with the same FLOPs per token, in one run.

    python bench.py                          # CUDA: config/train_fineweb.py's model, bf16, compiled
    python bench.py --device=cpu             # CPU: config/train_tiny.py's model, fp32 (under two minutes)
    python bench.py config/train_fineweb.py --batch_size=8 --json=bench.json
    python bench.py config/train_fineweb.py --memory   # any machine: the GPU memory training it should take

The model settings (and batch_size, device, dtype, compile) come from a train.py config file, read by the same
configurator as train.py (its training-only settings are skipped); without one, config/train_fineweb.py on CUDA
and config/train_tiny.py on the CPU.

Measures, after warm-up steps, on random tokens:
  train    full training steps (forward with MTP and balance loss, backward, the optimizer, expert-bias update):
           tokens/s, MFU (torchtitan FLOP count, MTP included), peak memory (CUDA);
  baseline the same for a dense GPT-2-style model of the same width, depth, heads, vocab and sequence length
           (LayerNorm, multi-head attention with head_dim = dim / n_heads, GELU MLP) whose MLP width is chosen
           so its FLOPs per token equal ours; prints the ratio ours / baseline. --baseline_model=dense
           instead times this same model with every block dense (n_dense_layers = n_layers + n_mtp: MLA, MTP
           and all, the dense SwiGLU of inter_dim in place of each MoE), the MoE-vs-dense ablation of docs/results.md;
  decode   tokens/s of cached decoding (absorbed MLA, latent cache) and of recomputing the full forward per
           token, with the cache bytes per token against multi-head attention.
The per-backend timing of MLA's attention is dev/sdpa_backends.py; bench.py first prints the kernel SDPA picks for
it here (model.sdpa_path). On a GPU whose compute capability is not 9.x or 10.x, PyTorch has no fused grouped GEMM
for the MoE and bench.py says so first (model.grouped_mm_path).

--memory only estimates the GPU memory of training the config at its batch_size, with AdamW and with Muon (train.py
prints the same for its optimizer when it starts on CUDA): parameters, gradients and optimizer state exactly, the
activations from autograd's saved tensors measured on the CPU at a small batch and scaled linearly, and the largest
batch_size that fits 24, 40 and 80 GB (see memory_estimate for what it leaves out).
"""
import json as json_lib
import resource
import sys
import time
from dataclasses import fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import check_choice, configure, config_keys, one_line_errors
from optim import build_optimizer, muon_takes
from model import (DTYPES, ModelConfig, Transformer, autocast_context, check_device, gpu_peak_flops, grouped_mm_path,
                   sdpa_path)

# -----------------------------------------------------------------------------------------------------------------
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'   # autocast dtype; compiled MoE needs bfloat16
compile = torch.cuda.is_available()
batch_size = 8                   # sequences per step
warmup = 3                       # untimed steps (compilation happens here)
steps = 6                        # timed training steps per round
rounds = 3                       # rounds alternate ours / baseline; tokens/s from the median round
decode_tokens = 64               # tokens generated per decode measurement (after a 16-token prompt)
baseline = True                  # also benchmark a dense baseline
baseline_model = 'gpt'           # 'gpt': GPT-2-style, FLOP-matched MLP | 'dense': this model with every block dense
optimizer = 'adamw'              # train.py's optimizer setting (a config file's is read); 'muon' times our model and
                                 # the 'dense' baseline with Muon; the GPT-2-style baseline always uses AdamW
peak_flops = 0.0                 # for MFU; 0: look the GPU up in model.PEAK_FLOPS
seed = 1337
json = ''                        # write the results to this JSON file (--json=bench.json)
memory = False                   # only print the GPU memory estimate of training this config (any machine, the CPU
                                 # included; dtype bfloat16 unless --dtype or the config sets it)
memory_seq_len = 256             # --memory measures activations at batch 1 and 2 of this many tokens (at most
                                 # max_seq_len) and scales them linearly to batch_size x max_seq_len
globals().update({f.name: f.default for f in fields(ModelConfig)})  # the model settings, as in train.py
# -----------------------------------------------------------------------------------------------------------------
_DEFAULTS = config_keys(globals())  # main() rebinds the globals; tests call it more than once


class DenseGPT(nn.Module):
    """The yardstick: a compact GPT-2 (nanoGPT) block stack with an untied head and no position embedding (RoPE-free
    attention costs the same FLOPs). mlp_hidden is free so that FLOPs per token can match the MoE model."""

    def __init__(self, vocab_size, dim, n_layers, n_heads, mlp_hidden):
        super().__init__()
        self.n_heads = n_heads
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(dim, bias=False), qkv=nn.Linear(dim, 3 * dim, bias=False), proj=nn.Linear(dim, dim, bias=False),
            ln2=nn.LayerNorm(dim, bias=False), fc=nn.Linear(dim, mlp_hidden, bias=False),
            out=nn.Linear(mlp_hidden, dim, bias=False))) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim, bias=False)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        x = self.embed(idx)
        B, T, D = x.shape
        for b in self.blocks:
            q, k, v = b.qkv(b.ln1(x)).view(B, T, 3, self.n_heads, -1).transpose(1, 3).unbind(2)
            x = x + b.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D))
            x = x + b.out(F.gelu(b.fc(b.ln2(x))))
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def dense_flops_per_token(vocab_size, dim, n_layers, mlp_hidden, seq_len):
    """Same convention as Transformer.flops_per_token: 6 * matmul params (head in, embedding out) + attention."""
    return 6 * (n_layers * (4 * dim * dim + 2 * dim * mlp_hidden) + dim * vocab_size) + 6 * n_layers * 2 * dim * seq_len


def matched_mlp_hidden(cfg, target_flops, multiple):
    """The dense MLP width (a multiple of `multiple`) whose FLOPs per token come closest to target_flops."""
    rest = dense_flops_per_token(cfg.vocab_size, cfg.dim, cfg.n_layers, 0, cfg.max_seq_len)
    per_unit = 6 * cfg.n_layers * 2 * cfg.dim
    return max(multiple, round((target_flops - rest) / per_unit / multiple) * multiple)


# -----------------------------------------------------------------------------------------------------------------
# timing helpers

def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, n, dev):
    """Seconds for n calls of fn (the device synchronised before and after, not in between)."""
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(dev)
    return time.perf_counter() - t0


def train_step(model, B, T, dev, ctx):
    """A full training step (compiled with `compile`) on a fixed random batch, after `warmup` untimed steps
    (compilation happens there). Returns (step function, warm-up seconds, peak memory of the warm-up steps above
    what was allocated before, GB)."""
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    if isinstance(model, Transformer):
        opt = build_optimizer(model, optimizer, 1e-4, 0.1, (0.9, 0.95))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if compile else model
    x = torch.randint(0, model.head.out_features, (B, T + 1), generator=torch.Generator().manual_seed(seed)).to(dev)
    idx, targets = x[:, :-1], x[:, 1:]
    update_bias = getattr(model, "update_expert_bias", None)

    def step():
        with ctx:
            out = fwd(idx, targets)  # DenseGPT: the loss; ours: (logits, the V3 loss's parts)
            # our parts summed unweighted: the weights do not change the work
            loss = out[1]["ce"] + out[1]["mtp"].sum() + out[1]["balance"] if isinstance(out, tuple) else out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if update_bias is not None:
            update_bias(1e-3)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    warm_s = timed(step, warmup, dev)
    mem = (torch.cuda.max_memory_allocated(dev) - base) / 1e9 if dev.type == "cuda" else None
    return step, warm_s, mem


@torch.no_grad()
def bench_decode(model, dev, ctx, cache_dtype):
    """Decode tokens/s (batch 1) with the latent cache, and recomputing the full forward for every token."""
    model.eval()
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(seed)).to(dev)
    n = min(decode_tokens, model.cfg.max_seq_len - prompt.size(1))

    def cached():
        cache = model.init_cache(1, dev, cache_dtype)
        logits, _ = model.decode(prompt, cache, 0)
        for pos in range(prompt.size(1), prompt.size(1) + n):
            logits, _ = model.decode(logits[:, -1:].argmax(-1), cache, pos)

    def uncached():
        idx = prompt
        for _ in range(n):
            idx = torch.cat([idx, model(idx)[0][:, -1:].argmax(-1)], dim=1)

    with ctx:
        cached()  # warm-up
        t_cached = timed(cached, 2, dev) / 2
        t_uncached = timed(uncached, 1, dev)
    model.train()
    return n / t_cached, n / t_uncached


# -----------------------------------------------------------------------------------------------------------------
# the GPU memory estimate (--memory; train.py prints it too when it starts on CUDA)

GPU_GB = (24, 40, 80)  # the usual cards' memory; GB = 1e9 bytes throughout
OPTIMIZER_NAMES = {"adamw": "AdamW", "muon": "Muon"}


def state_bytes(model, optimizer):
    """{'params', 'grads', 'optimizer'}: bytes of training `model` with optim.build_optimizer(model, optimizer),
    exact. The parameters stay fp32 master weights under bf16 autocast (it casts copies, counted as activations);
    a gradient per trained parameter, in its dtype; AdamW (fused) keeps two moments of the parameter's size and
    a 4-byte fp32 step counter per parameter; Muon keeps one momentum buffer per matrix it takes (optim.muon_takes),
    AdamW has the rest."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = sum(p.nbytes if optimizer == "muon" and muon_takes(n, p) else 2 * p.nbytes + 4 for n, p in trained)
    return {"params": sum(p.nbytes for p in model.parameters()), "grads": sum(p.nbytes for _, p in trained),
            "optimizer": opt}


def saved_bytes(model, batch, seq_len, dtype):
    """Bytes of the tensors autograd keeps for the backward of one training forward of `model` on random tokens
    (batch x seq_len, autocast to dtype), each storage counted once: what a training step holds at the end of its
    forward, above the parameters and buffers (not counted: they are the model's). MLA pads v on the CPU
    (model.PAD_V_DEVICES), so SDPA runs its flash kernel here, which keeps what CUDA's fused kernels keep: q, k, v,
    the output and the logsumexp, no T x T matrix (with train_fineweb's head dims the padded v and output take the
    bytes of CUDA's v, a view of wkv_b's whole output, and output)."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, model.cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_context("cpu", dtype):
        model(x[:, :-1], x[:, 1:])  # its graph keeps every saved storage alive to the end: no address is reused
    return sum(seen.values())


def activation_bytes(cfg, dtype, seq_len):
    """(fixed, per_token): activation bytes of a training step = fixed + tokens * per_token, fitted to saved_bytes
    at batch 1 and 2 of seq_len tokens on the CPU (fresh weights; this process's RNG left as it was). Every saved
    tensor grows with the tokens (attention's included, see saved_bytes) but the weights' bf16 copies, which are
    fixed."""
    with torch.random.fork_rng(devices=[]):
        model = Transformer(cfg)
    one, two = (saved_bytes(model, b, seq_len, dtype) for b in (1, 2))
    return max(0, 2 * one - two), (two - one) / seq_len


def memory_estimate(model, optimizers, batch_size, dtype, seq_len=None):
    """GPU memory of training `model` at batch_size x max_seq_len under autocast dtype, for each optimizer:
    state_bytes, plus activation_bytes measured at seq_len tokens (default max_seq_len), and the largest
    batch_size whose total fits each of GPU_GB. The activations are full training's (a LoRA run saves less). Not
    counted: the CUDA context, cuBLAS workspaces, the allocator's fragmentation, backward's transient buffers (the
    largest: the logits' gradient, batch x T x vocab fp32, per head), DDP's gradient buckets (another grads'
    worth), torch.compile's savings (it recomputes pointwise ops instead of saving them)."""
    cfg = model.cfg
    fixed, per_token = activation_bytes(cfg, dtype, min(seq_len or cfg.max_seq_len, cfg.max_seq_len))
    per_seq = per_token * cfg.max_seq_len
    est = {"batch_size": batch_size, "seq_len": cfg.max_seq_len, "dtype": dtype, "activations_fixed": fixed,
           "activations_per_seq": per_seq, "activations": fixed + batch_size * per_seq, "optimizers": {}}
    for name in optimizers:
        s = state_bytes(model, name)
        base = s["params"] + s["grads"] + s["optimizer"] + fixed
        est["optimizers"][name] = {**s, "total": base + batch_size * per_seq,
                                   "fits": {gb: max(0, int((gb * 1e9 - base) // per_seq)) for gb in GPU_GB}}
    return est


def memory_lines(est):
    """memory_estimate as a few printable lines, a figure per optimizer."""
    gb = lambda b: f"{b / 1e9:.2f} GB"
    each = lambda figure: ", ".join(f"{figure(o)} {OPTIMIZER_NAMES[n]}" for n, o in est["optimizers"].items())
    first = next(iter(est["optimizers"].values()))
    fixed = f" + {gb(est['activations_fixed'])} of the weights' {est['dtype']} copies" * (est["dtype"] != "float32")
    return [f"memory estimate (estimated, not yet measured) for batch_size {est['batch_size']} x {est['seq_len']} in "
            f"{est['dtype']}, one GPU:",
            f"  params {gb(first['params'])}, grads {gb(first['grads'])}, optimizer state "
            f"{each(lambda o: gb(o['optimizer']))}",
            f"  activations {gb(est['activations'])}: {gb(est['activations_per_seq'])} per sequence{fixed}",
            f"  total {each(lambda o: gb(o['total']))}",
            "  largest batch_size that fits (estimated, not yet measured): "
            + "; ".join(f"{g} GB " + each(lambda o: o["fits"][g]) for g in GPU_GB)]


def print_memory_estimate(path, cfg):
    """--memory: memory_estimate of this config with AdamW and with Muon, printed (and written to --json)."""
    with torch.device("meta"):  # state_bytes reads shapes only; activation_bytes builds its own CPU model
        model = Transformer(cfg)
    t = min(memory_seq_len, cfg.max_seq_len)
    print(f"bench.py --memory: {path}, activations measured at batch 1 and 2 x {t} tokens on the CPU, scaled "
          f"linearly to batch_size x {cfg.max_seq_len}; torch {torch.__version__}", flush=True)
    est = memory_estimate(model, ("adamw", "muon"), batch_size, dtype, t)
    print("\n".join(memory_lines(est)), flush=True)
    if json:
        with open(json, "w") as f:
            json_lib.dump({"model_config": path, "memory": est}, f, indent=1)
        print(f"wrote {json}")


# -----------------------------------------------------------------------------------------------------------------

@one_line_errors("bench.py")
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    estimate = "--memory" in argv or "--memory=True" in argv
    if not any(not a.startswith("-") for a in argv):  # no config file: the default model for this machine
        on_cpu = ("--device=cpu" in argv or not torch.cuda.is_available()) and not estimate
        argv.insert(0, "config/train_tiny.py" if on_cpu else "config/train_fineweb.py")
    if estimate:  # a CUDA run's dtype, unless the config or --dtype says otherwise (they come later in argv)
        argv.insert(0, "--dtype=bfloat16")
    path = next(a for a in argv if not a.startswith("-"))
    c = configure(_DEFAULTS, argv, description=__doc__.strip().split("\n\n")[0], quiet=True,
                  skip_unknown_file_keys=True)
    globals().update(c)
    dev = check_device(device)
    # all checked before the model is timed, not after
    check_choice("baseline_model", baseline_model, ("gpt", "dense"))
    ctx = autocast_context(dev.type, dtype, compile)
    cfg = ModelConfig(**{f.name: c[f.name] for f in fields(ModelConfig)})
    check_choice("optimizer", optimizer, ("adamw", "muon"))
    if baseline and baseline_model == "gpt":
        globals()["optimizer"] = "adamw"  # the GPT-2-style baseline has no Muon routing: time both with AdamW
    if memory:
        return print_memory_estimate(path, cfg)
    B, T = batch_size, cfg.max_seq_len
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops or gpu_peak_flops(dev)
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"bench.py: {path}, {machine}, {dtype}, compile={compile}, batch {B} x {T}, optimizer {optimizer}, "
          f"torch {torch.__version__}", flush=True)
    if dev.type == "cuda":  # whether the MoE numbers below come from the fused grouped GEMM or its slow fallback
        print(grouped_mm_path(torch.cuda.get_device_capability(dev), DTYPES[dtype])[1], flush=True)
    print(sdpa_path(cfg, dev, dtype)[1], flush=True)  # MLA's attention: a fused SDPA kernel, or the slow math one
    res = {"model_config": path, "machine": machine, "dtype": dtype, "compile": compile, "optimizer": optimizer,
           "batch_size": B, "seq_len": T, "torch": torch.__version__, "peak_flops": peak or None}

    torch.manual_seed(seed)
    model = Transformer(cfg).to(dev)
    flops, rep = model.flops_per_token(T), model.param_report()
    runs = {"ours": train_step(model, B, T, dev, ctx)}
    res["ours"] = {"flops_per_token": flops, "params_total": rep["total"], "params_active": rep["active_with_mtp"]}
    if baseline:
        torch.manual_seed(seed)
        if baseline_model == "dense":
            dense = Transformer(replace(cfg, n_dense_layers=cfg.n_layers + cfg.n_mtp)).to(dev)
            res["baseline"] = {"flops_per_token": dense.flops_per_token(T), "model": "dense"}
        else:
            hidden = matched_mlp_hidden(cfg, flops, 64 if dev.type == "cuda" else 8)
            dense = DenseGPT(cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, hidden).to(dev)
            dense_flops = dense_flops_per_token(cfg.vocab_size, cfg.dim, cfg.n_layers, hidden, T)
            res["baseline"] = {"flops_per_token": dense_flops, "mlp_hidden": hidden, "model": "gpt"}
        runs["baseline"] = train_step(dense, B, T, dev, ctx)
    # rounds alternate between the models, so a machine that speeds up or slows down affects both alike
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (step, _, _) in runs.items():
            times[name].append(timed(step, steps, dev) / steps)
    for name, (_, warm_s, mem) in runs.items():
        r = res[name]
        r.update(tok_per_s=B * T / sorted(times[name])[rounds // 2], warmup_s=warm_s, peak_mem_gb=mem)
        r["mfu"] = r["flops_per_token"] * r["tok_per_s"] / peak if peak else None
        extra = (f"{rep['total'] / 1e6:.1f}M params, {rep['active_with_mtp'] / 1e6:.1f}M active with MTP" if name == "ours"
                 else f"dense GPT-2 style, MLP width {r['mlp_hidden']}" if r["model"] == "gpt"
                 else f"this model with every block dense, inter_dim {cfg.inter_dim}")
        print(f"{name:9s} {r['tok_per_s']:12,.0f} tok/s" + (f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] else "")
              + (f", peak memory {mem:.2f} GB" if mem else "")
              + f"  ({r['flops_per_token'] / 1e9:.4f} GFLOP/token, {extra}; warm-up {warm_s:.1f} s)", flush=True)
    if baseline:
        # FLOPs differ only by the rounding of mlp_hidden; the FLOP-normalised ratio is the ratio of MFUs
        res["ratio"] = res["ours"]["tok_per_s"] / res["baseline"]["tok_per_s"]
        res["ratio_flop_normalised"] = res["ratio"] * flops / res["baseline"]["flops_per_token"]
        print(f"ratio ours / baseline: {res['ratio']:.2f}x tokens/s, {res['ratio_flop_normalised']:.2f}x FLOP/s "
              f"(median of {rounds} alternating rounds of {steps} steps)", flush=True)
        del dense

    mla, mha = model.cache_bytes_per_token(2)
    cached, uncached = bench_decode(model, dev, ctx, torch.float32 if dev.type == "cpu" else None)
    res["decode"] = {"cached_tok_per_s": cached, "uncached_tok_per_s": uncached, "cache_bytes_per_token_bf16": mla,
                     "mha_cache_bytes_per_token_bf16": mha}
    print(f"decode    {cached:12,.1f} tok/s with the latent cache, {uncached:,.1f} tok/s recomputing the forward "
          f"({cached / uncached:.1f}x); cache {mla:,} B/token in bf16 vs {mha:,} B for MHA ({mha / mla:.1f}x smaller)",
          flush=True)
    if dev.type == "cpu":
        res["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    if json:
        with open(json, "w") as f:
            json_lib.dump(res, f, indent=1)
        print(f"wrote {json}")


if __name__ == "__main__":
    main()
