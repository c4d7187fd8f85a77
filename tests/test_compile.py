"""torch.compile on the CPU: the GPU default path (train.py's compile=True: torch.compile of the model, bf16
autocast, the MoE's F.grouped_mm) captured as one graph, forward and backward, with losses, gradients and expert
counts equal to eager's over steps whose routing differs, and no recompile after the first step.

The steps are train.py's: the model compiled (here with fullgraph=True, so that a graph break fails), called
under model.autocast_context('cpu', 'bfloat16', compile=True) with targets, its loss parts weighed as train.py's
v3_loss weighs them, backward, then the expert-bias update between steps. Cases: pretraining with and without MTP,
chat SFT (targets -1 on most positions, with the default trained_only=False: what train.py compiles), and LoRA
(lora.add_lora, rank 8, with and without the routed experts' adapters, with trained token rows).

fullgraph=True is not enough on its own: torch 2.13 no longer breaks the graph at .item() / .tolist() or at ops
whose output shape depends on the data (nonzero, boolean-mask indexing); it captures them with "unbacked"
symbols instead. On the GPU each is still a device-to-host sync, and the dispatch is meant to have none (static
N*K rows). So the backend here also refuses any graph with an unbacked symbol (CheckedBackend).

Backend: most tests use "aot_eager". It runs everything that finds graph breaks, host syncs and recompiles (Dynamo
with fullgraph and its guards, AOTAutograd's joint forward/backward graph and functionalisation, the bf16-only
meta function of grouped_mm) and then runs the captured aten graphs eagerly. Inductor, the real default, builds
every fused kernel with g++ on the CPU (cold cache, busy 2-core machine: 2.5 minutes for conftest's tiny model
with MTP; 65 s for one MoE layer, 40 s with the C++ kernels' vectorisation off), so one test (test_inductor_step)
runs it, on a one-MoE-layer model without vectorisation: on the GPU Inductor generates Triton kernels instead, so
the CPU's C++ vector code is not what it tests; Inductor's lowering of the graph, grouped_mm included, is.

test_a_graph_break_host_sync_or_recompile_fails shows that the checks have teeth: an explicit graph break, an
.item() host sync or a per-expert Python loop (nonzero) patched into the MoE dispatch, trained_only=True (the
head on the trained positions only: data-dependent shapes) and a batch of another length at the second step (a
recompile) each make the same helper fail. test_float32_compile_needs_bf16 checks the reason model.autocast_context
gives for refusing compile=True without bf16.
"""
import copy

import pytest
import torch
import torch._dynamo
import torch._inductor.config
import torch.nn.functional as F
from torch._dynamo.backends.registry import lookup_backend
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

import model as model_module
from conftest import tiny_model
from lora import add_lora
from model import autocast_context

MTP_LAMBDA, BALANCE_ALPHA, BIAS_SPEED = 0.3, 1e-4, 1e-3  # train.py's defaults
SMALL = dict(n_layers=2)  # conftest's TINY with one main MoE layer (after the dense first layer) and the MTP block
ONE_MOE = dict(n_layers=1, n_dense_layers=0, n_mtp=0)  # the smallest model with an MoE layer


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CheckedBackend:
    """A torch.compile backend: `backend` (by name) on each graph Dynamo captures, counting them (.graphs) and
    noting every node with a data-dependent value (.unbacked): an .item() / .tolist() (a host sync on the GPU) or
    a data-dependent shape. Those graphs run uncompiled (nothing to wait for: the test fails on them)."""

    def __init__(self, backend):
        self.inner, self.graphs, self.unbacked = lookup_backend(backend), 0, []

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        bad = [f"{n.format_node()}" for n in gm.graph.nodes if free_unbacked_symbols(n.meta.get("example_value"))]
        self.unbacked += bad
        return gm.forward if bad else self.inner(gm, example_inputs)


def v3_loss(parts, n_mtp):
    """train.py's v3_loss: CE + mtp_lambda * mean over the D depths of CE_k + balance_alpha * balance."""
    return parts["ce"] + MTP_LAMBDA * parts["mtp"].sum() / max(n_mtp, 1) + BALANCE_ALPHA * parts["balance"]


def batches(n, vocab, B=2, T=32, masked=False, seed=0):
    """n random (x, y) batches; masked: chat SFT's targets, -1 (not trained) on about 70% of the positions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x, y = torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)
        if masked:
            y[torch.rand(B, T, generator=g) < 0.7] = -1
        out.append((x, y))
    return out


def train_step(m, x, y, trained_only=False):
    """Forward with targets under train.py's compile=True autocast, the V3 loss, backward. Returns the loss."""
    with autocast_context("cpu", "bfloat16", compile=True):
        _, parts = m(x, y, trained_only=trained_only)
    loss = v3_loss(parts, len(getattr(m, "_orig_mod", m).mtp))
    loss.backward()
    return loss.detach()


def assert_close(got, want, rtol, what):
    err, ref = (got.float() - want.float()).norm().item(), want.float().norm().item()
    assert err <= rtol * ref + 1e-6, f"{what}: |compiled - eager| = {err:.3g}, |eager| = {ref:.3g}"


def compiled_equals_eager(eager, data, backend="aot_eager", gamma=BIAS_SPEED, rtol=2e-2, trained_only=False):
    """train_step on each batch of `data` with `eager` and with a compiled copy of it (fullgraph=True); after each
    step the losses, the gradients of every trained parameter and each MoE layer's expert counts agree, then both
    models update their expert bias (gamma, as train.py does after the optimizer step). The first step captures
    one graph, free of host syncs; every later step must reuse it (a recompile raises). The measured differences
    are about 0.3% (aot_eager) and 0.6% (inductor) of a gradient's norm, from bf16 rounding.
    Returns the expert counts of every step (n_steps, n_moe_layers, E)."""
    eager.train()
    compiled_model = copy.deepcopy(eager)
    checked = CheckedBackend(backend)
    compiled = torch.compile(compiled_model, backend=checked, fullgraph=True)
    trained = [n for n, p in eager.named_parameters() if p.requires_grad]
    assert trained
    steps = []
    for i, (x, y) in enumerate(data):
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = train_step(compiled, x, y, trained_only)
        assert not checked.unbacked, "host sync or data-dependent shape in the compiled graph:\n" + \
            "\n".join(checked.unbacked[:5])
        want = train_step(eager, x, y, trained_only)
        assert_close(got, want, rtol / 4, f"loss, step {i}")
        grads = dict(compiled_model.named_parameters())
        for name, p in eager.named_parameters():
            if p.requires_grad:
                assert grads[name].grad is not None, f"no gradient for {name} in the compiled model, step {i}"
                assert_close(grads[name].grad, p.grad, rtol, f"gradient of {name}, step {i}")
            else:
                assert p.grad is None and grads[name].grad is None, name
        counts = torch.stack([g.tokens_per_expert for g in eager.gates()])
        assert torch.equal(torch.stack([g.tokens_per_expert for g in compiled_model.gates()]), counts), \
            f"expert counts differ, step {i}"
        steps.append(counts.clone())
        for m in (eager, compiled_model):
            m.update_expert_bias(gamma)
            m.zero_grad(set_to_none=True)
    assert checked.graphs == 1, f"{checked.graphs} graphs captured, expected 1"
    steps = torch.stack(steps)
    for i in range(1, len(steps)):  # the routing differs from step to step: the graph is not tied to one
        assert not torch.equal(steps[i], steps[i - 1]), f"steps {i - 1} and {i} routed alike: a weak test"
    return steps


@pytest.mark.parametrize("n_mtp", [1, 0])
def test_pretraining_step(n_mtp):
    m = tiny_model(0, n_mtp=n_mtp, **SMALL)
    counts = compiled_equals_eager(m, batches(3, m.cfg.vocab_size))
    K = m.cfg.n_activated_experts  # every token of the main MoE layer (B * T) and of the MTP block (B * (T - 1))
    assert counts.sum(-1).tolist() == [[2 * 32 * K, 2 * 31 * K][:1 + n_mtp]] * 3


def test_sft_step_masked_targets():
    m = tiny_model(0, **SMALL)
    compiled_equals_eager(m, batches(3, m.cfg.vocab_size, masked=True))


@pytest.mark.parametrize("experts", [False, True])
def test_lora_step(experts):
    """LoRA SFT: adapters (random, as trained ones are: B = 0 at init would give A no gradient) and trained rows
    of the embedding and head. train.py freezes the expert bias in LoRA runs: gamma 0."""
    m = tiny_model(0, **SMALL)
    add_lora(m, 8, 16.0, experts=experts, token_rows=[3, 17, 60, 61, 100])
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0, 0.05)
    compiled_equals_eager(m, batches(3, m.cfg.vocab_size, masked=True), gamma=0.0)


def test_inductor_step():
    """The real default backend, on one MoE layer (each block costs g++ time), two steps."""
    m = tiny_model(0, **ONE_MOE)
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):  # scalar C++ kernels: less g++ time
        compiled_equals_eager(m, batches(2, m.cfg.vocab_size), backend="inductor")


def with_graph_break(x, weights, indices, experts, dispatch=model_module.moe_dispatch):
    torch._dynamo.graph_break()
    return dispatch(x, weights, indices, experts)


def with_host_sync(x, weights, indices, experts, dispatch=model_module.moe_dispatch):
    out, counts = dispatch(x, weights, indices, experts)
    return out / counts.max().item(), counts  # e.g. a capacity computed on the host


def expert_loop(x, weights, indices, experts, dispatch=model_module.moe_dispatch):
    """The naive dispatch: one SwiGLU per expert on the rows routed to it (data-dependent row counts)."""
    out = torch.zeros_like(x, dtype=torch.float32)
    for e in range(experts.w1.shape[0]):
        tok, slot = (indices == e).nonzero(as_tuple=True)
        xe = x[tok]
        h = F.silu(xe @ experts.w1[e].to(xe.dtype).T) * (xe @ experts.w3[e].to(xe.dtype).T)
        out = out.index_add(0, tok, (h @ experts.w2[e].to(xe.dtype).T).float() * weights[tok, slot, None])
    return out.type_as(x), dispatch(x, weights, indices, experts)[1]


@pytest.mark.parametrize("case", ["graph_break", "host_sync", "expert_loop", "trained_only", "recompile"])
def test_a_graph_break_host_sync_or_recompile_fails(monkeypatch, case):
    m = tiny_model(0, **ONE_MOE)
    data = batches(2, m.cfg.vocab_size, masked=case == "trained_only")
    if case == "recompile":  # a batch of another length: the compiled graph's shapes are static
        data[1] = tuple(t[:, :16] for t in data[1])
        with pytest.raises(torch._dynamo.exc.RecompileError):
            compiled_equals_eager(m, data)
    elif case == "graph_break":
        monkeypatch.setattr(model_module, "moe_dispatch", with_graph_break)
        with pytest.raises(torch._dynamo.exc.Unsupported):
            compiled_equals_eager(m, data)
    else:
        if case != "trained_only":
            monkeypatch.setattr(model_module, "moe_dispatch", with_host_sync if case == "host_sync" else expert_loop)
        with pytest.raises(AssertionError, match="host sync or data-dependent shape"):
            compiled_equals_eager(m, data, trained_only=case == "trained_only")


def test_float32_compile_needs_bf16():
    """model.autocast_context refuses compile=True with dtype float32: under torch.compile, grouped_mm's meta
    function takes bf16 only. The day a torch release lifts that, this fails, and that check can go."""
    m = tiny_model(0, **ONE_MOE)
    x = batches(1, m.cfg.vocab_size)[0][0]
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError, match="Expected inputs of BF16 type"):
        torch.compile(m, backend="aot_eager", fullgraph=True)(x, x)
