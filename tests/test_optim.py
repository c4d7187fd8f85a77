"""optim.py: Newton-Schulz orthogonalisation (2-D and batched per-expert 3-D), the update's RMS, equality with
torch.optim.Muon on matrices, and which parameter goes to which optimizer."""
import copy

import pytest
import torch

from conftest import loss_of, tiny_model
from optim import Muon, Optimizers, build_optimizer, muon_takes, newton_schulz


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (8, 48, 16), (8, 16, 48)])
def test_newton_schulz_is_near_orthogonal(shape):
    """Five quintic steps move singular values spread over 1.5 decades into the iteration's band (about
    0.7-1.2) and keep the singular vectors: the result is U S' V^T with the input's U and V."""
    torch.manual_seed(0)
    *batch, m, n = shape  # random matrices (or a stack) U diag(s) V^T with random singular vectors
    s = torch.logspace(-1.5, 0, min(m, n))
    u, v = (torch.linalg.qr(torch.randn(*batch, d, len(s)))[0] for d in (m, n))
    g = u @ torch.diag(s) @ v.mT
    o = newton_schulz(g)
    assert o.shape == g.shape and o.dtype == torch.float32
    sv = torch.linalg.svdvals(o.double())
    assert sv.min() > 0.6 and sv.max() < 1.25, (sv.min(), sv.max())
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    s_prime = u.mT @ o.double() @ vh.mT  # diagonal iff o has the input's singular vectors
    diag = torch.diagonal(s_prime, dim1=-2, dim2=-1)
    assert (s_prime - torch.diag_embed(diag)).abs().max() < 1e-3 and diag.min() > 0.6


def test_batched_newton_schulz_equals_per_expert():
    """A stack of experts (E, out, in) is orthogonalised per expert: the batched call equals each 2-D call (and
    differs from orthogonalising the flattened (E*out, in) matrix, which would mix the experts)."""
    torch.manual_seed(0)
    g = torch.randn(6, 24, 40)
    g[2] *= 100  # one expert with a much larger gradient must not shrink the others' updates
    batched = newton_schulz(g)
    for e in range(6):
        torch.testing.assert_close(batched[e], newton_schulz(g[e]), rtol=1e-5, atol=1e-5)
    flat = newton_schulz(g.reshape(6 * 24, 40)).reshape(6, 24, 40)
    assert (flat - batched).abs().max() > 0.1


def exact_orthogonal(g, steps=5):
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return (u @ vh).float()


@pytest.mark.parametrize("shape", [(48, 48), (32, 128), (128, 32), (8, 96, 32)])
def test_update_rms_matches_adamw_scale(shape, monkeypatch):
    """Moonlight's scaling: lr * 0.2 * sqrt(max(rows, cols)) times an orthogonal matrix has an RMS of exactly
    0.2 * lr, whatever the shape, so AdamW's learning rate carries over. With Newton-Schulz's singular values in
    its band, the RMS is within that band around 0.2 * lr."""
    import optim as muon
    lr = 0.01

    def update_rms():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(shape))
        before = p.detach().clone()
        p.grad = torch.randn(shape)
        Muon([p], lr=lr, weight_decay=0.0).step()
        return (p.detach() - before).pow(2).mean().sqrt().item() / lr

    assert 0.2 * 0.7 < update_rms() < 0.2 * 1.2
    monkeypatch.setattr(muon, "newton_schulz", exact_orthogonal)
    assert update_rms() == pytest.approx(0.2, rel=1e-5)


def test_two_steps_equal_torch_muon_on_matrices(monkeypatch):
    """On 2-D parameters our Muon is torch.optim.Muon with Moonlight's scaling (adjust_lr_fn='match_rms_adamw'):
    the same momentum, Nesterov, weight decay and update size (checked with torch's Newton-Schulz swapped for
    ours, so only the step around it is compared) and the same Newton-Schulz (ours in fp32 against torch's,
    which always runs in bf16)."""
    torch.manual_seed(0)
    g = torch.randn(40, 24)
    theirs = torch.optim._muon._zeropower_via_newtonschulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
    assert (newton_schulz(g) - theirs).abs().max() < 0.02 * theirs.abs().max()  # bf16 rounding only

    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", lambda g, coeffs, steps, eps: newton_schulz(g, steps))
    ours = [torch.nn.Parameter(torch.randn(s)) for s in [(40, 24), (24, 40)]]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    opt_ours = Muon(ours, lr=0.02, weight_decay=0.1, momentum=0.9)
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_theirs.step()
    for a, b, p0 in zip(ours, theirs, start):
        assert (a.detach() - p0).abs().max() > 0.02  # real steps ...
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)  # ... and the same ones


def test_parameter_routing():
    """optimizer='muon': the hidden matrices and expert stacks (attention, dense/shared FFNs, experts, MTP's
    eh_proj and block) go to Muon; the embedding, head, router and every 1-D gain go to AdamW, with weight decay
    on its matrices only. Every parameter is in exactly one group."""
    m = tiny_model(q_lora_rank=16)
    opt = build_optimizer(m, "muon", 1e-3, 0.1, (0.9, 0.95))
    muon_opt, adamw = opt.optimizers
    assert isinstance(opt, Optimizers) and isinstance(muon_opt, Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in m.named_parameters()}
    in_muon = {names[id(p)] for g in muon_opt.param_groups for p in g["params"]}
    decayed = {names[id(p)] for p in adamw.param_groups[0]["params"]}
    not_decayed = {names[id(p)] for p in adamw.param_groups[1]["params"]}
    assert decayed == {"embed.weight", "head.weight"} | {n for n in names.values() if n.endswith("ffn.gate.weight")}
    assert not_decayed == {n for n, p in m.named_parameters() if p.dim() == 1}
    assert in_muon == set(names.values()) - decayed - not_decayed
    assert {"layers.0.attn.wq_a.weight", "layers.0.attn.wkv_b.weight", "layers.0.ffn.w2.weight",
            "layers.1.ffn.experts.w1", "layers.1.ffn.shared_experts.w3.weight", "mtp.0.eh_proj.weight"} <= in_muon
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    assert all(muon_takes(n, p) == (n in in_muon) for n, p in m.named_parameters())
    assert muon_opt.param_groups[0]["weight_decay"] == 0.1 and adamw.param_groups[0]["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer(m, "sgd", 1e-3, 0.1, (0.9, 0.95))


def test_muon_state_round_trips_and_refuses_adamw_state():
    """The combined state dict restores both optimizers exactly (same next step), and an AdamW state is refused."""
    torch.manual_seed(0)
    m1, m2 = tiny_model(), tiny_model()
    m2.load_state_dict(m1.state_dict())
    o1, o2 = (build_optimizer(m, "muon", 1e-2, 0.1, (0.9, 0.95)) for m in (m1, m2))
    x = torch.randint(0, m1.cfg.vocab_size, (2, 16))
    for m, o in ((m1, o1), (m2, o2)):
        loss_of(m(x, x)[1]).backward()
        o.step()
        o.zero_grad()
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))  # as from a file: no tensor shared with o1
    for m, o in ((m1, o1), (m2, o2)):
        loss_of(m(x, x)[1]).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    for g in o2.param_groups:  # the lr schedule still reaches both optimizers after a load
        g["lr"] = 0.5
    assert [g["lr"] for o in o2.optimizers for g in o.param_groups] == [0.5] * 3
    with pytest.raises(ValueError, match="optimizer='muon'"):
        o1.load_state_dict(build_optimizer(m1, "adamw", 1e-2, 0.1, (0.9, 0.95)).state_dict())


def test_adamw_decays_only_matrices_and_never_sees_the_expert_bias():
    m = tiny_model()
    opt = build_optimizer(m, "adamw", 1e-3, 0.1, (0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))
    in_opt = {p.data_ptr() for g in opt.param_groups for p in g["params"]}
    assert all(g.bias.data_ptr() not in in_opt and not g.bias.requires_grad for g in m.gates())
