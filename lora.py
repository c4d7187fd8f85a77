"""
LoRA (Hu et al., 2021): fine-tune a pretrained model through low-rank adapters while its weights stay frozen.

    python train.py config/sft_tiny.py --lora_rank=8 --out_dir=out-tiny-lora       # chat SFT with adapters
    python chat.py --out_dir=out-tiny-lora                                          # merged on load

A target matrix W (out, in) gains A (r, in) and B (out, r); the layer computes W x + (alpha / r) B A x, with
dropout on the adapter's input. B starts at 0, so training starts from the pretrained model exactly. Targets, by
module name: the MLA projections (wq, or wq_a and wq_b; wkv_a, wkv_b, wo) and the SwiGLU matrices (w1, w2, w3)
of the dense FFNs and the shared experts, in the MTP blocks too. With experts=True the routed experts get
adapters as well: per-expert A and B, stacked like the experts' weights, applied to the expert-sorted token rows
through the same grouped matmuls (x A^T, then B^T), so W + BA is never formed during training. Everything else,
the embedding, the head, the norms, the router and its expert bias, stays frozen (train.py also stops the bias
update), except, in chat SFT, some rows of the embedding and the head (TokenRows, PEFT's trainable_token_indices):
those of the 4 chat tokens, which pretraining never saw, and by default those of every token the training replies
use, without which a low-rank adapter on a briefly pretrained model cannot learn to copy an operand from the
question into the reply (measured in docs/results.md). The optimizer sees the adapters (and those rows) only: AdamW, as in the LoRA paper. Muon is not offered: it
orthogonalises each matrix's update, and for the factors of a rank-r product that neither gives the product an
orthogonal update nor has Muon's rationale behind it.

merge_lora() folds every adapter into its matrix (W <- W + (alpha / r) B A) and gives back plain layers: what
sample.py, chat.py, hellaswag.py and export.py run (checkpoint.load_model merges on load). The absorbed MLA
decode path splits wkv_b per head, so while adapters are unmerged it uses the merged matrix (merged_weight).

A LoRA run's checkpoint holds the adapters (and their optimizer state) only, with the base checkpoint's path and
a hash of what that checkpoint stores (`checkpoint_hash`); loading it onto different base weights is refused in one
line.
"""
import hashlib
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import UserError
from model import Experts

TARGETS = ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "w1", "w2", "w3")


def init_adapter(A, B):
    """A like an nn.Linear weight (Kaiming-uniform, as the LoRA reference code), B = 0: the adapter starts at 0."""
    for a in A.view(-1, *A.shape[-2:]):
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.zeros_(B)


class LoRALinear(nn.Module):
    """A frozen nn.Linear's weight (same state-dict name, `weight`) plus the adapter lora_A, lora_B."""

    def __init__(self, base: nn.Linear, rank, alpha, dropout):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        out_features, in_features = base.weight.shape
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=base.weight.device))
        init_adapter(self.lora_A, self.lora_B)
        self.scale, self.dropout = alpha / rank, nn.Dropout(dropout)

    def forward(self, x):
        return F.linear(x, self.weight) + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def merged_weight(self):
        return self.weight + self.scale * (self.lora_B @ self.lora_A).to(self.weight.dtype)


class LoRAExperts(Experts):
    """The routed experts' frozen stacks w1, w2, w3 (E, out, in) plus stacked adapters w{i}_lora_A (E, r, in) and
    w{i}_lora_B (E, out, r), applied per expert to its rows of the sorted tokens by grouped matmuls."""

    def __init__(self, base: Experts, rank, alpha, dropout):
        nn.Module.__init__(self)
        for name in ("w1", "w2", "w3"):
            w = getattr(base, name).requires_grad_(False)
            setattr(self, name, w)
            A = nn.Parameter(torch.empty(w.shape[0], rank, w.shape[2], device=w.device))
            B = nn.Parameter(torch.empty(w.shape[0], w.shape[1], rank, device=w.device))
            init_adapter(A, B)
            setattr(self, f"{name}_lora_A", A)
            setattr(self, f"{name}_lora_B", B)
        self.scale, self.dropout = alpha / rank, nn.Dropout(dropout)

    def mm(self, x, name, offs):
        A, B = getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")
        low = F.grouped_mm(self.dropout(x), A.to(x.dtype).mT, offs=offs)  # (rows, r): x A^T of each row's expert
        return super().mm(x, name, offs) + self.scale * F.grouped_mm(low, B.to(x.dtype).mT, offs=offs)

    def merged(self):
        plain = Experts.__new__(Experts)
        nn.Module.__init__(plain)
        for name in ("w1", "w2", "w3"):
            A, B = getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")
            w = getattr(self, name)
            setattr(plain, name, nn.Parameter((w + self.scale * (B @ A).to(w.dtype)).detach()))
        return plain


class TokenRows(nn.Module):
    """A frozen embedding or output head (weight (vocab, dim)) whose rows `ids` train, as lora_rows (a copy of
    them at first), as PEFT's trainable_token_indices: the chat tokens, whose rows pretraining never trained, and
    optionally the tokens the SFT replies use. An adapter elsewhere cannot give an untrained row a meaning, nor
    make the head name the token a reply copies from the question when the base never learned to copy (measured
    in docs/results.md), and training all rows would cost a full-size optimizer state for the two largest
    matrices."""

    def __init__(self, base, ids):
        super().__init__()
        self.weight = base.weight.requires_grad_(False)
        self.register_buffer("ids", torch.tensor(sorted(ids), dtype=torch.long, device=base.weight.device),
                             persistent=False)
        slot = torch.full((base.weight.size(0),), -1, dtype=torch.long, device=base.weight.device)
        slot[self.ids] = torch.arange(len(self.ids), device=base.weight.device)
        self.register_buffer("slot", slot, persistent=False)  # token id -> its row in lora_rows, -1 if frozen
        self.lora_rows = nn.Parameter(base.weight[self.ids].detach().clone())
        self.is_head = isinstance(base, nn.Linear)

    def forward(self, x):
        if self.is_head:  # x (..., dim) -> logits; the columns of the trained rows are replaced
            logits = F.linear(x, self.weight)
            return logits.index_copy(-1, self.ids, F.linear(x, self.lora_rows.to(logits.dtype)))
        slot = self.slot[x]  # x: token ids
        return torch.where((slot >= 0)[..., None], self.lora_rows[slot.clamp(min=0)], F.embedding(x, self.weight))

    def merged_weight(self):
        return self.weight.index_copy(0, self.ids, self.lora_rows.to(self.weight.dtype))


def add_lora(model, rank, alpha, dropout=0.0, targets=TARGETS, experts=False, token_rows=None):
    """Freeze every parameter of `model` and give each target an adapter (in place; new parameters on the
    model's device, initialised from torch's global RNG); token_rows (a list of token ids) also trains those rows
    of the embedding and the head (TokenRows). Returns the number of trainable parameters."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise UserError(f"lora_targets: unknown or empty {unknown or list(targets)}; choose from {', '.join(TARGETS)}")
    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise UserError(f"need lora_rank >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1, got {rank}, {alpha}, {dropout}")
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha, dropout))
            elif experts and isinstance(child, Experts):
                setattr(module, name, LoRAExperts(child, rank, alpha, dropout))
    if token_rows:
        model.embed, model.head = TokenRows(model.embed, token_rows), TokenRows(model.head, token_rows)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise UserError(f"lora_targets {list(targets)} match no layer of this model")
    return n


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its weight, W <- W + (alpha / r) B A, and put plain nn.Linear / Experts modules back
    (in place; the state dict then has the base model's keys). Returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (LoRALinear, TokenRows)):
                rows, cols = child.weight.shape
                embed = isinstance(child, TokenRows) and not child.is_head
                plain = (nn.Embedding(rows, cols) if embed else nn.Linear(cols, rows, bias=False)).to(child.weight)
                plain.weight.copy_(child.merged_weight())
                setattr(module, name, plain)
            elif isinstance(child, LoRAExperts):
                setattr(module, name, child.merged())
    return model


def adapter_state(model):
    """The adapters' tensors by state-dict name: what a LoRA checkpoint stores instead of the whole model."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def load_adapters(model, state, source):
    """Load adapter tensors into a model that add_lora() prepared; a one-line UserError if they do not fit."""
    mine = adapter_state(model)
    if set(mine) != set(state) or any(mine[k].shape != state[k].shape for k in mine):
        extra, missing = sorted(set(state) - set(mine)), sorted(set(mine) - set(state))
        raise UserError(f"{source}: its LoRA adapters do not fit this model's (missing {missing[:2]}, unexpected "
                        f"{extra[:2]}, or other shapes): resume with the same lora_rank, lora_targets and lora_experts")
    model.load_state_dict(state, strict=False)


def base_hash(state):
    """sha256 of a model state dict's tensors (names, shapes, dtypes, bytes), in name order."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_hash(ckpt):
    """What a LoRA run records of its base checkpoint, so that its adapters are never loaded onto other weights:
    base_hash of the tensors the checkpoint stores and, for a LoRA base (which stores adapters), the settings they
    merge with and its own base's hash, a chain down to full weights. Never a hash of weights merged on load: a GPU
    (TF32) rounds B A differently from the CPU, and every reader must agree with the writer whatever it runs on. For
    a full checkpoint this is base_hash of the model it loads into."""
    h = base_hash(ckpt["model"])
    if "lora" not in ckpt:
        return h
    merge = {k: ckpt["lora"].get(k) for k in ("hash", "rank", "alpha", "targets", "experts", "token_rows")}
    return hashlib.sha256((h + json.dumps(merge, sort_keys=True)).encode()).hexdigest()
