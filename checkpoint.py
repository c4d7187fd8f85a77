"""
Checkpoints, in one place: train.py writes them and resumes from them; sample.py, hellaswag.py, bench.py and
export.py read them.

A checkpoint (out_dir/ckpt.pt) is a dict of tensors and plain Python values only:
  model           the raw model's state dict (expert biases included; no wrapper prefixes); a LoRA run's holds
                  its adapters only, and lora = {base: the base checkpoint's path, hash: lora.checkpoint_hash of
                  what it stores, rank, alpha, dropout, targets, experts, token_rows}
  model_config    dataclasses.asdict(ModelConfig)
  optimizer       the optimizer's state dict
  config          every train.py setting of the run
  step, tokens, best_val_loss
  rng             torch (CPU) / numpy / python RNG states, as tensors and lists (see rng_state)
  data            one ShardReader state per DDP rank
An FSDP run (train.py --fsdp=True) writes the same file: its shards are gathered into full tensors first
(full_state), and resume cuts them back into this run's shards (shard_like), so runs move between FSDP, DDP and
one process, and every reader takes any run's checkpoint.
Everything is read with torch.load(weights_only=True), which refuses pickled code: opening a ckpt.pt that
someone else made cannot run anything. Files are read to the CPU; the caller moves what belongs on a device.
"""
import os
import pickle
import random
import zipfile
from dataclasses import asdict

import numpy as np
import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from configurator import UserError
from data.loader import atomic_write
from lora import add_lora, base_hash, checkpoint_hash, load_adapters, merge_lora
from model import ModelConfig, Transformer


def save_checkpoint(path, ckpt):
    """Write atomically (temp file + rename): a crash mid-write leaves the previous checkpoint intact."""
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path):
    """The checkpoint dict of `path` (a ckpt.pt or a directory holding one), on the CPU, read with the safe
    loader. A one-line UserError for a missing, unsafe or foreign file."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one first (python train.py ...) or pass --out_dir")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not a checkpoint
        raise UserError(f"cannot read checkpoint {path}: not a torch.save file (truncated or foreign); is it a "
                        "train.py ckpt.pt?")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # the safe unpickler met a reference to Python code: refuse, run nothing
        raise UserError(f"refusing to load {path}: it holds pickled Python objects, which could run code; a "
                        "train.py checkpoint holds only tensors and plain values") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a nanoDeepSeek checkpoint (missing 'model' / 'model_config')")
    return ckpt


def load_model(path, device="cpu"):
    """(model in eval mode on `device`, checkpoint metadata). The model is built and filled on the CPU and
    only then moved; the optimizer state and the weights' CPU copy are dropped, so nothing else lands on the
    device or stays in memory."""
    ckpt = load_checkpoint(path)
    model = Transformer(ModelConfig.from_dict(ckpt["model_config"]))
    load_weights(model, ckpt, path)
    ckpt.pop("model")
    ckpt.pop("optimizer", None)
    return model.to(device).eval(), ckpt


def load_weights(model, ckpt, path):
    """Fill `model` with a checkpoint's weights: its state dict, or, for a LoRA run (ckpt["lora"]), its base's
    weights with the adapters merged in (lora.py), so every reader gets a plain model."""
    if "lora" not in ckpt:
        return load_state(model, ckpt["model"], path)
    info = ckpt["lora"]
    load_lora_base(model, info, path)
    add_lora(model, info["rank"], info["alpha"], 0.0, info["targets"], info["experts"], info.get("token_rows"))
    load_adapters(model, ckpt["model"], path)
    merge_lora(model).requires_grad_(True)


def load_lora_base(model, info, path):
    """Load the base weights a LoRA run was trained on (info: its ckpt["lora"]), refusing any other weights: the
    adapters only make sense on the base whose hash they recorded."""
    try:
        base = load_checkpoint(info["base"])
        load_weights(model, base, info["base"])
    except UserError as e:
        raise UserError(f"{path} holds LoRA adapters for the base {info['base']}, which cannot be loaded: {e}") from None
    now = checkpoint_hash(base)
    # the hash of the loaded weights: what runs before checkpoint_hash recorded (the same for a full base)
    if now != info["hash"] and base_hash(model.state_dict()) != info["hash"]:
        raise UserError(f"{path} holds LoRA adapters trained on other weights than {info['base']} holds now (hash "
                        f"{info['hash'][:12]}..., now {now[:12]}...): restore that base checkpoint, or train new "
                        "adapters")


def load_state(model, state, source="checkpoint"):
    """Strict state-dict load with a one-line error naming the mismatch (e.g. a checkpoint of another config)."""
    mine = model.state_dict()
    missing = [k for k in mine if k not in state]
    unexpected = [k for k in state if k not in mine]
    shape = [k for k in mine if k in state and state[k].shape != mine[k].shape]
    if missing or unexpected or shape:
        detail = (f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
                  f"{len(shape)} with other shapes (e.g. {shape[:2]})")
        raise UserError(f"{source} does not fit this model config: {detail}")
    model.load_state_dict({k: shard_like(v, mine[k]) for k, v in state.items()})


def full_state(state, master):
    """`state` (a state dict of a model or an optimizer, nested) with every FSDP shard (a DTensor) gathered into
    its full tensor, on the CPU: a checkpoint in the one format every reader takes. A collective: every rank calls
    it on the same structure. One tensor at a time is gathered on the device; rank 0 (master) keeps the CPU copies,
    the other ranks get None in their place."""
    if isinstance(state, dict):
        return {k: full_state(v, master) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(full_state(v, master) for v in state)
    if isinstance(state, DTensor):
        full = state.full_tensor()
        return full.cpu() if master else None
    return state


def shard_like(full, like):
    """A checkpoint's full tensor cut to this rank's shard when `like` (what it will be loaded into) is an FSDP
    shard; each rank keeps its own chunk, no communication. Anything else is returned unchanged."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def shard_optimizer_state(optimizer, state):
    """An optimizer state dict of full tensors (optim.Optimizers' too) with the state of each FSDP-sharded
    parameter cut to its shard, for load_state_dict (which would put the full tensor beside the shard). Its keys
    number the parameters through the groups in order, as torch's state dicts do; a state that does not fit the
    optimizer is left for load_state_dict to refuse."""
    for opt, s in zip(getattr(optimizer, "optimizers", [optimizer]), state.get("optimizers", [state])):
        params = [p for group in opt.param_groups for p in group["params"]]
        for i, entry in s.get("state", {}).items():
            p = params[i] if isinstance(i, int) and i < len(params) else None
            for k, v in entry.items():
                if p is not None and torch.is_tensor(v) and v.shape == p.shape:
                    entry[k] = shard_like(v, p)
    return state


def check_model_config(ckpt, cfg, path):
    """ValueError naming every ModelConfig field where the checkpoint differs from `cfg`."""
    saved = asdict(ModelConfig.from_dict(ckpt["model_config"]))  # defaults fill fields added since it was saved
    diff = [(k, saved[k], v) for k, v in asdict(cfg).items() if saved[k] != v]
    if diff:
        pretty = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, a, b in diff)
        raise UserError(f"{path} was trained with another model config ({pretty}); resume with the same model "
                         "settings or use another out_dir")


def resume(path, model, optimizer, cfg, world_size, ckpt=None):
    """init_from='resume': check the checkpoint (read from path, unless the caller has read it already) against
    this run (model config, number of processes), then restore the model, the optimizer and the RNG states. The
    file is read to the CPU whatever device the model is on: load_state_dict copies weights, and the optimizer
    casts its state, onto the parameters' device, and the RNG states must stay CPU ByteTensors. Returns the rest
    (step, tokens, data-loader states, ...)."""
    if ckpt is None:
        if not os.path.isfile(path):
            raise UserError(f"init_from='resume' but there is no checkpoint at {path}")
        ckpt = load_checkpoint(path)
    check_model_config(ckpt, cfg, path)
    if len(ckpt["data"]) != world_size:
        raise UserError(f"{path} was written by {len(ckpt['data'])} processes, now there are {world_size}: "
                         "resume with the same number of processes to continue the data stream exactly")
    (load_adapters if "lora" in ckpt else load_state)(model, ckpt.pop("model"), path)
    try:
        optimizer.load_state_dict(shard_optimizer_state(optimizer, ckpt.pop("optimizer")))
    except (ValueError, KeyError):
        saved = ckpt["config"].get("optimizer", "adamw")
        raise UserError(f"{path}: its optimizer state (optimizer={saved!r}) does not fit this run's optimizer: "
                         f"resume with optimizer={saved!r}") from None
    set_rng_state(ckpt["rng"])
    return ckpt


def fingerprint(model):
    """Per-tensor float64 sums (plain and of squares) of all parameters and expert biases: equal on every
    DDP rank iff the ranks agree (checked at each checkpoint; the DDP buffer trap would show up here). FSDP's
    shards differ from rank to rank by design: only the expert biases, which every rank holds whole, count."""
    tensors = [(n, p) for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    tensors += [(n, b) for n, b in model.named_buffers() if n.endswith("gate.bias")]
    out = []
    for _, t in tensors:
        t = t.detach().double()
        out += [t.sum().item(), t.square().sum().item()]
    return out


# ---- RNG state, stored as tensors and plain lists so that the safe loader accepts it ------------------------

def rng_state():
    """The CPU-side generators. No CUDA state: training draws nothing from the CUDA RNG (no dropout; sampling
    uses a generator of its own), and a per-GPU list restored by index broke a resume that sees fewer GPUs."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate()}


def set_rng_state(s):
    """Restore rng_state(). Every state is a CPU ByteTensor or plain data, whatever device the run uses. The
    "cuda" entry of older checkpoints is ignored (see rng_state)."""
    torch.set_rng_state(s["torch"].cpu())
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
