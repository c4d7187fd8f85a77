"""
HellaSwag evaluation of a nanoDeepSeek checkpoint, the way build-nanogpt and llm.c do it, so that numbers are
comparable with GPT-2 124M (acc_norm 0.2955), llm.c's 124M (0.299) and GPT-3 124M (0.337).

    python hellaswag.py --out_dir=out-fineweb                      # all 10,042 validation items
    python hellaswag.py --out_dir=out-tiny --limit=200 --device=cpu
    torchrun --standalone --nproc_per_node=8 hellaswag.py --out_dir=out-fineweb   # items sharded rank::world

Scoring (build-nanogpt): each row is the GPT-2 BPE context + the tokens of " " + ending; the main head's
cross-entropy is summed over the ending tokens only. `acc` picks the ending with the lowest summed loss,
`acc_norm` the lowest mean loss per ending token (ties: the first ending). Rows are right-padded in batches of
--batch_size items; causal attention keeps the padding from affecting real tokens, the mask keeps it out of the
loss. An item longer than max_seq_len loses context from the LEFT so its longest ending fits (an ending alone
too long keeps its first max_seq_len - 1 tokens); at max_seq_len 1024 nothing is cut (the longest item: 166).

Data: --data_path, or $XDG_CACHE_HOME (~/.cache)/nanodeepseek/hellaswag/hellaswag_val.jsonl, downloaded once from
rowanz/hellaswag on GitHub and checked against its sha256. Every line is validated (ctx, 4 string endings, int
label in 0..3); a bad line is a one-line error naming it. Results: a line on stdout and a JSON file (--out_json,
default <out_dir>/hellaswag.json). train.py calls `evaluate(model, path, device)` every hellaswag_interval steps.
"""
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
import torch
import torch.distributed as dist
import torch.nn.functional as F

from configurator import UserError, check_choice, configure, config_keys, one_line_errors
from data.loader import atomic_write, get_tokenizer, write_json  # get_tokenizer: the bundled GPT-2 BPE, no network
from model import DTYPES, autocast_context, init_distributed

# -----------------------------------------------------------------------------------------------------------
out_dir = 'out-fineweb'       # a train.py out_dir (holding ckpt.pt) or the path of a checkpoint file
data_path = ''                # '' : the cache dir, downloading the official file there on first use
out_json = ''                 # '' : <out_dir>/hellaswag.json
limit = 0                     # score only the first N items (0: all 10,042)
batch_size = 8                # items per forward (x4 rows)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16'            # float32 | bfloat16 | float16: autocast dtype on CUDA (CPU always runs fp32)
progress = True               # tqdm bar on stderr (rank 0 only)
# -----------------------------------------------------------------------------------------------------------

_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"  # 12,246,618 bytes, 10,042 lines


class HellaSwagError(UserError):
    """Bad or unavailable data; the message is one line and says what to do."""


# -----------------------------------------------------------------------------------------------------------
# data: locate / download, then load and validate (shared by the CLI and evaluate())

def default_data_path():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "nanodeepseek", "hellaswag", "hellaswag_val.jsonl")


def resolve_data_path(path=None):
    """The jsonl to read: `path` if given (it must exist), else the cached copy, downloaded on first use.
    Under torch.distributed, rank 0 looks (and downloads) first while the others wait: one download, not one per
    rank racing for the same file. A failure on rank 0 is raised on every rank, so none waits in a collective."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        error = [None]
        if dist.get_rank() == 0:
            try:
                _resolve(path)
            except HellaSwagError as e:
                error = [str(e)]
        dist.broadcast_object_list(error, src=0)  # also the barrier: the file exists once this returns
        if error[0]:
            raise HellaSwagError(error[0])
    return _resolve(path)


def _resolve(path):
    if path:
        if not os.path.isfile(path):
            raise HellaSwagError(f"no HellaSwag file at {path} (--data_path): expected hellaswag_val.jsonl")
        return path
    dest = default_data_path()
    if os.path.isfile(dest):
        return dest
    print(f"hellaswag: downloading {_URL} -> {dest}", file=sys.stderr)
    os.makedirs(os.path.dirname(dest), exist_ok=True)

    def fetch(f):  # the sha256 is checked before atomic_write's rename: no bad file under the final name
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(_URL, timeout=60) as r:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise HellaSwagError(f"cannot download HellaSwag from {_URL} ({type(e).__name__}: {reason}); offline, "
                                 "pass --data_path=/path/to/hellaswag_val.jsonl (fetched on an online machine)") from e
        if digest.hexdigest() != _SHA256:
            raise HellaSwagError(f"downloaded {_URL} has sha256 {digest.hexdigest()[:12]}..., expected "
                                 f"{_SHA256[:12]}...; retry, or pass --data_path=/path/to/hellaswag_val.jsonl")

    atomic_write(dest, fetch)
    return dest


def _check_item(d):
    """None if d is a valid HellaSwag item, else what is wrong with it."""
    if not isinstance(d, dict):
        return f"expected a JSON object, got {type(d).__name__}"
    if missing := [k for k in ("ctx", "endings", "label") if k not in d]:
        return f"missing field(s) {missing}"
    if not isinstance(d["ctx"], str):
        return f"'ctx' must be a string, got {type(d['ctx']).__name__}"
    e = d["endings"]
    if not isinstance(e, list) or len(e) != 4 or not all(isinstance(s, str) for s in e):
        what = f"{len(e)} items" if isinstance(e, list) else type(e).__name__
        return f"'endings' must be a list of exactly 4 strings, got {what}"
    if type(d["label"]) is not int or not 0 <= d["label"] <= 3:
        return f"'label' must be an int in 0..3, got {d['label']!r}"
    return None


def load_examples(path=None, limit=None):
    """Validated items [{'ctx': str, 'endings': [4 str], 'label': int}, ...] from the HellaSwag jsonl (see
    resolve_data_path), in file order; with limit (> 0), only the first `limit` items (later lines are not read).
    Raises HellaSwagError('<path> line N: ...') for the first bad line. Blank lines are skipped."""
    path = resolve_data_path(path)
    items = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if limit and len(items) >= limit:
                break
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                d = json.loads(line)
            except UnicodeDecodeError as e:
                raise HellaSwagError(f"{path} line {lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise HellaSwagError(f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if problem := _check_item(d):
                raise HellaSwagError(f"{path} line {lineno}: {problem}")
            items.append({"ctx": d["ctx"], "endings": list(d["endings"]), "label": d["label"]})
    if not items:
        raise HellaSwagError(f"{path} holds no HellaSwag items")
    return items


# -----------------------------------------------------------------------------------------------------------
# rendering, batching, scoring

def render(example, enc, max_len=None):
    """One item -> {'tokens': [4 lists of ids], 'ctx_len': int, 'label': int}: row i = context + (" " + ending_i),
    build-nanogpt's convention. With max_len, the context is cut from the left so the longest row fits."""
    ctx = enc.encode_ordinary(example["ctx"])
    ends = [enc.encode_ordinary(" " + e) for e in example["endings"]]
    if not ctx:  # the first ending token needs a position that predicts it
        ctx = [getattr(enc, "eot_token", 0)]
    if max_len is not None:
        ends = [e[:max_len - 1] for e in ends]
        keep = max_len - max(len(e) for e in ends)
        ctx = ctx[-keep:]
    return {"tokens": [ctx + e for e in ends], "ctx_len": len(ctx), "label": example["label"]}


def collate(rendered, device="cpu", pad_id=0):
    """Rendered items -> {'tokens': (4n, T) long, 'mask': (4n, T) bool, 'labels': (n,) long}, right-padded to the
    longest row. mask marks the ending tokens (the positions whose prediction is scored)."""
    rows = [(r["ctx_len"], t) for r in rendered for t in r["tokens"]]
    T = max(len(t) for _, t in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (c, t) in enumerate(rows):
        tokens[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, c:len(t)] = True
    labels = torch.tensor([r["label"] for r in rendered], dtype=torch.long)
    return {"tokens": tokens.to(device), "mask": mask.to(device), "labels": labels.to(device)}


def ending_losses(model, batch):
    """Per row (ending): (sum, mean) of the main head's cross-entropy over the ending tokens, fp32 (R,) each.
    Logits at position t predict token t+1; only positions whose target is an ending token count."""
    tokens, mask = batch["tokens"], batch["mask"]
    logits = model(tokens)[0]                                   # (R, T, V); no targets: main head only
    tgt_mask = mask[:, 1:]
    tok_loss = F.cross_entropy(logits[:, :-1][tgt_mask].float(), tokens[:, 1:][tgt_mask], reduction="none")
    per = torch.zeros(tgt_mask.shape, dtype=torch.float32, device=tokens.device).masked_scatter(tgt_mask, tok_loss)
    sum_loss = per.sum(dim=1)
    return sum_loss, sum_loss / tgt_mask.sum(dim=1)


def pick(sum_losses, mean_losses):
    """The decision rule: (acc choice, acc_norm choice) = argmin over the 4 endings (last dim) of the summed and of
    the mean per-token loss; ties go to the first ending. Works on (4,) or (n, 4) tensors (or lists)."""
    s, m = torch.as_tensor(sum_losses), torch.as_tensor(mean_losses)
    # torch.argmin's tie-breaking is not documented; the first minimum is, via max of (x == min) on ints
    first_min = lambda x: (x == x.min(dim=-1, keepdim=True).values).int().argmax(dim=-1)
    return first_min(s), first_min(m)


@torch.no_grad()
def evaluate(model, path, device, enc=None, limit=None, batch_size=8, progress=False):
    """HellaSwag accuracy of an already-loaded model -> {'acc': float, 'acc_norm': float, 'n': int}.
    model: the plain module, not a DDP wrapper (ranks run different numbers of forwards here). path: the jsonl
    (None: cache/download). Under torch.distributed, rank r scores items r::world_size and the counts are
    all-reduced, so every rank returns the global result. The caller sets autocast; eval mode is set for the call
    and restored (so MoE load counters stay clean)."""
    items = load_examples(path, limit)
    enc = enc if enc is not None else get_tokenizer()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(enc, "n_vocab", 0) > cfg.vocab_size:  # the same answer on every rank
        raise HellaSwagError(f"the model's vocab_size is {cfg.vocab_size}, smaller than the tokenizer's "
                             f"{enc.n_vocab}: HellaSwag's text would index past its embedding; evaluate a model "
                             "trained with the GPT-2 vocabulary (vocab_size >= 50257)")
    shard = [render(ex, enc, cfg.max_seq_len if cfg else None) for ex in items[rank::world]]
    shard.sort(key=lambda r: max(len(t) for t in r["tokens"]))  # similar lengths together: less padding
    counts = torch.zeros(3, dtype=torch.long, device=device)    # correct, correct_norm, n
    was_training = model.training
    model.eval()
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(items), desc="hellaswag", unit="item", disable=not progress or rank != 0,
                   file=sys.stderr, dynamic_ncols=True)
        for start in range(0, len(shard), batch_size):
            batch = collate(shard[start:start + batch_size], device)
            n = batch["labels"].numel()
            s, m = ending_losses(model, batch)
            acc_choice, norm_choice = pick(s.view(n, 4), m.view(n, 4))
            counts += torch.stack([(acc_choice == batch["labels"]).sum(), (norm_choice == batch["labels"]).sum(),
                                   counts.new_tensor(n)])
            bar.update(n * world)
        bar.close()
    finally:
        model.train(was_training)
    if world > 1:
        dist.all_reduce(counts)
    correct, correct_norm, n = counts.tolist()
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


# -----------------------------------------------------------------------------------------------------------
# CLI

@one_line_errors("hellaswag.py")
def main(argv=None):
    from checkpoint import load_model
    args = configure(config_keys(globals()), argv, description=__doc__.strip().split("\n\n")[0], quiet=True)
    check_choice("--dtype", args["dtype"], DTYPES)
    if args["limit"] < 0 or args["batch_size"] < 1:
        raise UserError("--limit must be >= 0 (0: all items) and --batch_size >= 1")
    ddp, rank, _, _, dev = init_distributed(args["device"])
    try:
        ckpt_path = os.path.join(args["out_dir"], "ckpt.pt") if os.path.isdir(args["out_dir"]) else args["out_dir"]
        dev_type = torch.device(dev).type
        amp_dtype = args["dtype"] if dev_type == "cuda" else "float32"
        model, ckpt = load_model(ckpt_path, dev)
        step = ckpt.get("step")
        t0 = time.time()
        with autocast_context(dev_type, amp_dtype):
            res = evaluate(model, args["data_path"] or None, dev, limit=args["limit"] or None,
                           batch_size=args["batch_size"], progress=args["progress"])
        dt = time.time() - t0
        if rank == 0:
            print(f"hellaswag: acc {res['acc']:.4f} acc_norm {res['acc_norm']:.4f} over {res['n']} items (step {step})")
            out = args["out_json"] or os.path.join(os.path.dirname(ckpt_path) or ".", "hellaswag.json")
            os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
            write_json(out, {**res, "step": step, "checkpoint": ckpt_path,
                             "data_path": args["data_path"] or default_data_path(), "limit": args["limit"] or None,
                             "dtype": amp_dtype, "device": dev, "seconds": round(dt, 2),
                             "items_per_sec": round(res["n"] / max(dt, 1e-9), 2)})
            print(f"hellaswag: {res['n'] / max(dt, 1e-9):.1f} items/s, wrote {out}", file=sys.stderr)
        if ddp:
            dist.barrier()  # leave together: tearing gloo down while a peer still writes can abort it
        return res
    finally:
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
