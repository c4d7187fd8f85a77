"""LoRA (lora.py): adapters on MLA and the SwiGLUs (and, optionally, the routed experts), merged for decoding and
export; LoRA SFT through train.py with exact resume, DDP and its base pinned by hash."""
import copy
import inspect
import json
from dataclasses import asdict

import pytest
import torch

import export
import tasks
from checkpoint import load_model, save_checkpoint
from data.loader import get_tokenizer
from conftest import TORCHRUN, ok, one_line_error, run_forked, save_ckpt, tiny_model
from lora import LoRAExperts, LoRALinear, add_lora, adapter_state, base_hash, merge_lora
from model import ModelConfig, Transformer
from optim import build_optimizer


def adapted(experts, seed=0, token_rows=None, **cfg):
    """A random tiny model with random adapters (B != 0, so they change the output) and nonzero expert biases."""
    m = tiny_model(seed, **cfg)
    with torch.no_grad():
        for g in m.gates():
            g.bias.uniform_(-0.2, 0.2)
    base = copy.deepcopy(m.state_dict())
    add_lora(m, 4, 8.0, 0.0, experts=experts, token_rows=token_rows)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    return m.eval(), base


@pytest.mark.parametrize("experts", [False, True])
@pytest.mark.parametrize("q_lora_rank", [0, 8])
def test_merged_equals_unmerged_and_cached_decode_equals_forward(experts, q_lora_rank):
    """With experts, also trained rows 7, 60, 61, 120 of the embedding and head (TokenRows, as for the chat tokens)."""
    m, base_state = adapted(experts, q_lora_rank=q_lora_rank, token_rows=[7, 60, 61, 120] if experts else None)
    wanted = {"wq_a", "wq_b"} if q_lora_rank else {"wq"}
    got = {n.split(".")[-1] for n, mod in m.named_modules() if isinstance(mod, LoRALinear)}
    assert got == wanted | {"wkv_a", "wkv_b", "wo", "w1", "w2", "w3"}
    assert any(isinstance(mod, LoRAExperts) for mod in m.modules()) == experts
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    x[:, ::3] = torch.arange(100, 104).repeat(4)[:8]  # the trained rows' tokens, as inputs and as targets
    y = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, parts = m(x, y)
        plain = merge_lora(copy.deepcopy(m))
        merged_logits, merged_parts = plain(x, y)
        # cached decode with the adapters unmerged: prefill 10 tokens, then one at a time
        cache = m.init_cache(2, dtype=torch.float32)
        steps = [m.decode(x[:, :10], cache, 0)[0]] + [m.decode(x[:, i:i + 1], cache, i)[0] for i in range(10, 24)]
    assert (logits - merged_logits).abs().max().item() <= 1e-5
    assert (parts["mtp"] - merged_parts["mtp"]).abs().max().item() <= 1e-5
    assert (torch.cat(steps, 1) - logits).abs().max().item() <= 1e-5
    # the adapters really act: the base model alone gives other logits
    base = tiny_model(0, q_lora_rank=q_lora_rank)
    base.load_state_dict(base_state)
    assert (base.eval()(x)[0] - logits).abs().max().item() > 1e-3
    # merged: plain modules and exactly the base model's state-dict keys and shapes
    assert not any(isinstance(mod, (LoRALinear, LoRAExperts)) for mod in plain.modules())
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}


def test_only_the_adapters_train_and_their_size():
    """After optimizer steps on a loss, only adapter tensors moved: the embedding, head, norms, router weight,
    expert bias and the base matrices are bit for bit the same. Trainable parameters on the quick-start model
    (config/train_tiny.py's architecture) and the optimizer state, against full fine-tuning's."""
    m, base = adapted(True, token_rows=[7, 60, 61, 120])
    m.train()
    opt = build_optimizer(m, "adamw", 1e-2, 0.1, (0.9, 0.95))
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        _, parts = m(x, x)
        (parts["ce"] + parts["mtp"].sum()).backward()
        opt.step()
        opt.zero_grad()
        m.update_expert_bias(0.0)
    after = m.state_dict()
    for k, v in base.items():
        assert torch.equal(after[k], v), k
    rows = {n: p for n, p in m.named_parameters() if "lora_rows" in n}
    assert set(rows) == {"embed.lora_rows", "head.lora_rows"}
    assert not torch.equal(rows["head.lora_rows"], base["head.weight"][100:104])  # the rows did train
    assert all("lora_" in n for n, p in m.named_parameters() if p.requires_grad)

    cfg = {}
    exec(open("config/train_tiny.py").read(), {}, cfg)
    tiny = ModelConfig(**{k: v for k, v in cfg.items() if k in ModelConfig.__dataclass_fields__})
    sizes = {}
    for experts in (None, False, True):
        torch.manual_seed(0)
        model = Transformer(tiny)
        total = sum(p.numel() for p in model.parameters())
        chat_rows = list(range(50257, 50261))
        trainable = total if experts is None else add_lora(model, 8, 16.0, experts=experts, token_rows=chat_rows)
        opt = build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.95))
        _, parts = model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
        parts["ce"].backward()
        opt.step()
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())
        sizes[experts] = (trainable / total, state)
    print(f"\ntrainable fraction / optimizer state bytes: full {sizes[None]}, LoRA {sizes[False]}, "
          f"LoRA with experts {sizes[True]}")
    assert sizes[False][0] <= 0.01 and sizes[False][0] < sizes[True][0]
    assert sizes[None][1] >= 10 * sizes[True][1] and sizes[None][1] >= 10 * sizes[False][1]


def test_merged_export_loads_in_transformers(tmp_path):
    """A LoRA checkpoint (adapters + its base's path and hash) exports as one plain model whose logits in
    transformers' DeepseekV3 equal ours with the adapters unmerged."""
    from test_export import load_hf_clean
    m, base_state = adapted(True, vocab_size=256, token_rows=[7, 60, 61, 120])
    base = tiny_model(0, vocab_size=256)
    base.load_state_dict(base_state)
    save_ckpt(tmp_path / "base", base)
    lora = dict(base=str(tmp_path / "base"), hash=base_hash(base.state_dict()), rank=4, alpha=8.0, dropout=0.0,
                targets=["wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "w1", "w2", "w3"], experts=True,
                token_rows=[7, 60, 61, 120])
    (tmp_path / "lora").mkdir()
    save_checkpoint(str(tmp_path / "lora" / "ckpt.pt"), {"model": adapter_state(m), "model_config": asdict(m.cfg),
                                                          "lora": lora})
    export.main([f"--out_dir={tmp_path / 'lora'}", f"--hf_dir={tmp_path / 'hf'}", "--tokenizer=False"])
    hf = load_hf_clean(tmp_path / "hf")
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    idx[:, ::4] = 101
    with torch.no_grad():
        diff = (hf(idx).logits - m(idx)[0]).abs().max().item()
    print(f"\nLoRA export: max |logit diff| vs transformers = {diff:.3g}")
    assert diff <= 1e-4


def lora_sft(out, base, *args, launch=()):
    """train.py's LoRA SFT after `launch` (torchrun, a launcher script), as conftest.run_forked's process (torchrun:
    its launcher; the workers are fresh processes)."""
    return run_forked(*launch, "train.py", f"--init_from={base}", f"--out_dir={out}", "--chat_data=tasks",
                      "--chat_tasks=40", "--device=cpu", "--dtype=float32", "--compile=False", "--batch_size=2",
                      "--total_batch_size=384", "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=2",
                      "--lr_decay_iters=6", "--eval_iters=2", "--log_interval=1", "--sample_tokens=0",
                      "--lora_rank=4", "--lora_experts=True", "--lora_dropout=0.1", *args)


def test_lora_sft_resumes_exactly_runs_under_ddp_and_pins_its_base(tmp_path):
    """train.py --lora_rank: the checkpoint holds the adapters only (plus the base's path and hash) and the expert
    bias stays frozen; resuming is bit-exact (dropout's RNG included); 2 DDP ranks train as one process does;
    readers (load_model, chat.py) get the merged model; a changed base is refused in one line."""
    chat_model = tiny_model(0, vocab_size=50304, max_seq_len=96)
    with torch.no_grad():
        for g in chat_model.gates():
            g.bias.uniform_(-0.1, 0.1)
    base = save_ckpt(tmp_path / "base", chat_model, step=200)
    straight, split = tmp_path / "straight", tmp_path / "split"
    p = ok(lora_sft(straight, base, "--max_iters=6", "--eval_interval=3"))
    assert "LoRA rank 4 on" in p.stdout and "trainable parameters" in p.stdout
    ok(lora_sft(split, base, "--max_iters=3", "--eval_interval=3"))
    ok(lora_sft(split, base, "--max_iters=6", "--eval_interval=3", "--init_from=resume"))
    logs = [[json.loads(line) for line in open(d / "log.jsonl")] for d in (straight, split)]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]] and len(logs[0]) == 6
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (straight, split))
    assert set(a["model"]) == set(b["model"]) and all("lora_" in k for k in a["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["lora"]["hash"] == base_hash(chat_model.state_dict()) and a["lora"]["base"] == str(base)
    # the trained rows (lora_tokens='replies'): the 4 chat tokens and every token of a training reply
    enc = get_tokenizer()
    replies = {t for c in tasks.sft_conversations(40, "train", 1337) for t in enc.encode_ordinary(c[1]["content"])}
    rows = sorted(replies | set(range(50257, 50261)))
    assert a["lora"]["token_rows"] == rows and a["model"]["embed.lora_rows"].shape == (len(rows), 32)
    assert a["model"]["head.lora_rows"].shape == (len(rows), 32) and 90 < len(rows) < 200
    assert a["model"]["layers.1.ffn.experts.w1_lora_B"].abs().sum() > 0  # the experts' adapters trained
    # readers get the merged model: base weights + (alpha / r) B A, expert bias unchanged
    merged, _ = load_model(straight)
    expected = copy.deepcopy(chat_model)
    add_lora(expected, 4, 16.0, experts=True, token_rows=rows)
    expected.load_state_dict(a["model"], strict=False)
    x = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(x)[0] - expected.eval()(x)[0]).abs().max().item() <= 1e-5
    assert torch.equal(merged.layers[1].ffn.gate.bias, chat_model.layers[1].ffn.gate.bias)
    ok(run_forked("chat.py", f"--out_dir={straight}", "--prompt=What is 2 + 3?", "--device=cpu", "--max_new_tokens=4"))
    # DDP: 2 ranks x 1 row equal 1 process x 2 accumulation steps (dropout off: its masks differ per rank)
    ok(lora_sft(tmp_path / "single", base, "--max_iters=3", "--eval_interval=100", "--batch_size=1",
                "--total_batch_size=192", "--lora_dropout=0.0"))
    ok(lora_sft(tmp_path / "ddp", base, "--max_iters=3", "--eval_interval=100", "--batch_size=1",
                "--total_batch_size=192", "--lora_dropout=0.0", launch=TORCHRUN))
    s, d = ([json.loads(line)["loss"] for line in open(tmp_path / n / "log.jsonl")] for n in ("single", "ddp"))
    assert d == pytest.approx(s, rel=1e-4)
    # a different base: every reader and a resume refuse it in one line, and nothing is written
    other = tiny_model(1, vocab_size=50304, max_seq_len=96)
    save_ckpt(base, other, step=200)
    err = one_line_error(run_forked("chat.py", f"--out_dir={straight}", "--prompt=hi", "--device=cpu"), "chat.py")
    assert "LoRA adapters trained on other weights" in err
    before = (straight / "ckpt.pt").read_bytes()
    err = one_line_error(lora_sft(straight, base, "--max_iters=9", "--eval_interval=3", "--init_from=resume"),
                         "train.py")
    assert "other weights" in err and (straight / "ckpt.pt").read_bytes() == before
    err = one_line_error(lora_sft(straight, base, "--max_iters=9", "--init_from=resume", "--lora_rank=8"), "train.py")
    assert "lora_rank=4" in err


def tf32(t):
    """t rounded to TF32's 10-bit mantissa (to nearest): how a GPU's matmul reads float32 inputs with TF32 on."""
    return ((t.contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def tf32_merged_weight(self):
    """LoRALinear.merged_weight as a GPU computes it with allow_tf32 (which train.py turns on)."""
    return self.weight + self.scale * (tf32(self.lora_B) @ tf32(self.lora_A)).to(self.weight.dtype)


# python tf32.py SCRIPT ARGS...: runs SCRIPT with the GPU's rounding of every adapter merge, on the CPU
TF32_LAUNCH = f"""import runpy, sys, torch
sys.path.insert(0, ".")
import lora
{inspect.getsource(tf32)}
{inspect.getsource(tf32_merged_weight)}
lora.LoRALinear.merged_weight = tf32_merged_weight
sys.argv[0] = script = sys.argv.pop(1)
runpy.run_path(script, run_name="__main__")
"""


def test_a_lora_run_on_a_lora_run_reads_back_whatever_device_merged_its_base(tmp_path, monkeypatch):
    """train.py with lora_rank on a LoRA checkpoint merges the base's adapters where it runs: on a GPU with TF32 on,
    B A rounds differently from the CPU's float32 product that every reader (load_model, a resume) computes. The hash
    it records must not depend on that: here the writer runs with the GPU's rounding (a stand-in on the CPU), and a
    reader with either merge accepts its adapters; a changed base is still refused."""
    import lora
    from checkpoint import load_checkpoint
    from configurator import UserError
    base_model = tiny_model(0, vocab_size=50304, max_seq_len=96)
    base = save_ckpt(tmp_path / "base", base_model, step=200)
    first = copy.deepcopy(base_model)  # a LoRA SFT run on base: its adapters, trained (B != 0)
    add_lora(first, 4, 8.0)
    with torch.no_grad():
        for name, p in first.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    info = dict(rank=4, alpha=8.0, dropout=0.0, targets=list(lora.TARGETS), experts=False, token_rows=None,
                base=str(base), hash=base_hash(base_model.state_dict()))
    (tmp_path / "first").mkdir()
    save_checkpoint(str(tmp_path / "first" / "ckpt.pt"), {"model": adapter_state(first), "lora": info,
                                                         "model_config": asdict(base_model.cfg), "step": 10})
    launcher = tmp_path / "tf32.py"
    launcher.write_text(TF32_LAUNCH)
    wq = first.layers[0].attn.wq  # the stand-in really rounds: its merged weights differ from the CPU's
    assert not torch.equal(tf32_merged_weight(wq), wq.merged_weight())
    second = tmp_path / "second"
    ok(lora_sft(second, tmp_path / "first", "--max_iters=1", "--eval_interval=1", "--chat_tasks=8",
                "--lora_experts=False", launch=[launcher]))
    assert load_checkpoint(str(second))["lora"]["base"] == str(tmp_path / "first")
    load_model(second)  # the CPU's merge
    monkeypatch.setattr(lora.LoRALinear, "merged_weight", tf32_merged_weight)
    load_model(second)  # the GPU's
    monkeypatch.undo()
    # a run written before checkpoint_hash recorded the hash of the base's merged weights: still read on the CPU
    old = torch.load(second / "ckpt.pt", weights_only=True)
    old["lora"]["hash"] = base_hash(merge_lora(copy.deepcopy(first)).state_dict())
    torch.save(old, second / "ckpt.pt")
    load_model(second)
    # the hash still pins the base: other adapters in the first run are refused
    state = torch.load(tmp_path / "first" / "ckpt.pt", weights_only=True)
    state["model"]["layers.0.attn.wq.lora_B"] += 1e-3
    torch.save(state, tmp_path / "first" / "ckpt.pt")
    with pytest.raises(UserError, match="LoRA adapters trained on other weights"):
        load_model(second)
