"""model.py against slow, obvious references (fp32, CPU). The model's invariants, each tested below:

 1. RMSNorm: eps 1e-6, weight init 1, computed in fp32. Pre-norm blocks, a final norm, untied embedding and
    head, no Linear biases.
 2. RoPE only on the qk_rope_head_dim slice, interleaved complex pairs as in the official code; k_pe is ONE head
    computed from the block input and shared by all heads; q_pe comes from the normed query latent when
    q_lora_rank > 0. YaRN is an explicit setting (cfg.yarn), never switched on by max_seq_len alone.
 3. kv_norm on the kv latent (not on k_pe); q_norm on the query latent.
 4. Softmax scale (qk_nope_head_dim + qk_rope_head_dim)^-0.5, times mscale^2 only with YaRN.
 5. Training attention is SDPA over materialised K/V; decode is "absorbed" MLA caching only the normed latent
    and k_pe, and its logits equal the full forward's.
 6. Gate: sigmoid affinities in fp32; the expert choice uses scores + bias, the mixing weights never see the
    bias; group-limited routing keeps the groups with the largest top-2 sums and masks the rest with -inf;
    weights = chosen scores / their sum * route_scale.
 7. Routed experts are SwiGLUs of moe_inter_dim; the shared experts one SwiGLU of n_shared * moe_inter_dim,
    always on; the first n_dense_layers are dense SwiGLUs of inter_dim.
 8. Dispatch is vectorised (sort, grouped matmuls, un-sort) and equals a loop over experts in values and grads.
 9. Aux-loss-free balancing: fp32 bias, zero init, never an optimizer parameter; loads counted over the
    micro-batches of a step; bias += gamma * sign(mean - count) after the step; untouched in eval/generation.
10. Sequence-wise balance loss alpha * sum_i f_i P_i per sequence, f_i from the unbiased top-K, without gradient.
11. MTP: depth k reads h^{k-1} and Emb(t_{i+k}) through the SAME embedding, predicts t_{i+k+1} through the SAME
    head; its residual stream stays fp32 like the trunk's; loss = mtp_lambda / D * sum_k CE_k.
12. Init N(0, init_std) for matrices, norms 1, bias 0.
13. Parameter report: total, active per token, per component; FLOPs per token by hand.
Plus the configuration checks: every field's bound and the routing constraints (one-line ValueError when the
config is made), grouped_mm alignment (dim, moe_inter_dim multiples of 8), sigmoid routing only.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import model
from conftest import TINY, loss_of, run, tiny_cfg, tiny_model as model_of
from model import (ModelConfig, MoE, MLA, Gate, RMSNorm, apply_rotary_emb, precompute_freqs_cis,
                   moe_dispatch, sequence_balance_loss)
from sample import generate_tokens


# ---------------------------------------------------------------------------------------------
# names, norms, init (invariants 1, 12, 13)

def test_state_dict_names_follow_official_layout_and_dense_layers_come_first():
    m = model_of(q_lora_rank=8, n_expert_groups=2, n_limited_groups=1, n_layers=4, n_dense_layers=2)
    sd, cfg = m.state_dict(), m.cfg
    assert [type(layer.ffn).__name__ for layer in m.layers] == ["MLP", "MLP", "MoE", "MoE"]
    assert type(m.mtp[0].block.ffn).__name__ == "MoE"  # the MTP block is a full (MoE) layer, like V3's layer 61
    assert m.layers[0].ffn.w1.weight.shape == (cfg.inter_dim, cfg.dim)
    assert not {"embed.weight", "norm.weight", "head.weight", "layers.2.ffn.gate.weight", "layers.2.ffn.gate.bias",
                "layers.2.ffn.shared_experts.w1.weight", "mtp.0.block.ffn.experts.w2",
                *[f"mtp.0.{n}.weight" for n in ("enorm", "hnorm", "eh_proj", "norm")],
                *[f"layers.0.{n}.weight" for n in ("attn_norm", "ffn_norm", "attn.wq_a", "attn.q_norm", "attn.wq_b",
                                                   "attn.wkv_a", "attn.kv_norm", "attn.wkv_b", "attn.wo", "ffn.w1",
                                                   "ffn.w2", "ffn.w3")]} - set(sd)
    E, H, D = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim
    assert [sd[f"layers.2.ffn.experts.{w}"].shape for w in ("w1", "w2", "w3")] == [(E, H, D), (E, D, H), (E, H, D)]
    assert sd["layers.0.attn.wkv_a.weight"].shape == (cfg.kv_lora_rank + cfg.qk_rope_head_dim, D)
    assert sd["layers.2.ffn.shared_experts.w1.weight"].shape == (cfg.n_shared_experts * H, D)
    assert sd["layers.2.ffn.gate.bias"].dtype == torch.float32 and "layers.2.ffn.gate.tokens_per_expert" not in sd
    # no Linear biases anywhere; untied embedding/head
    assert all(not isinstance(mod, torch.nn.Linear) or mod.bias is None for mod in m.modules())
    assert m.embed.weight.data_ptr() != m.head.weight.data_ptr()


def test_init_and_rmsnorm():
    m = model_of(init_std=0.006, dim=64, vocab_size=256)
    for name, p in m.named_parameters():
        if p.dim() >= 2:
            assert abs(p.std().item() - 0.006) < 0.0015 and abs(p.mean().item()) < 1e-3, name
        else:
            assert torch.all(p == 1), name
    assert all(torch.all(g.bias == 0) for g in m.gates())
    # RMSNorm: eps 1e-6, fp32 math even for bf16 input
    n = RMSNorm(16)
    n.weight.data = torch.linspace(0.5, 2, 16)
    x = torch.randn(3, 16) * 5
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * n.weight
    torch.testing.assert_close(n(x), ref, rtol=1e-5, atol=1e-6)
    xb = x.bfloat16()
    refb = (xb.float() / torch.sqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6) * n.weight).bfloat16()
    assert n(xb).dtype == torch.bfloat16 and torch.equal(n(xb), refb) and n.eps == 1e-6


def test_param_report_and_flops_by_hand():
    m = model_of()
    cfg, rep = m.cfg, m.param_report()
    assert rep["total"] == sum(p.numel() for p in m.parameters()) == sum(rep["components"].values())
    E, K, D, H = cfg.n_routed_experts, cfg.n_activated_experts, cfg.dim, cfg.moe_inter_dim
    n_moe = cfg.n_layers - cfg.n_dense_layers
    routed_all, c = n_moe * E * 3 * D * H, rep["components"]
    assert c["routed_experts"] == routed_all
    assert rep["active"] == int(rep["total"] - c["embed"] - c["mtp"] - routed_all * (1 - K / E))
    # FLOPs: count every matmul weight by hand
    T = 32
    attn_w = D * cfg.n_heads * cfg.qk_head_dim + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) \
        + cfg.kv_lora_rank * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) + cfg.n_heads * cfg.v_head_dim * D
    moe_w = E * D + K * 3 * D * H + 3 * D * cfg.n_shared_experts * H
    main = cfg.n_layers * attn_w + cfg.n_dense_layers * 3 * D * cfg.inter_dim + n_moe * moe_w + D * cfg.vocab_size
    mtp = 2 * D * D + attn_w + moe_w + D * cfg.vocab_size
    attn_flops = 6 * (cfg.n_layers + 1) * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * T
    assert m.flops_per_token(T) == pytest.approx(6 * (main + mtp) + attn_flops)
    assert m.estimate_mfu(1000.0, 1e12, T) == pytest.approx(m.flops_per_token(T) * 1000 / 1e12)


# ---------------------------------------------------------------------------------------------
# RoPE (invariant 2) and attention scale (4)

def test_rope_interleaved_layout_and_yarn_switch():
    # max_seq_len above original_seq_len (default 4096) alone keeps plain RoPE and the plain softmax scale
    cfg = tiny_cfg(max_seq_len=8192, qk_rope_head_dim=8)
    cos, sin = precompute_freqs_cis(cfg)
    angles = torch.outer(torch.arange(8192).float(), 1.0 / (cfg.rope_theta ** (torch.arange(0, 8, 2).float() / 8)))
    torch.testing.assert_close((cos, sin), (angles.cos(), angles.sin()))
    assert MLA(cfg).softmax_scale == pytest.approx((8 + 8) ** -0.5)
    # reference: complex multiplication of interleaved pairs (official view_as_complex layout)
    x = torch.randn(1, 5, 2, 8)
    rot = torch.polar(torch.ones(5, 4), angles[:5])
    ref = torch.view_as_real(torch.view_as_complex(x.view(1, 5, 2, 4, 2)) * rot[None, :, None, :]).flatten(-2)
    torch.testing.assert_close(apply_rotary_emb(x, cos[:5], sin[:5]), ref, rtol=1e-5, atol=1e-6)
    # YaRN only when asked for (yarn=True); it then slows the low frequencies (not the highest) and scales the softmax
    plain = precompute_freqs_cis(tiny_cfg(max_seq_len=128, original_seq_len=64, qk_rope_head_dim=8))
    yarn = precompute_freqs_cis(tiny_cfg(max_seq_len=128, original_seq_len=64, qk_rope_head_dim=8, rope_factor=4, yarn=True))
    assert not torch.allclose(plain[0][:64], yarn[0][:64]) and torch.allclose(plain[0][:64, 0], yarn[0][:64, 0])
    assert MLA(tiny_cfg(max_seq_len=128, original_seq_len=64, rope_factor=4, yarn=True)).softmax_scale == \
        pytest.approx((8 + 4) ** -0.5 * (0.1 * math.log(4) + 1) ** 2)  # mscale^2


def _attention_scores(attn: MLA, x, cos, sin):
    """Per-head pre-softmax scores of the naive MLA path, written out by hand."""
    B, T, _ = x.shape
    q = attn.wq(x).view(B, T, attn.n_heads, -1)
    q_nope, q_pe = q.split([attn.nope, attn.rope], -1)
    c, k_pe = attn.wkv_a(x).split([attn.kv_lora_rank, attn.rope], -1)
    k_nope = attn.wkv_b(attn.kv_norm(c)).view(B, T, attn.n_heads, -1)[..., :attn.nope]
    q_pe, k_pe = apply_rotary_emb(q_pe, cos, sin), apply_rotary_emb(k_pe.unsqueeze(2), cos, sin)
    return torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthd,bshd->bhts", q_pe, k_pe)


def _sdpa_qk(attn: MLA, x, cos, sin, monkeypatch):
    """The queries and keys (B, T, heads, qk_head_dim) that MLA's training path itself hands to SDPA."""
    seen, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.detach().transpose(1, 2), k.detach().transpose(1, 2)))
        return real(q, k, v, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(F, "scaled_dot_product_attention", spy)
        attn(x, cos, sin)
    assert len(seen) == 1
    return seen[0]


def test_rope_only_on_rope_slice_relative_positions_and_one_shared_k_pe(monkeypatch):
    """RoPE moves only the rope dims, and scores depend on relative position only. k_pe is ONE qk_rope_head_dim head
    computed from the block input (wkv_a's last rows, roped, never normed): every head's key has that same rope
    part, on the training path (the keys SDPA gets) and in the decode cache."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    attn = MLA(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    cos, sin = precompute_freqs_cis(cfg)
    B, T, H, nope, rope = 1, 6, cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    x = torch.randn(B, T, cfg.dim)
    # the model's own q/k for the same tokens at positions 0..5 and 7..12: nope dims never see position, rope dims do
    (q0, k0), (q7, k7) = _sdpa_qk(attn, x, cos[:6], sin[:6], monkeypatch), _sdpa_qk(attn, x, cos[7:13], sin[7:13],
                                                                                      monkeypatch)
    assert torch.equal(q0[..., :nope], q7[..., :nope]) and torch.equal(k0[..., :nope], k7[..., :nope])
    assert not torch.allclose(q0[..., nope:], q7[..., nope:]) and not torch.allclose(k0[..., nope:], k7[..., nope:])
    s0, s7 = (_attention_scores(attn, x, cos[a:a + 6], sin[a:a + 6]) for a in (0, 7))  # shifted by 7 positions
    torch.testing.assert_close(s0, s7, rtol=1e-4, atol=1e-5)   # scores depend on relative position only
    assert not torch.allclose(s0, _attention_scores(attn, x, cos[:6].flip(0), sin[:6].flip(0)))
    # MLA's own forward agrees with these scores: compare against softmax(scores) @ v by hand
    y = attn(x, cos[:6], sin[:6])
    c = attn.kv_norm(attn.wkv_a(x)[..., :cfg.kv_lora_rank])
    v = attn.wkv_b(c).view(1, 6, cfg.n_heads, -1)[..., cfg.qk_nope_head_dim:]
    p = (s0 * attn.softmax_scale).masked_fill(~torch.ones(6, 6).tril().bool(), float("-inf")).softmax(-1)
    ref = attn.wo(torch.einsum("bhts,bshd->bthd", p, v).flatten(2))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)

    # k_pe: room for one rope head in wkv_a, not H
    assert attn.wkv_a.weight.shape == (cfg.kv_lora_rank + rope, cfg.dim)

    def k_pe_by_hand():  # rotate wkv_a(x)'s rope slice as complex pairs, by position * frequency (no apply_rotary_emb)
        raw = attn.wkv_a(x)[..., cfg.kv_lora_rank:].detach()
        freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, rope, 2).float() / rope))
        rot = torch.polar(torch.ones(T, rope // 2), torch.outer(torch.arange(T).float(), freqs))
        return torch.view_as_real(torch.view_as_complex(raw.view(B, T, rope // 2, 2)) * rot).flatten(-2)

    def check_shared(k):  # every head's rope part is the hand-made k_pe
        torch.testing.assert_close(k[..., nope:], k_pe_by_hand()[:, :, None].expand(-1, -1, H, -1), rtol=1e-5, atol=1e-6)

    check_shared(k0)
    # head 0's own weights (its query rows of wq, its k_nope/v rows of wkv_b) move its keys, not the shared rope part
    with torch.no_grad():
        attn.wq.weight.view(H, nope + rope, cfg.dim)[0] += 1.0
        attn.wkv_b.weight.view(H, nope + cfg.v_head_dim, cfg.kv_lora_rank)[0] += 1.0
    _, k2 = _sdpa_qk(attn, x, cos[:T], sin[:T], monkeypatch)
    assert not torch.allclose(k2[:, :, 0, :nope], k0[:, :, 0, :nope]) and torch.equal(k2[..., nope:], k0[..., nope:])
    check_shared(k2)
    # the absorbed decode path caches exactly that one k_pe per token
    cache = (torch.zeros(B, cfg.max_seq_len, cfg.kv_lora_rank), torch.zeros(B, cfg.max_seq_len, rope))
    with torch.no_grad():
        attn(x, cos[:T], sin[:T], cache, 0)
    torch.testing.assert_close(cache[1][:, :T], k_pe_by_hand(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Gate and balancing (invariants 6, 9, 10)

def test_gate_bias_changes_choice_not_weights():
    torch.manual_seed(0)
    cfg = tiny_cfg(n_routed_experts=8, n_activated_experts=3, route_scale=2.5)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(64, cfg.dim)
    w0, i0, s0 = gate(x)
    s_ref = torch.sigmoid(x @ gate.weight.T)
    torch.testing.assert_close(s0, s_ref)
    assert torch.equal(i0.sort(-1).values, s_ref.topk(3, -1).indices.sort(-1).values)
    torch.testing.assert_close(w0, s_ref.gather(1, i0) / s_ref.gather(1, i0).sum(-1, keepdim=True) * 2.5)
    gate.bias[5] = 10.0  # force expert 5 into every top-k
    w1, i1, s1 = gate(x)
    assert (i1 == 5).any(-1).all() and not torch.equal(i0.sort(-1).values, i1.sort(-1).values)
    # mixing weights of the chosen experts are the UNBIASED scores, renormalised: bias never enters them
    expect = s_ref.gather(1, i1)
    torch.testing.assert_close(w1, expect / expect.sum(-1, keepdim=True) * 2.5)
    torch.testing.assert_close(s1, s0)


def test_group_limited_routing_never_picks_masked_group():
    torch.manual_seed(0)
    cfg = tiny_cfg(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=4)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=1.0)
    gate.bias.copy_(torch.randn(16) * 0.1)
    x = torch.randn(200, cfg.dim)
    _, idx, scores = gate(x)
    kept = (scores + gate.bias).view(200, 4, 4).topk(2, -1).values.sum(-1).topk(2, -1).indices  # (N, 2) allowed groups
    assert (((idx // 4).unsqueeze(-1) == kept.unsqueeze(1)).any(-1)).all()  # the chosen experts' groups
    # and within the kept groups it is the plain top-k of biased scores
    allowed = torch.zeros(200, 4, dtype=torch.bool).scatter(1, kept, True).repeat_interleave(4, dim=1)
    ref = (scores + gate.bias).masked_fill(~allowed, float("-inf")).topk(4, -1).indices
    assert torch.equal(idx.sort(-1).values, ref.sort(-1).values)
    # some token's unrestricted top-4 would have used a masked group, so the mask matters in this case
    assert not torch.equal((scores + gate.bias).topk(4, -1).indices.sort(-1).values, ref.sort(-1).values)


def test_vectorised_moe_matches_loop_reference_values_and_grads():
    torch.manual_seed(0)
    cfg = tiny_cfg()  # 8 routed experts, 2 active
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe.gate.bias[[6, 7]] = -100.0  # experts 6 and 7 receive no tokens at all
    x = torch.randn(3, 10, cfg.dim, requires_grad=True)
    y, _ = moe(x)
    w, idx, _ = moe.gate(x.view(-1, cfg.dim))
    assert not (idx >= 6).any() and set(idx.unique().tolist()) == set(range(6))
    _, counts = moe_dispatch(x.view(-1, cfg.dim), w, idx, moe.experts)
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts).int())
    # the slow, obvious DeepSeekMoE: loop over experts, each applied to the tokens that chose it
    x_ref = x.detach().clone().requires_grad_(True)
    flat = x_ref.view(-1, cfg.dim)
    weights, indices, _ = moe.gate(flat)
    ref, ex = moe.shared_experts(flat), moe.experts
    for e in range(cfg.n_routed_experts):
        tok, slot = torch.where(indices == e)
        ye = (F.silu(flat[tok] @ ex.w1[e].T) * (flat[tok] @ ex.w3[e].T)) @ ex.w2[e].T
        ref = ref.index_add(0, tok, ye * weights[tok, slot, None])
    ref = ref.view_as(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x] + list(moe.parameters()))
    grads_ref = torch.autograd.grad((ref * g).sum(), [x_ref] + list(moe.parameters()))
    torch.testing.assert_close(grads, grads_ref, rtol=1e-5, atol=1e-5)
    w1_grad = grads[1 + [n for n, _ in moe.named_parameters()].index("experts.w1")]
    assert torch.all(w1_grad[6:] == 0) and w1_grad[:6].abs().sum() > 0
    # counts accumulate only in training forwards
    assert moe.gate.tokens_per_expert.sum().item() == 30 * 2
    moe.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # grouped_mm in bf16, the output in x's dtype
        yb, _ = moe(x)
    assert yb.dtype == torch.float32 and torch.allclose(yb, y, atol=5e-2, rtol=5e-2)
    assert moe.gate.tokens_per_expert.sum().item() == 30 * 2  # unchanged


def test_sequence_balance_loss_by_hand():
    cfg = tiny_cfg(n_routed_experts=4, n_activated_experts=2)
    # B=1, T=2 sequences by hand
    s = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.7, 0.1, 0.6, 0.3]], requires_grad=True)
    loss = sequence_balance_loss(s, cfg, 1, 2)
    # top-2 per token: {0,1}, {0,2} -> counts [2,1,1,0]; f = N/(K T) * counts = 4/4 * counts
    f = torch.tensor([2.0, 1.0, 1.0, 0.0])
    P = torch.stack([s[0] / s[0].sum(), s[1] / s[1].sum()]).mean(0)
    assert loss.item() == pytest.approx((f * P).sum().item(), rel=1e-6)
    # gradient flows only through P (f is a constant count)
    (g,) = torch.autograd.grad(loss, s)
    s2 = s.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((f * (s2 / s2.sum(-1, keepdim=True)).mean(0)).sum(), s2)
    torch.testing.assert_close(g, g_ref)
    # averaged over sequences: two different sequences -> mean of their own losses
    s3 = torch.rand(2 * 5, 4)
    each = (sequence_balance_loss(s3[:5], cfg, 1, 5) + sequence_balance_loss(s3[5:], cfg, 1, 5)) / 2
    assert sequence_balance_loss(s3, cfg, 2, 5).item() == pytest.approx(each.item(), rel=1e-6)
    # perfect balance gives exactly 1 (so alpha * 1 = alpha)
    uniform = torch.full((8, 4), 0.5)
    uniform[torch.arange(8), torch.arange(8) % 4] = 0.9
    uniform[torch.arange(8), (torch.arange(8) + 1) % 4] = 0.8
    assert sequence_balance_loss(uniform, cfg, 1, 8).item() == pytest.approx(
        (torch.ones(4) * (uniform / uniform.sum(-1, keepdim=True)).mean(0)).sum().item())


def test_bias_update_direction_and_reset():
    m = model_of()
    gates = m.gates()
    assert len(gates) == 3  # 2 MoE layers + the MTP block's MoE: all balanced
    E = m.cfg.n_routed_experts
    gates[0].tokens_per_expert.copy_(torch.tensor([10., 0, 5, 5, 5, 5, 5, 5]))  # mean 5: 0 overloaded, 1 underloaded
    gates[1].tokens_per_expert.fill_(5)
    hi, lo = m.update_expert_bias(1e-3)
    b = gates[0].bias
    assert b[:2].tolist() == pytest.approx([-1e-3, 1e-3]) and torch.all(b[2:] == 0) and torch.all(gates[1].bias == 0)
    assert hi.item() == pytest.approx(2.0) and lo.item() == pytest.approx(0.0)
    assert all(torch.all(g.tokens_per_expert == 0) for g in gates)
    # the all-reduce hook sees the stacked counts of every MoE layer (one collective) before the update
    seen = []
    gates[2].tokens_per_expert.copy_(torch.arange(E, dtype=torch.float32))
    m.update_expert_bias(0.5, all_reduce=lambda t: (seen.append(t.shape), t.mul_(2)))
    assert seen == [(3, E)] and gates[2].bias[[0, -1]].tolist() == pytest.approx([0.5, -0.5])
    m.update_expert_bias(0.0)  # gamma 0 freezes
    assert gates[2].bias[0].item() == pytest.approx(0.5)


def test_eval_and_generation_leave_bias_and_counts_unchanged():
    m = model_of(n_mtp=2)
    for g in m.gates():
        g.bias.copy_(torch.randn_like(g.bias))
    x = torch.randint(0, 128, (2, 12))
    m(x[:, :-1], x[:, 1:])  # nonzero load counters
    before = {k: v.clone() for k, v in m.state_dict().items()}
    counts = [g.tokens_per_expert.clone() for g in m.gates()]
    assert all(c.sum() > 0 for c in counts)
    with torch.no_grad():
        m.eval()(x)
    m.train()
    for speculative, temperature in [(False, 0), (False, 0.8), (True, 0), (True, 0.8)]:
        list(generate_tokens(m, x[0, :5].tolist(), 12, temperature, top_k=10, speculative=speculative,
                             generator=torch.Generator().manual_seed(0)))
    assert m.training  # generation restores the mode
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(torch.equal(c, g.tokens_per_expert) for c, g in zip(counts, m.gates()))


# ---------------------------------------------------------------------------------------------
# Absorbed decode (invariant 5)

@pytest.mark.parametrize("q_lora_rank", [0, 8])
def test_absorbed_cached_decode_matches_full_forward(q_lora_rank):
    """Absorbed decode, main model and MTP module alike, equals the training forward. Stale cache entries past
    start_pos + T are ignored: speculative decoding rolls back by decoding again from an earlier start_pos."""
    m = model_of(q_lora_rank=q_lora_rank, n_expert_groups=2, n_limited_groups=1).eval()
    for g in m.gates():
        g.bias.copy_(torch.randn_like(g.bias) * 0.01)
    x = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        full, _ = m(x)
        cache = m.init_cache(2)
        steps = [m.decode(x[:, t:t + 1], cache, t)[0] for t in range(20)]  # token by token from position 0
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
        # a 5-token prefill, a rejected draft written into positions 5..7, then single-token steps from 5
        cache = m.init_cache(2)
        steps = [m.decode(x[:, :5], cache, 0)[0]]
        m.decode(torch.tensor([[7, 8, 9]] * 2), cache, 5)
        steps += [m.decode(x[:, t:t + 1], cache, t)[0] for t in range(5, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
        # the MTP module: the training path, and mtp_decode in two chunks
        h, _ = m.trunk(x)
        hm, _ = m.mtp[0](h[:, :19], m.embed(x[:, 1:]), m.rope_cos[:19], m.rope_sin[:19])
        _, hd = m.decode(x, cache, 0)
        a, _ = m.mtp_decode(0, hd[:, :6], x[:, 1:7], cache, 0)
        b, _ = m.mtp_decode(0, hd[:, 6:19], x[:, 7:20], cache, 6)
    torch.testing.assert_close(torch.cat([a, b], 1), m.head(m.mtp[0].norm(hm)), rtol=1e-5, atol=1e-5)
    # the cache holds kv_lora_rank + qk_rope_head_dim numbers per token per layer, nothing else
    assert len(cache) == m.cfg.n_layers + m.cfg.n_mtp and all(kv.shape[-1] + pe.shape[-1] == 16 + 4 for kv, pe in cache)


def test_v_padding_for_sdpa_is_exact(monkeypatch):
    """On CPU, MLA pads v to the qk head dim so SDPA can take its flash kernel; the unpadded path (CUDA's) must
    give the same outputs and gradients."""
    m = model_of()
    x = torch.randint(0, 128, (2, 12))
    out = {}
    for pad in (True, False):
        monkeypatch.setattr(model, "PAD_V_DEVICES", {"cpu"} if pad else set())
        m.zero_grad()
        logits, losses = m(x[:, :-1], x[:, 1:])
        loss_of(losses).backward()
        out[pad] = (logits.detach(), [p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# MTP (invariant 11)

def test_mtp_label_alignment_shared_embedding_head_and_balance_part():
    m = model_of(n_mtp=2)
    seq = torch.randint(0, 128, (2, 17))
    idx, targets = seq[:, :-1], seq[:, 1:]
    T = idx.size(1)
    _, losses = m(idx, targets)
    # by hand: depth 1 at position i sees h_i and Emb(t_{i+1}) and is scored against t_{i+2}
    h, _ = m.trunk(idx)
    h1, _ = m.mtp[0](h[:, :T - 1], m.embed(seq[:, 1:T]), m.rope_cos[:T - 1], m.rope_sin[:T - 1])
    l1 = F.cross_entropy(m.head(m.mtp[0].norm(h1)).flatten(0, 1), seq[:, 2:T + 1].flatten())
    h2, _ = m.mtp[1](h1[:, :T - 2], m.embed(seq[:, 2:T]), m.rope_cos[:T - 2], m.rope_sin[:T - 2])
    l2 = F.cross_entropy(m.head(m.mtp[1].norm(h2)).flatten(0, 1), seq[:, 3:T + 1].flatten())
    # one CE per depth, shape (2,); train.py averages them and weighs by mtp_lambda
    torch.testing.assert_close(losses["mtp"], torch.stack([l1, l2]), rtol=1e-5, atol=0)
    assert losses["ce"].item() == pytest.approx(F.cross_entropy(m(idx)[0].flatten(0, 1), targets.flatten()).item(),
                                                rel=1e-5)
    # the balance part: the sum over the 4 MoE layers (2 in the trunk, 1 per MTP block) of per-layer losses, each
    # ~1 when balanced, without alpha
    assert 0 < losses["balance"].item() < 4 * 4
    # depth-1 logits at position i cannot see t_{i+2}: changing it leaves positions <= i unchanged
    i = 5
    seq2 = seq.clone()
    seq2[:, i + 2] = (seq2[:, i + 2] + 1) % 128
    h_b, _ = m.trunk(seq2[:, :-1])
    h1_b, _ = m.mtp[0](h_b[:, :T - 1], m.embed(seq2[:, 1:T]), m.rope_cos[:T - 1], m.rope_sin[:T - 1])
    torch.testing.assert_close(h1_b[:, :i + 1], h1[:, :i + 1])
    assert not torch.allclose(h1_b[:, i + 1], h1[:, i + 1])
    # shared embedding and head: the model has exactly one of each, and MTP gradients reach them
    assert sorted(n for n, _ in m.named_parameters() if n.endswith(("embed.weight", "head.weight"))) == \
        ["embed.weight", "head.weight"]
    m.zero_grad()
    l1.backward()
    assert m.embed.weight.grad.abs().sum() > 0 and m.head.weight.grad.abs().sum() > 0
    # the trunk feeds h^0 (before the main final norm), so the MTP loss trains it too: every trunk layer gets a
    # gradient, the last one's routed experts included; the main model's final norm gets none
    assert m.norm.weight.grad is None and all(layer.attn.wkv_a.weight.grad.abs().sum() > 0 for layer in m.layers)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.layers[-1].ffn.experts.parameters())
    # eh_proj's output is bf16 under autocast; the MTP block must carry an fp32 residual like the trunk
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h, _ = m.trunk(idx)
        out, _ = m.mtp[0](h, m.embed(idx), m.rope_cos[:T], m.rope_sin[:T])
    assert h.dtype == out.dtype == torch.float32 and m.eval()(idx, targets)[1]["balance"].item() == 0.0


# ---------------------------------------------------------------------------------------------
# overfitting, configuration checks, torch version

def test_tiny_model_overfits_one_batch():
    m = model_of(vocab_size=128, dim=64, n_layers=2, n_heads=4, max_seq_len=32)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    seq = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(1))
    ces = []
    for step in range(150):
        _, l = m(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss_of(l).backward()
        opt.step()
        m.update_expert_bias(1e-3)
        ces.append(l["ce"].item())
    assert abs(ces[0] - math.log(128)) < 0.2 and ces[-1] < 0.5, ces[-1]


# (overrides on TINY, the field the error names, the bound it states): first one value past each field's own bound,
# then the rules between fields. TINY: 8 routed experts, 2 active, 1 group, n_layers 3 + n_mtp 1.
BAD_CONFIGS = [({f: v}, f, bound) for f, (v, bound) in dict(
    vocab_size=(0, ">= 1"), dim=(0, ">= 1"), n_layers=(0, ">= 1"), n_dense_layers=(-1, ">= 0"), n_heads=(0, ">= 1"),
    inter_dim=(0, ">= 1"), moe_inter_dim=(0, ">= 1"), q_lora_rank=(-1, ">= 0"), kv_lora_rank=(0, ">= 1"),
    qk_nope_head_dim=(0, ">= 1"), qk_rope_head_dim=(0, ">= 2"), v_head_dim=(0, ">= 1"), n_shared_experts=(-1, ">= 0"),
    n_activated_experts=(0, ">= 1"), n_expert_groups=(0, ">= 1"), n_limited_groups=(0, ">= 1"),
    route_scale=(math.nan, "finite and > 0"), max_seq_len=(0, ">= 1"), original_seq_len=(0, ">= 1"),
    rope_theta=(1.0, "> 1"), rope_factor=(0.5, ">= 1"), beta_fast=(0, "> 0"), beta_slow=(-1, "> 0"),
    mscale=(-1.0, ">= 0"), n_mtp=(-1, ">= 0"), init_std=(0.0, "> 0")).items()] + [
    ({"init_std": math.inf}, "init_std", "finite and > 0"), ({"mscale": math.inf}, "mscale", "finite and >= 0"),
    ({"n_routed_experts": 0, "n_activated_experts": 0, "n_dense_layers": 4}, "n_routed_experts",
     ">= 1 (an all-dense model keeps it and sets n_dense_layers = n_layers + n_mtp)"),
    ({"qk_rope_head_dim": 3}, "qk_rope_head_dim", "even"),
    ({"n_dense_layers": 5}, "n_dense_layers", "<= n_layers + n_mtp = 4"),
    ({"n_activated_experts": 9}, "n_activated_experts", "<= n_routed_experts = 8"),
    ({"n_expert_groups": 3}, "n_routed_experts", "divisible by n_expert_groups = 3"),
    ({"n_expert_groups": 2, "n_limited_groups": 3}, "n_limited_groups", "<= n_expert_groups = 2"),
    ({"n_expert_groups": 8}, "n_expert_groups", ">= 2 experts per group"),
    ({"n_routed_experts": 16, "n_expert_groups": 4, "n_activated_experts": 5}, "n_activated_experts",
     "<= n_limited_groups * experts per group = 1 * 4 = 4"),
    ({"score_func": "softmax"}, "score_func", "'sigmoid'"),
    ({"yarn": "yes"}, "yarn", "True or False"),
    ({"yarn": True, "original_seq_len": 32}, "max_seq_len", "> original_seq_len = 32 with yarn=True"),
    ({"beta_fast": 1, "beta_slow": 32}, "beta_fast", ">= beta_slow = 32"),
    ({"dim": 36}, "dim", "a multiple of 8"), ({"moe_inter_dim": 12}, "moe_inter_dim", "a multiple of 8"),
]


def _ids(overrides):
    return ",".join(f"{k}={v}" for k, v in overrides.items())


@pytest.mark.parametrize("overrides, field, bound", BAD_CONFIGS, ids=[_ids(o) for o, _, _ in BAD_CONFIGS])
def test_bad_config_is_one_line_value_error(overrides, field, bound):
    """Every field's bound is checked when the config is made, before any module is built: one ValueError line
    that names the field, its value and the bound (not a reshape/ZeroDivisionError inside the first forward)."""
    value = {**TINY, **overrides}.get(field, getattr(ModelConfig, field))  # the class holds the defaults
    with pytest.raises(ValueError) as e:
        tiny_cfg(**overrides)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"bad ModelConfig: {field} must be ") and bound in msg, msg
    assert msg.endswith(f", got {value!r}"), msg


@pytest.mark.parametrize("overrides", [
    {"n_layers": 1, "n_dense_layers": 0, "n_mtp": 0, "n_shared_experts": 0, "qk_rope_head_dim": 2,
     "n_activated_experts": 1},
    {"n_dense_layers": 4},                                                                    # all dense
    {"n_routed_experts": 16, "n_expert_groups": 8, "n_limited_groups": 1, "n_activated_experts": 2},  # 2 per group
    {"n_routed_experts": 16, "n_expert_groups": 4, "n_limited_groups": 4, "n_activated_experts": 16},
    {"yarn": True, "max_seq_len": 64, "original_seq_len": 32, "rope_factor": 1.0, "beta_fast": 1, "beta_slow": 1,
     "mscale": 0.0}], ids=_ids)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # n_shared_experts=0: an empty SwiGLU
def test_configs_at_their_bounds_build_and_run(overrides):
    """The bounds are no tighter than the code: a config at its bounds trains a step and decodes correctly."""
    m = model_of(**overrides)
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    _, losses = m(x[:, :-1], x[:, 1:])
    loss_of(losses).backward()
    assert torch.isfinite(loss_of(losses)) and m.param_report()["total"] > 0 and m.flops_per_token() > 0
    with torch.no_grad():
        full, _ = m.eval()(x)
        cached, _ = m.decode(x, m.init_cache(2), 0)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_torch_without_grouped_mm_gets_one_line():
    p = run("-c", "import torch.nn.functional as F; del F.grouped_mm; import model", timeout=120)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [p.stderr.strip()] and "torch >= 2.10" in p.stderr
