"""
nanoDeepSeek model: a small, faithful DeepSeek-V3 in one file.

The DeepSeek-V3 ideas, each in one place below, named as in the paper and the official
`inference/model.py` (so state-dict keys convert to the released layout by renaming nothing):
  - RMSNorm ............................ `RMSNorm` (fp32 compute, eps 1e-6)
  - decoupled RoPE (+ optional YaRN) .... `precompute_freqs_cis`, `apply_rotary_emb`
  - Multi-head Latent Attention ......... `MLA` (SDPA training path, absorbed latent-cache decode path)
  - DeepSeekMoE routing ................. `Gate` (sigmoid affinities, selection-only bias, group-limited top-k)
  - DeepSeekMoE experts + dispatch ...... `MoE`, `moe_dispatch` (sort -> grouped matmul -> combine)
  - auxiliary-loss-free balancing ....... `Transformer.update_expert_bias`
  - sequence-wise balance loss .......... `sequence_balance_loss`
  - Multi-Token Prediction .............. `MTPModule`, `Transformer.forward`
"""
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from configurator import UserError, check_choice

if not hasattr(F, "grouped_mm"):  # the MoE dispatch below needs it; say so now, not deep inside a forward pass
    raise SystemExit(f"nanoDeepSeek needs torch >= 2.10 (torch.nn.functional.grouped_mm); this is torch "
                     f"{torch.__version__}: pip install -U 'torch>=2.10'")


@dataclass
class ModelConfig:
    # Field names follow the official DeepSeek-V3 `ModelArgs`. Defaults: the GPT-2-small-compute model.
    vocab_size: int = 50304          # GPT-2's 50257 padded to a multiple of 64
    dim: int = 768
    n_layers: int = 12
    n_dense_layers: int = 1          # the first layers use a dense SwiGLU instead of MoE (MTP module k is layer
                                     # n_layers + k, so n_layers + n_mtp makes every block dense)
    n_heads: int = 12
    inter_dim: int = 2048            # dense SwiGLU hidden size
    moe_inter_dim: int = 256         # hidden size of ONE routed (fine-grained) expert
    # MLA
    q_lora_rank: int = 0             # 0: queries are projected directly (as in V2-Lite)
    kv_lora_rank: int = 256          # d_c, the cached latent
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32       # d_h^R, the decoupled RoPE part
    v_head_dim: int = 64
    # DeepSeekMoE
    n_routed_experts: int = 64       # N_r fine-grained experts; each token picks K_r = n_activated_experts
    n_shared_experts: int = 2        # N_s experts every token goes through
    n_activated_experts: int = 6
    n_expert_groups: int = 1         # group-limited routing: a token's experts come from n_limited_groups of
    n_limited_groups: int = 1        # the n_expert_groups groups (1 and 1: plain top-k)
    score_func: str = "sigmoid"      # V3's sigmoid affinities (the only router here; V2's softmax rule is not)
    route_scale: float = 1.0
    # RoPE / YaRN
    max_seq_len: int = 1024
    yarn: bool = False               # YaRN context extension: off when pretraining (at any max_seq_len); on to
                                     # extend a trained model from original_seq_len to max_seq_len
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0        # YaRN's scale factor s (V3: 40, from 4K to 160K tokens)
    beta_fast: int = 32              # YaRN's ramp between interpolated and kept frequencies
    beta_slow: int = 1
    mscale: float = 1.0              # YaRN's attention temperature: softmax scale * (0.1 mscale ln s + 1)^2
    # training-side (the loss weights are train.py settings: the architecture does not depend on them)
    n_mtp: int = 1                   # D, number of sequential MTP modules (0 disables)
    init_std: float = 0.006

    # Lower bounds, each what the code needs. Routed experts are always >= 1: an all-dense model keeps valid MoE
    # fields and sets n_dense_layers = n_layers + n_mtp (n_routed_experts=0 would divide by zero in the reports).
    _AT_LEAST = dict(vocab_size=1, dim=1, n_layers=1, n_dense_layers=0, n_heads=1, inter_dim=1, moe_inter_dim=1,
                     q_lora_rank=0, kv_lora_rank=1, qk_nope_head_dim=1, qk_rope_head_dim=2, v_head_dim=1,
                     n_routed_experts=1, n_shared_experts=0, n_activated_experts=1, n_expert_groups=1,
                     n_limited_groups=1, max_seq_len=1, original_seq_len=1, rope_factor=1.0, mscale=0.0, n_mtp=0)
    # strict: route_scale/init_std 0 zero the routed output/weights; RoPE frequencies theta^(-2i/d) must fall
    # with i, and YaRN divides by log(rope_theta) and takes log(1 / beta)
    _ABOVE = dict(route_scale=0.0, rope_theta=1.0, beta_fast=0, beta_slow=0, init_std=0.0)

    def __post_init__(self):
        """One-line UserError '<field> must be <bound>, got <value>' for the first problem. The checks run in order,
        so each may rely on the ones before it (e.g. the modulo by n_expert_groups runs once that is >= 1)."""
        def check(ok, name, bound):
            if not ok:
                raise UserError(f"bad ModelConfig: {name} must be {bound}, got {getattr(self, name)!r}")
        for name in (f.name for f in fields(self)):
            v = getattr(self, name)
            finite = "finite and " if isinstance(v, float) else ""
            if name in self._AT_LEAST:
                hint = " (an all-dense model keeps it and sets n_dense_layers = n_layers + n_mtp)"
                check(math.isfinite(v) and v >= self._AT_LEAST[name], name,
                      f"{finite}>= {self._AT_LEAST[name]:g}{hint if name == 'n_routed_experts' else ''}")
            if name in self._ABOVE:
                check(math.isfinite(v) and v > self._ABOVE[name], name, f"{finite}> {self._ABOVE[name]:g}")
        E, G, L = self.n_routed_experts, self.n_expert_groups, self.n_limited_groups
        check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "even (RoPE rotates pairs)")
        check(self.n_dense_layers <= self.n_layers + self.n_mtp, "n_dense_layers",
              f"<= n_layers + n_mtp = {self.n_layers + self.n_mtp}")
        check(self.n_activated_experts <= E, "n_activated_experts", f"<= n_routed_experts = {E}")
        check(E % G == 0, "n_routed_experts", f"divisible by n_expert_groups = {G}")
        check(L <= G, "n_limited_groups", f"<= n_expert_groups = {G}")
        check(G == 1 or E // G >= 2, "n_expert_groups",
              f"<= n_routed_experts / 2 = {E // 2}, for >= 2 experts per group (a group is scored by its top-2)")
        check(self.n_activated_experts <= L * (E // G), "n_activated_experts",
              f"<= n_limited_groups * experts per group = {L} * {E // G} = {L * (E // G)}")
        check(self.score_func == "sigmoid", "score_func",
              "'sigmoid' (DeepSeek-V3's router; V2's softmax routing with its max-score group rule is not implemented)")
        check(isinstance(self.yarn, bool), "yarn", "True or False")
        check(self.beta_fast >= self.beta_slow, "beta_fast", f">= beta_slow = {self.beta_slow}")
        # grouped_mm needs 16-byte aligned row strides: in bf16 these widths must be multiples of 8
        check(self.dim % 8 == 0, "dim", "a multiple of 8 (grouped_mm alignment)")
        check(self.moe_inter_dim % 8 == 0, "moe_inter_dim", "a multiple of 8 (grouped_mm alignment)")
        check(not self.yarn or self.max_seq_len > self.original_seq_len, "max_seq_len", f"> original_seq_len = "
              f"{self.original_seq_len} with yarn=True (YaRN extends original_seq_len to max_seq_len)")

    @property
    def qk_head_dim(self):
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @classmethod
    def from_dict(cls, d):
        # checkpoints written before the loss weights moved to train.py carry them: they are not architecture
        d = {k: v for k, v in d.items() if k not in ("mtp_lambda", "balance_alpha")}
        if unknown := sorted(set(d) - {f.name for f in fields(cls)}):
            raise UserError(f"unknown ModelConfig field(s) {unknown}: checkpoint from another version of model.py?")
        return cls(**d)


# CPU SDPA has a flash kernel only for equal qk/v head dims, else it runs the O(T^2)-memory math kernel
# (check_head_dim_size_cpp, aten/src/ATen/native/transformers/sdp_utils_cpp.cpp). Zero columns in v give zero output
# columns, so padding v to the qk head dim is exact (and measured faster on CPU, see the README). CUDA's flash
# kernel also needs equal dims, but its memory-efficient kernel (head dims multiples of 8 in bf16/fp16, 4 in fp32,
# v's storage offset 16-byte aligned) and cuDNN's (head dims <= 128 and multiples of 8, bf16/fp16, sm80+) take
# unequal ones (cuda/sdp_utils.cpp): sdpa_path says which one a config gets.
PAD_V_DEVICES = {"cpu"}

# ----------------------------------------------------------------------------------------------
# Norm and RoPE

class RMSNorm(nn.Module):
    """RMSNorm with weight init 1, computed in fp32 like the official code, whatever the input dtype."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


def precompute_freqs_cis(cfg: ModelConfig):
    """The official `precompute_freqs_cis`, kept as real tables: cos and sin (max_seq_len, qk_rope_head_dim/2) of
    the decoupled RoPE angles (the real and imaginary parts of its freqs_cis; real tensors compile and autocast
    simply), with YaRN when cfg.yarn is set (the official code switches YaRN on by max_seq_len > original_seq_len
    alone; here it is explicit)."""
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    if cfg.yarn:
        # YaRN: keep high-frequency dims, divide low-frequency dims by rope_factor, ramp in between
        def correction_dim(num_rot):
            return d * math.log(cfg.original_seq_len / (num_rot * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
        high = min(math.ceil(correction_dim(cfg.beta_slow)), d - 1)
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / cfg.rope_factor * (1 - smooth) + freqs * smooth
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rotary_emb(x, cos, sin):
    """The official `apply_rotary_emb`: rotate x (..., T, heads, d) by position. Interleaved pairs (x[2i], x[2i+1])
    are one complex number, the official layout (not NeoX's split halves). cos/sin: (T, d/2). Computed in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


# ----------------------------------------------------------------------------------------------
# Multi-head Latent Attention

class MLA(nn.Module):
    """Multi-head Latent Attention (V2 sec. 2.1, V3 sec. 2.1.1).

    Keys/values come from one low-rank latent c^KV = kv_norm(wkv_a(x)[:kv_lora_rank]) (B, T, kv_lora_rank),
    up-projected per head by wkv_b into k_nope (qk_nope_head_dim) and v (v_head_dim). Position enters only via
    a decoupled RoPE part: k_pe (qk_rope_head_dim) is ONE head from the block input, shared by all heads, and
    q_pe is per head. Decoupling is what lets decode "absorb" wkv_b into the query and output, so the cache
    holds only the latent and k_pe: kv_lora_rank + qk_rope_head_dim numbers per token per layer.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_lora_rank = cfg.n_heads, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk = cfg.qk_head_dim
        if cfg.q_lora_rank == 0:
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * qk, bias=False)
        else:  # low-rank query: q_pe then comes from the normed query latent
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank)
            self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_heads * qk, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)  # [c^KV | k_pe]
        self.kv_norm = RMSNorm(cfg.kv_lora_rank)  # on the latent only, never on k_pe
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)
        self.softmax_scale = qk ** -0.5
        if cfg.yarn:  # YaRN attention temperature
            mscale = 0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1.0
            self.softmax_scale *= mscale * mscale

    def project(self, x, cos, sin):
        """x (B, T, dim) -> q_nope (B, T, heads, qk_nope), roped q_pe (B, T, heads, qk_rope), the normed latent c
        (B, T, kv_lora_rank) and the roped shared key k_pe (B, T, 1, qk_rope)."""
        B, T, _ = x.shape
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rotary_emb(q_pe, cos, sin)
        c, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)
        c = self.kv_norm(c)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), cos, sin)  # (B, T, 1, rope): one head, shared by all heads
        return q_nope, q_pe, c, k_pe

    def sdpa_operands(self, q_nope, q_pe, c, k_pe):
        """The training path's SDPA operands q, k, v (B, heads, T, head dim): per-head K/V materialised from the
        latent, v zero-padded to the qk head dim on PAD_V_DEVICES. sdpa_path asks PyTorch which kernel these get."""
        B, T = c.shape[:2]
        kv = self.wkv_b(c).view(B, T, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # v: a view at offset nope (efficient's alignment)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        pad = self.nope + self.rope - self.v_dim
        if c.device.type in PAD_V_DEVICES and pad > 0:
            v = F.pad(v, (0, pad))
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        """x (B, T, dim); cos/sin for positions start_pos..start_pos+T-1. cache=None: training path.
        cache=(kv_cache (B, L, kv_lora_rank), pe_cache (B, L, qk_rope_head_dim)): absorbed decode path."""
        B, T, _ = x.shape
        q_nope, q_pe, c, k_pe = self.project(x, cos, sin)

        if cache is None:
            # Training: materialise per-head K/V and use fused causal SDPA. Lq == Lk here, so is_causal's mask is
            # the usual one (PyTorch aligns it top-left, which only matters when Lq != Lk: see the decode path).
            q, k, v = self.sdpa_operands(q_nope, q_pe, c, k_pe)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
            return self.wo(o[..., :self.v_dim].transpose(1, 2).flatten(2))

        # Decode: absorb W^UK into the query and W^UV into the output; attend over the cached latent directly.
        kv_cache, pe_cache = cache
        end = start_pos + T
        kv_cache[:B, start_pos:end] = c.to(kv_cache.dtype)
        pe_cache[:B, start_pos:end] = k_pe.squeeze(2).to(pe_cache.dtype)
        # absorption splits the whole matrix per head: with a LoRA adapter (lora.py) that is W + BA, merged here
        w = self.wkv_b.merged_weight() if hasattr(self.wkv_b, "merged_weight") else self.wkv_b.weight
        w = w.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w[:, :self.nope])
        kvc, pec = kv_cache[:B, :end].type_as(q_nope), pe_cache[:B, :end].type_as(q_nope)
        scores = (torch.einsum("bthc,bsc->bths", q_lat, kvc) +
                  torch.einsum("bthr,bsr->bths", q_pe, pec)) * self.softmax_scale
        # query i is at position start_pos + i: mask keys after it (bottom-right aligned). SDPA's is_causal would be
        # wrong here when T != end: PyTorch aligns it top-left (query i sees keys 0..i), and CUDA's flash kernel
        # refuses is_causal with Lq != Lk (check_flash_causal_non_square_seqlens, cuda/sdp_utils.cpp). With a
        # top-left mask tests/test_model.py::test_absorbed_cached_decode_matches_full_forward fails.
        future = torch.arange(end, device=x.device)[None, :] > torch.arange(start_pos, end, device=x.device)[:, None]
        scores = scores.masked_fill(future[None, :, None, :], float("-inf"))
        probs = scores.float().softmax(dim=-1).type_as(q_nope)
        o_lat = torch.einsum("bths,bsc->bthc", probs, kvc)
        o = torch.einsum("bthc,hdc->bthd", o_lat, w[:, self.nope:])
        return self.wo(o.flatten(2))


# ----------------------------------------------------------------------------------------------
# SwiGLU MLPs and DeepSeekMoE

class MLP(nn.Module):
    """SwiGLU FFN w2(silu(w1 x) * w3 x): the dense layers' FFN and the (fused) shared experts."""

    def __init__(self, dim, inter_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Router (V3 eq. 13-16). Affinities s = sigmoid(x e_i^T) in fp32. The expert CHOICE uses s + bias
    (aux-loss-free balancing); the mixing weights use s alone, renormalised over the chosen top-k (sigmoid),
    times route_scale. Optional group-limited routing keeps the n_limited_groups groups with the largest
    sum of their top-2 biased scores and masks the rest with -inf.

    bias: fp32 buffer (n_routed_experts,), zero init, never an optimizer parameter.
    tokens_per_expert: per-step load counter, non-persistent; reset by Transformer.update_expert_bias.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk, self.route_scale = cfg.n_activated_experts, cfg.route_scale
        self.n_groups, self.topk_groups = cfg.n_expert_groups, cfg.n_limited_groups
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.float32),
                             persistent=False)

    def forward(self, x):
        """x (N, dim) -> weights (N, topk) fp32, indices (N, topk), scores (N, n_routed_experts) fp32."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid()
        biased = scores + self.bias  # selection only
        if self.n_groups > 1:
            grouped = biased.unflatten(-1, (self.n_groups, -1))             # (N, G, E/G)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)      # (N, G)
            keep = group_scores.topk(self.topk_groups, dim=-1).indices
            masked = torch.ones_like(group_scores, dtype=torch.bool).scatter(1, keep, False)
            biased = grouped.masked_fill(masked.unsqueeze(-1), float("-inf")).flatten(1)
        indices = biased.topk(self.topk, dim=-1).indices
        weights = scores.gather(1, indices)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, indices, scores


class Experts(nn.Module):
    """The routed experts' SwiGLU weights, stacked: w1/w3 (E, moe_inter_dim, dim), w2 (E, dim, moe_inter_dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, H = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.w1 = nn.Parameter(torch.empty(E, H, D))
        self.w2 = nn.Parameter(torch.empty(E, D, H))
        self.w3 = nn.Parameter(torch.empty(E, H, D))

    def mm(self, x, name, offs):
        """x (rows sorted by expert) times the transposed weight `name` of each row's expert: one grouped matmul.
        offs: each expert's end row. (lora.LoRAExperts adds its adapters here.)"""
        return F.grouped_mm(x, getattr(self, name).to(x.dtype).mT, offs=offs)

    def forward(self, xs, offs):
        """The SwiGLU w2(silu(w1 x) * w3 x) of every expert-sorted row of xs (N*K, dim)."""
        return self.mm(F.silu(self.mm(xs, "w1", offs)) * self.mm(xs, "w3", offs), "w2", offs)


def moe_dispatch(x, weights, indices, experts: Experts):
    """Vectorised routed-expert FFN: route -> sort token-slots by expert -> grouped matmuls -> combine.
    x (N, dim), weights/indices (N, K). Static shapes (N*K rows), no host sync, no Python loop over experts."""
    N, K = indices.shape
    E = experts.w1.shape[0]
    flat = indices.flatten()
    order = flat.argsort(stable=True)                             # slot ids sorted by expert
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)                    # group end offsets for grouped_mm
    dev = x.device.type  # grouped_mm is not autocast (its CUDA fast path is bf16 only): cast by hand
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    xs = x[order // K].to(dt)                                     # (N*K, dim), expert-sorted
    ys = experts(xs, offs)                                        # (N*K, dim): grouped matmuls
    # Un-sort with a permutation copy (deterministic, no atomics), then mix the K outputs in fp32.
    ys = torch.zeros_like(ys).index_copy(0, order, ys).view(N, K, -1)
    out = (ys.float() * weights.unsqueeze(-1)).sum(dim=1)
    return out.type_as(x), counts


def sequence_balance_loss(scores, cfg: ModelConfig, B, T):
    """Complementary sequence-wise balance loss (V3 eq. 17-20), without alpha:
    sum_i f_i * P_i per sequence, averaged over the batch.
    f_i = N_r / (K_r T) * #tokens of the sequence whose top-K_r over the UNBIASED affinities contains i
          (the paper's eq. 18; a count, so no gradient);
    P_i = mean over the sequence of s_i / sum_j s_j (affinities normalised over ALL routed experts)."""
    E, K = cfg.n_routed_experts, cfg.n_activated_experts
    s = scores.view(B, T, E)
    with torch.no_grad():
        top = s.topk(K, dim=-1).indices.view(B, T * K)
        f = torch.zeros(B, E, device=s.device).scatter_add_(1, top, torch.ones_like(top, dtype=torch.float32))
        f = f * (E / (K * T))
    P = (s / s.sum(dim=-1, keepdim=True)).mean(dim=1)
    return (f * P).sum(dim=-1).mean()


class MoE(nn.Module):
    """DeepSeekMoE (V3 eq. 12): h = sum_shared FFN_s(u) + sum_routed g_i FFN_i(u). n_shared_experts shared
    experts are fused into one always-on SwiGLU of width n_shared_experts * moe_inter_dim; routed experts are
    fine-grained SwiGLUs of width moe_inter_dim. No capacity limit, no token dropping."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim)

    def forward(self, x):
        """x (B, T, dim) -> (y (B, T, dim), balance loss scalar without alpha)."""
        B, T, D = x.shape
        flat = x.view(-1, D)
        weights, indices, scores = self.gate(flat)
        routed, counts = moe_dispatch(flat, weights, indices, self.experts)
        if self.training:
            self.gate.tokens_per_expert += counts  # load of this micro-batch, for the bias update
        balance = sequence_balance_loss(scores, self.cfg, B, T) if self.training else scores.new_zeros(())
        return (routed + self.shared_experts(flat)).view(B, T, D), balance


# ----------------------------------------------------------------------------------------------
# Block, MTP and the Transformer

class Block(nn.Module):
    """Pre-norm block: x + attn(attn_norm(x)), then + ffn(ffn_norm(x)); ffn dense for layer_id < n_dense_layers."""

    def __init__(self, layer_id, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.dim), MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim)
        self.ffn = MLP(cfg.dim, cfg.inter_dim) if layer_id < cfg.n_dense_layers else MoE(cfg)

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, start_pos)
        if isinstance(self.ffn, MoE):
            h, balance = self.ffn(self.ffn_norm(x))
        else:
            h, balance = self.ffn(self.ffn_norm(x)), x.new_zeros((), dtype=torch.float32)
        return x + h, balance


class MTPModule(nn.Module):
    """Multi-Token Prediction module k (V3 sec. 2.2): h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])
    (embedding first, as in the released weights), one full Block, then its own final norm before the SHARED
    head. The embedding and head are the main model's tensors; only these layers are MTP-specific."""

    def __init__(self, layer_id, cfg: ModelConfig):
        super().__init__()
        self.enorm, self.hnorm = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(layer_id, cfg)
        self.norm = RMSNorm(cfg.dim)

    def forward(self, h_prev, emb, cos, sin, cache=None, start_pos=0):
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        # eh_proj's output is bf16 under autocast; the residual stream stays in h_prev's dtype (fp32), as the trunk's
        return self.block(h.type_as(h_prev), cos, sin, cache, start_pos)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)  # untied from embed, as in V3
        self.mtp = nn.ModuleList(MTPModule(cfg.n_layers + k, cfg) for k in range(cfg.n_mtp))
        cos, sin = precompute_freqs_cis(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self):
        """Every matrix N(0, init_std) (0.006 in the papers), norms 1, expert bias 0."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=self.cfg.init_std)
            else:
                nn.init.ones_(p)  # only RMSNorm weights are 1-D parameters
        for gate in self.gates():
            gate.bias.zero_()
            gate.tokens_per_expert.zero_()

    def gates(self):
        return [m for m in self.modules() if isinstance(m, Gate)]

    def trunk(self, idx, cache=None, start_pos=0):
        """Main model up to (excluding) the final norm. Returns hidden (B, T, dim), summed balance loss."""
        T = idx.size(1)
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        h = self.embed(idx)
        balance = h.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            h, b = layer(h, cos, sin, None if cache is None else cache[i], start_pos)
            balance = balance + b
        return h, balance

    def forward(self, idx, targets=None, trained_only=False):
        """idx (B, T) token ids; targets (B, T) = idx shifted by one (targets[:, i] = t_{i+1}); a target of -1 is
        not trained (SFT masks everything but the assistant's tokens, for the main head and every MTP depth alike).
        Returns logits (B, T, vocab) and, with targets, the parts of the V3 loss (train.py weighs them):
          ce      main next-token cross-entropy (scalar),
          mtp     CE_k of each MTP depth k = 1..D, shape (D,) (depth k at position i predicts t_{i+k+1}),
          balance the sequence-wise balance loss summed over the MoE layers, MTP blocks included (scalar).
        trained_only=True runs the head on the trained positions only (logits: (N, vocab) for those N): chat SFT
        trains about a third of its positions, and on a small model the 50,304-row head is most of a step. Its
        shapes depend on the data, so pretraining (every position trained) and compiled runs leave it off."""
        h, balance = self.trunk(idx)
        if targets is None:
            return self.head(self.norm(h)), None

        def head_ce(hidden, norm, tgt):  # (logits, CE) of one head over its positions
            if trained_only:
                keep = tgt >= 0
                hidden, tgt = hidden[keep], tgt[keep]
            logits = self.head(norm(hidden))
            return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tgt.reshape(-1),
                                           ignore_index=-1)

        logits, ce = head_ce(h, self.norm, targets)
        mtp = []
        T = idx.size(1)
        for k, module in enumerate(self.mtp, start=1):
            # Depth k runs on the shortened window i = 0..T-k-1 (V3 eq. 21-25): its inputs are h^{k-1}_i and
            # Emb(t_{i+k}) = Emb(idx[:, i+k]); its label is t_{i+k+1} = targets[:, i+k].
            h, b = module(h[:, :T - k], self.embed(idx[:, k:]), self.rope_cos[:T - k], self.rope_sin[:T - k])
            mtp.append(head_ce(h, module.norm, targets[:, k:])[1])
            balance = balance + b
        mtp = torch.stack(mtp) if mtp else ce.new_zeros(0)
        return logits, {"ce": ce, "mtp": mtp, "balance": balance}

    # ---- auxiliary-loss-free balancing ----------------------------------------------------------

    @torch.no_grad()
    def update_expert_bias(self, gamma, all_reduce=None):
        """After an optimizer step: bias_i += gamma * sign(mean_j(c_j) - c_i), c = tokens routed to each expert
        over all micro-batches of the step (V3 sec. 2.1.2). all_reduce(tensor) may sum the stacked counts of
        all MoE layers across DDP ranks first (one collective), so every rank applies the same update.
        Resets the counts. Returns (max, min) load relative to the mean over all layers, as tensors (no sync)."""
        gates = self.gates()
        if not gates:
            return None, None
        counts = torch.stack([g.tokens_per_expert for g in gates])   # (n_moe_layers, E)
        if all_reduce is not None:
            all_reduce(counts)
        mean = counts.mean(dim=-1, keepdim=True)
        delta = gamma * torch.sign(mean - counts)
        for g, d in zip(gates, delta):
            g.bias += d
            g.tokens_per_expert.zero_()
        load = counts / mean.clamp(min=1)
        return load.max(), load.min()

    # ---- cached generation (absorbed MLA) -------------------------------------------------------

    def init_cache(self, batch_size, device=None, dtype=None):
        """One (latent, k_pe) cache per main layer and per MTP block: (B, max_seq_len, kv_lora_rank) and
        (B, max_seq_len, qk_rope_head_dim) -- the only attention state MLA needs at decode time."""
        cfg, p = self.cfg, self.head.weight
        device, dtype = device or p.device, dtype or p.dtype
        return [(torch.zeros(batch_size, cfg.max_seq_len, cfg.kv_lora_rank, device=device, dtype=dtype),
                 torch.zeros(batch_size, cfg.max_seq_len, cfg.qk_rope_head_dim, device=device, dtype=dtype))
                for _ in range(cfg.n_layers + cfg.n_mtp)]

    def cache_bytes_per_token(self, dtype_bytes=2):
        """(MLA latent cache, equivalent multi-head-attention K/V cache) in bytes per token, main layers."""
        cfg = self.cfg
        mla = cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes
        mha = cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * dtype_bytes
        return mla, mha

    def decode(self, idx, cache, start_pos):
        """Absorbed-MLA forward of tokens idx (B, T) at positions start_pos.. with the cache (prefill: T = prompt,
        decode: T = 1, speculative verify: T = drafts + 1). Writes the cache at those positions; entries past
        start_pos + T are ignored, so rolling back is just decoding again from an earlier start_pos.
        Returns logits (B, T, vocab) and the last layer's hidden state (B, T, dim) for the MTP modules."""
        h, _ = self.trunk(idx, cache, start_pos)
        return self.head(self.norm(h)), h

    def mtp_decode(self, k, h_prev, idx, cache, start_pos):
        """MTP module k (0-based) at positions start_pos..: h_prev (B, T, dim) is h^{k} of those positions
        (the main hidden for k = 0) and idx (B, T) holds t_{i+k+1} for each position i. Returns the module's
        logits (predicting t_{i+k+2}) and its hidden state h^{k+1}."""
        T = idx.size(1)
        cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        module = self.mtp[k]
        h, _ = module(h_prev, self.embed(idx), cos, sin, cache[self.cfg.n_layers + k], start_pos)
        return self.head(module.norm(h)), h

    # ---- reports --------------------------------------------------------------------------------

    def param_report(self):
        """Parameter counts: total, active per token (input embedding excluded: it is a lookup), per component."""
        cfg = self.cfg
        comp = {}
        for name, p in self.named_parameters():  # the first part of ("." + name) that matches names the component
            key = next((k for part, k in [(".mtp.", "mtp"), (".embed.", "embed"), (".head.", "head"),
                                          (".attn.", "attention"), (".ffn.experts.", "routed_experts"),
                                          (".ffn.shared_experts.", "shared_experts"), (".ffn.gate.", "gate"),
                                          (".ffn.", "dense_ffn")] if part in "." + name), "norms")
            comp[key] = comp.get(key, 0) + p.numel()
        total = sum(comp.values())
        frac = cfg.n_activated_experts / cfg.n_routed_experts
        mtp_routed = sum(p.numel() for n, p in self.named_parameters() if n.startswith("mtp.") and ".experts." in n)
        active_main = total - comp["embed"] - comp.get("mtp", 0) - comp.get("routed_experts", 0) * (1 - frac)
        active_mtp = comp.get("mtp", 0) - mtp_routed * (1 - frac)
        return {"total": total, "active": int(active_main), "active_with_mtp": int(active_main + active_mtp),
                "components": comp}

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token, torchtitan convention: 6 * active matmul params (head included, input
        embedding excluded, the head counted again per MTP depth) + 6 * attention layers * n_heads *
        (qk_head_dim + v_head_dim) * seq_len (no causal discount). MTP modules included."""
        cfg, T = self.cfg, seq_len or self.cfg.max_seq_len
        frac = cfg.n_activated_experts / cfg.n_routed_experts
        active = sum(p.numel() * (frac if ".experts." in name else 1) for name, p in self.named_parameters()
                     if not name.startswith("embed.") and p.dim() >= 2)  # lookups and norm gains are not matmuls
        active += cfg.n_mtp * self.head.weight.numel()  # the shared head runs once more per MTP depth
        attn = 6 * (cfg.n_layers + cfg.n_mtp) * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * T
        return 6 * active + attn

    def estimate_mfu(self, tokens_per_sec, peak_flops, seq_len=None):
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware peak."""
        return self.flops_per_token(seq_len) * tokens_per_sec / peak_flops


# ----------------------------------------------------------------------------------------------
# System helpers shared by every script: mixed precision, the device check, the GPU peak for MFU, DDP

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "B200": 2250e12, "A100": 312e12, "A10G": 125e12,
              "L4": 121e12, "4090": 165e12}  # dense bf16 tensor-core peak FLOP/s, by GPU name


def autocast_context(device_type, dtype, compile=False):
    """Forward-pass precision: autocast to 'bfloat16' / 'float16', or plain fp32 for 'float32'. compile=True needs
    bf16: under torch.compile the MoE's grouped_mm accepts bf16 only."""
    check_choice("dtype", dtype, DTYPES)
    if compile and dtype != "bfloat16":
        raise UserError(f"compile=True needs dtype='bfloat16', not {dtype!r}: under torch.compile the MoE's "
                        "grouped_mm accepts bf16 only (or set compile=False)")
    return nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=DTYPES[dtype])


def check_device(device):
    """torch.device(device), or a one-line UserError: scripts run on the CPU or on a CUDA device that exists."""
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch's message lists two dozen device types
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"unknown --device={device!r}: use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA is not available here: use --device=cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"no --device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def gpu_peak_flops(device):
    """PEAK_FLOPS of a CUDA device, found by its name; 0.0 for the CPU or an unknown GPU (then no MFU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)


def grouped_mm_path(capability, dtype):
    """(fast, line): whether the MoE's F.grouped_mm runs PyTorch's fused kernel on a CUDA device of this (major, minor)
    compute capability with operands of this dtype, and a line saying so. PyTorch's _grouped_mm_cuda
    (aten/src/ATen/native/cuda/GroupedBlas.cpp) takes its fused kernel only where
    _scaled_mm_allowed_device(sm90_only=true, sm100_only=true) holds, i.e. major == 9 or 10 (H100/H200, B200/B300),
    and both operands and the output are bf16. Anything else (A100, RTX 3090/4090, L4, RTX 5090 at 12.0; fp32 on
    an H100) takes _grouped_mm_fallback (GroupedMMUtils.h): the offsets copied to the host, a sync, then one mm per
    expert, in each of an MoE layer's 9 grouped matmuls (3 forward, 6 backward). No faster path is offered here:
    without the offsets on the host, a sync-free one must pad every expert to all N*K rows (E times the memory) or
    run every token through every expert (E/K times the FLOPs), and torch.compile takes the same fallback (Inductor's
    Triton grouped-GEMM template is gated to capability >= 9.0)."""
    major, minor = capability
    head = f"grouped_mm: CUDA compute capability {major}.{minor}, {str(dtype).removeprefix('torch.')}:"
    if major in (9, 10) and dtype == torch.bfloat16:
        return True, f"{head} PyTorch's fused grouped GEMM kernel for the MoE experts (no host sync)"
    return False, (f"{head} no fused grouped GEMM kernel (PyTorch has one for capability 9.x/10.x in bfloat16 only): "
                   "each MoE grouped matmul copies the expert offsets to the host (a sync) and runs one matmul per "
                   "expert, so the MoE will be slow here: bench.py --baseline_model=dense shows how slow against "
                   "the same model all dense")


def sdpa_path(cfg, device, dtype):
    """(fast, line): the kernel PyTorch's SDPA picks for MLA's training attention at cfg's shapes (one sequence of
    max_seq_len, with gradients) on device under autocast to dtype ('bfloat16' | 'float16' | 'float32'), asked of
    PyTorch itself (torch._fused_sdp_choice on the operands MLA.sdpa_operands builds, so their layout and v's view
    offset are the real ones), and a line saying so. fast is False for MATH, the unfused kernel: it materialises
    the (T, T) scores of every head, slow and O(T^2) in memory, and nothing else says it was taken. On CUDA with
    qk head dim != v head dim (MLA: 96 / 64 here) flash refuses (equal dims only); cuDNN comes first where PyTorch
    prefers it (sm90/sm100 with cuDNN > 9.15), else the memory-efficient kernel: both need head dims that are
    multiples of 8 in bf16 (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp). Under torch.compile the trace
    asks the same chooser (_fused_sdp_choice_meta, attention.cpp), on Inductor's layouts. The module is built on
    the meta device and given uninitialised memory, so no generator is drawn from."""
    from torch.nn.attention import SDPBackend
    device = torch.device(device)
    with torch.device("meta"):
        attn = MLA(cfg)
    attn = attn.to_empty(device=device)
    cos, sin = (t.to(device) for t in precompute_freqs_cis(cfg))
    x = torch.zeros(1, cfg.max_seq_len, cfg.dim, device=device)
    with autocast_context(device.type, dtype):
        q, k, v = attn.sdpa_operands(*attn.project(x, cos, sin))
    name = SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=True, scale=attn.softmax_scale)).name
    padded = f", v padded to {q.size(-1)}" if v.size(-1) != cfg.v_head_dim else ""
    line = (f"sdpa: {device.type} {dtype}, MLA training attention (qk head dim {cfg.qk_head_dim}, v head dim "
            f"{cfg.v_head_dim}{padded}): {name}")
    if name != "MATH":
        return True, line
    why = ("the CPU's flash kernel needs equal qk and v head dims (PAD_V_DEVICES pads v only up to the qk dim)"
           if device.type == "cpu" else "CUDA's fused kernels need head dims that are multiples of 8 in bf16 "
           "(qk_nope_head_dim too: v is a view at that offset), cuDNN's also at most 128 (256 on sm90/sm100 with "
           "cuDNN > 9.22)")
    return False, (f"{line}, PyTorch's unfused kernel: slow, and (T, T) scores per head in memory: {why}; "
                   "dev/sdpa_backends.py times each backend")


def init_distributed(device):
    """Under torchrun (RANK set): join the process group (NCCL on CUDA, gloo on the CPU) and take this process's
    GPU. Returns (ddp, rank, local_rank, world_size, device); outside torchrun (False, 0, 0, 1, device)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 0, 1, device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    # Imported before the group exists: its functions' default group=group.WORLD, read at import (DDP imports it), would
    # hold the group forever, and gloo's worker threads, outliving destroy_process_group, can abort Python's exit.
    import torch.distributed.nn.functional  # noqa: F401
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return True, dist.get_rank(), local_rank, dist.get_world_size(), device


def fully_shard_model(model, bf16):
    """FSDP2 (train.py --fsdp=True, under torchrun): shard `model`'s parameters, gradients and optimizer state over
    the processes, in place. Units, each all-gathered for its forward and backward and freed after: every Block,
    then the root with the rest (embedding, head, norms, the MTP modules' projection and norms). An MTP module's
    Block is the unit, not the module: Transformer.forward applies the module's final norm outside the module's
    forward, after FSDP would have freed it. bf16: the blocks gather bf16 weights (their matmuls run in bf16 under
    autocast anyway) and reduce gradients in fp32; their inputs are not cast (the residual stream and the RoPE
    tables stay fp32, as under autocast alone); the routers and the root stay fp32 (V3's router is fp32, and the
    residual stream starts from the fp32 embedding). decode and mtp_decode (sampling, the chat eval) are forward
    methods too, and their logits are rank 0's: under FSDP every rank must run every forward, so all ranks must
    pick the same tokens and stop together, whatever last bit their kernels differ in."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    low = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        if bf16 and isinstance(block.ffn, MoE):
            fully_shard(block.ffn.gate)
        fully_shard(block, **({"mp_policy": low} if bf16 else {}))
    fully_shard(model)
    for name in ("decode", "mtp_decode"):
        register_fsdp_forward_method(model, name)
        setattr(model, name, _rank0_logits(getattr(model, name)))
    return model


def _rank0_logits(method):
    """method (decode / mtp_decode, returning (logits, hidden)) with every rank's logits replaced by rank 0's."""
    def wrapped(*args, **kwargs):
        logits, h = method(*args, **kwargs)
        dist.broadcast(logits, src=0)
        return logits, h
    return wrapped
