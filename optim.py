"""
The optimizers: AdamW (the default), or Muon for the hidden weight matrices with AdamW for the rest.

    python train.py config/train_small.py --optimizer=muon

Muon (Keller Jordan, 2024) takes SGD-momentum's update for a weight matrix and replaces it by the nearest
semi-orthogonal matrix (U V^T of its SVD, approximated by a few Newton-Schulz iterations), so that every direction
of the update moves at the same rate. Moonlight (Liu et al., 2025: a DeepSeek-V3-style MoE trained with Muon)
adds the two changes that make it a drop-in for AdamW in LLM pretraining, both used here:
  - decoupled weight decay (p <- p - lr * wd * p), and
  - the update of a (rows, cols) matrix scaled by 0.2 * sqrt(max(rows, cols)), which gives it AdamW's typical
    update RMS of about 0.2, so AdamW's learning rate and weight decay carry over unchanged.
Muon is for matrices inside the network only. The embedding (a lookup, not a matrix product), the output head,
the norm gains and the router (a 16-64 way classifier whose rows should move independently) stay on AdamW, as in
Moonlight and modded-nanogpt. The routed experts are a (n_routed_experts, out, in) stack: each expert is its
own matrix, orthogonalised on its own, all of them in the same batched matmuls.

Recent torch ships torch.optim.Muon, but it accepts 2-D parameters only. One implementation serves better than
torch's for the 2-D matrices plus ours for the stacks: the same code path and state for every hidden matrix, and
Newton-Schulz in fp32 on the CPU (torch's runs in bf16, which is slow there). tests/test_optim.py checks that a
2-D step equals torch.optim.Muon's (with adjust_lr_fn="match_rms_adamw") when both run Newton-Schulz in bf16.
"""
import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from configurator import check_choice

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of Keller Jordan's Muon, also torch.optim.Muon's


def newton_schulz(G, steps=5, dtype=None):
    """Approximately orthogonalise a matrix (rows, cols), or each matrix of a stack (..., rows, cols): returns
    about U V^T for G = U S V^T. The quintic X <- a X + (b A + c A^2) X, A = X X^T, is tuned to push small
    singular values up fast rather than to converge: after 5 steps they lie in about [0.7, 1.2], which trains
    as well as the exact U V^T. Runs in bf16 on CUDA (as Muon is normally run) and fp32 elsewhere."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype or (torch.bfloat16 if G.is_cuda else torch.float32))
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # iterate on the wide orientation: the Gram matrix X X^T is then the smaller one
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)  # Frobenius norm >= spectral norm: all sigma <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def orthogonalise(u, steps=5):
    """newton_schulz(u) for a plain tensor, or for FSDP's shard of one (a DTensor split on dim 0), which Muon
    supports rather than refuses: a 3-D expert stack splits into whole experts, each orthogonalised on its own, so
    the local shard's result is exact with no communication; a 2-D matrix splits into rows, and its U V^T needs
    every row, so it is gathered, orthogonalised on every rank, and each rank keeps its own rows. The stacks are
    most of an MoE's matrices, so the gathers (the dense and attention matrices, one more all-gather of them per
    step) and the repeated work stay small next to the step's own."""
    if not isinstance(u, DTensor):
        return newton_schulz(u, steps)
    if u.dim() == 3:
        return DTensor.from_local(newton_schulz(u.to_local(), steps), u.device_mesh, u.placements, shape=u.shape,
                                  stride=u.stride())
    return distribute_tensor(newton_schulz(u.full_tensor(), steps), u.device_mesh, u.placements, src_data_rank=None)


def rms_scale(p):
    """Moonlight's update scale for a (rows, cols) matrix: an orthogonal update has RMS 1/sqrt(max(rows, cols)),
    so this gives it RMS 0.2, about AdamW's, and AdamW's learning rate carries over."""
    return 0.2 * math.sqrt(max(p.shape[-2], p.shape[-1]))


class Muon(torch.optim.Optimizer):
    """Muon for 2-D matrices and 3-D stacks of matrices (one expert per leading index):
        B <- momentum * B + (1 - momentum) * g;  u = (1 - momentum) * g + momentum * B (Nesterov) or B
        O = newton_schulz(u)
        p <- p * (1 - lr * weight_decay) - lr * rms_scale(p) * O
    Every DDP rank computes the same update from the same all-reduced gradients; under FSDP each rank updates its
    shard (orthogonalise)."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() not in (2, 3):
                    raise ValueError(f"Muon takes matrices and stacks of matrices, not a tensor of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not self.state[p]:  # the first step
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf = self.state[p]["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)  # an average of past gradients (its scale is lost to newton_schulz)
                update = orthogonalise(p.grad.lerp(buf, mu) if group["nesterov"] else buf, group["ns_steps"])
                p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr * rms_scale(p))


def muon_takes(name, p):
    """Which parameters Muon updates: every matrix and expert stack inside the network. Not the embedding, the
    output head or the router weight (`*.gate.weight`), and no 1-D tensor (norm gains); AdamW has those."""
    return p.dim() >= 2 and name not in ("embed.weight", "head.weight") and not name.endswith(".gate.weight")


def adamw_groups(params, weight_decay):
    """AdamW's groups: weight decay on matrices (dim >= 2: expert stacks and the embedding included), none on norm
    gains. The expert bias is a buffer, not a parameter, so no optimizer can ever touch it."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class Optimizers:
    """Two torch optimizers used as one by train.py: param_groups lists both (so the lr schedule reaches every
    group), and the state dict holds both."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):  # looked up each time: load_state_dict replaces an optimizer's group dicts
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        if len(state.get("optimizers", ())) != len(self.optimizers):
            raise ValueError("expected the state of optimizer='muon' (Muon + AdamW)")
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


def build_optimizer(model, name, lr, weight_decay, betas, momentum=0.95):
    """optimizer='adamw': one fused AdamW over every parameter (adamw_groups). optimizer='muon': Muon (same lr and
    weight decay, thanks to rms_scale) for what muon_takes, AdamW for the rest. Which tensor goes where is decided
    in this file only."""
    check_choice("optimizer", name, ("adamw", "muon"))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(adamw_groups([p for _, p in named], weight_decay), lr=lr, betas=betas, fused=True)
    hidden = [p for n, p in named if muon_takes(n, p)]
    adamw = torch.optim.AdamW(adamw_groups([p for n, p in named if not muon_takes(n, p)], weight_decay), lr=lr,
                              betas=betas, fused=True)
    return Optimizers(Muon(hidden, lr=lr, weight_decay=weight_decay, momentum=momentum), adamw)
