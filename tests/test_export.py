"""export.py: the Hugging Face export gives the same logits in transformers, loads without missing/unexpected
weights, and its tokenizer encodes exactly like tiktoken; the official layout round-trips."""
import gzip
import io
import json
import logging
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

for _module in ("transformers", "safetensors", "tokenizers"):
    pytest.importorskip(_module, reason=f"export tests need {_module} (pip install -r requirements-dev.txt)")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3ForCausalLM  # noqa: E402

import export  # noqa: E402
from checkpoint import load_model  # noqa: E402
from data.fineweb import SAMPLE_FILE  # noqa: E402
from conftest import exit_message, ok, run_forked, save_ckpt, tiny_model, train_args  # noqa: E402
from model import precompute_freqs_cis  # noqa: E402
from sample import generate_tokens  # noqa: E402

def random_model(seed=0, **kw):
    """A random model whose expert biases are nonzero, so routing depends on them."""
    m = tiny_model(seed, **{"vocab_size": 256, **kw}).eval()
    with torch.no_grad():
        for g in m.gates():
            g.bias.uniform_(-0.2, 0.2)
    return m


def load_hf_clean(path):
    """DeepseekV3ForCausalLM in fp32/eager, asserting that it loaded with no missing/unexpected/mismatched
    weights, neither in its loading info nor in anything transformers logged."""
    buf, logger = io.StringIO(), logging.getLogger("transformers")
    handler = logging.StreamHandler(buf)
    logger.addHandler(handler)
    try:
        hf, info = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                         output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    log = buf.getvalue()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert "UNEXPECTED" not in log and "MISSING" not in log and "newly initialized" not in log, log
    return hf.eval()


CONFIGS = {
    "q0_g1_mtp1": dict(),
    "q8_g2_scale2.5_mtp1": dict(q_lora_rank=8, n_expert_groups=2, n_limited_groups=1, route_scale=2.5),
    "q8_g2_mtp0": dict(q_lora_rank=8, n_expert_groups=2, n_limited_groups=1, n_mtp=0, n_routed_experts=16,
                       n_activated_experts=4, n_shared_experts=2),
    "yarn": dict(max_seq_len=32, original_seq_len=8, rope_factor=4.0, route_scale=2.5, yarn=True),
    # mscale 0: no attention temperature at all (transformers would otherwise infer one from the factor)
    "yarn_mscale0": dict(max_seq_len=32, original_seq_len=8, rope_factor=4.0, mscale=0.0, yarn=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_logits_match(tmp_path, name):
    m = random_model(**CONFIGS[name])
    cfg = m.cfg
    info = export.export(cfg, m.state_dict(), tmp_path, write_tok=False)
    hf = load_hf_clean(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["model_type"] == "deepseek_v3" and conf["q_lora_rank"] == (cfg.q_lora_rank or None)
    assert (conf["rope_scaling"] is None) == (not cfg.yarn)
    # per-expert names as in the released checkpoints; fp32 selection bias; MTP in its own file
    sd = load_file(tmp_path / "model.safetensors")
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in sd and "model.layers.1.mlp.experts.0.down_proj.weight" in sd
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32 and not any(
        k.startswith(f"model.layers.{cfg.n_layers}.") for k in sd)
    assert info["mtp"] == ("separate" if cfg.n_mtp else None)
    assert (tmp_path / "mtp.safetensors").exists() == bool(cfg.n_mtp) and conf["num_nextn_predict_layers"] == cfg.n_mtp
    # the attention temperature is all in the softmax scale, as in model.py: none on transformers' cos/sin
    assert hf.model.rotary_emb.attention_scaling == pytest.approx(1.0, abs=1e-12)
    assert hf.model.layers[0].self_attn.scaling == pytest.approx(m.layers[0].attn.softmax_scale, rel=1e-12)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = m(idx)[0]
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4, f"{name}: max |logit diff| = {(ours - theirs).abs().max():.3g}"


def test_mtp_layers_follow_released_layout(tmp_path):
    m = random_model(q_lora_rank=8, n_mtp=2)
    export.export(m.cfg, m.state_dict(), tmp_path, write_tok=False)
    mtp, ours = load_file(tmp_path / "mtp.safetensors"), m.state_dict()
    for k in range(2):
        p = f"model.layers.{3 + k}"  # the released names -> ours
        for theirs, mine in [("enorm.weight", f"mtp.{k}.enorm.weight"), ("eh_proj.weight", f"mtp.{k}.eh_proj.weight"),
                             ("shared_head.norm.weight", f"mtp.{k}.norm.weight"),
                             ("shared_head.head.weight", "head.weight"), ("embed_tokens.weight", "embed.weight"),
                             ("self_attn.q_b_proj.weight", f"mtp.{k}.block.attn.wq_b.weight")]:
            assert torch.equal(mtp[f"{p}.{theirs}"], ours[mine]), theirs
        assert torch.equal(mtp[f"{p}.mlp.experts.5.up_proj.weight"], ours[f"mtp.{k}.block.ffn.experts.w3"][5])
    # --mtp=True puts them into model.safetensors (transformers then reports them as unexpected: documented)
    export.export(m.cfg, m.state_dict(), tmp_path / "inline", mtp="True", write_tok=False)
    assert "model.layers.4.hnorm.weight" in load_file(tmp_path / "inline" / "model.safetensors")
    export.export(m.cfg, m.state_dict(), tmp_path / "none", mtp="False", write_tok=False)
    assert not (tmp_path / "none" / "mtp.safetensors").exists()
    assert json.loads((tmp_path / "none" / "config.json").read_text())["num_nextn_predict_layers"] == 0


# the fields of ModelArgs in DeepSeek-V3's inference/model.py (newest version, with scale_fmt) and its defaults
MODEL_ARGS = dict(max_batch_size=8, max_seq_len=4096 * 4, dtype="bf16", scale_fmt=None, vocab_size=102400, dim=2048,
                  inter_dim=10944, moe_inter_dim=1408, n_layers=27, n_dense_layers=1, n_heads=16, n_routed_experts=64,
                  n_shared_experts=2, n_activated_experts=6, n_expert_groups=1, n_limited_groups=1,
                  score_func="softmax", route_scale=1., q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
                  qk_rope_head_dim=64, v_head_dim=128, original_seq_len=4096, rope_theta=10000.0, rope_factor=40,
                  beta_fast=32, beta_slow=1, mscale=1.)


def official_model_args(path):
    """ModelArgs(**json.load(f)) as the official generate.py builds it: an unknown key would be a TypeError."""
    conf = json.loads((path / "config.json").read_text())
    assert set(conf) <= set(MODEL_ARGS), set(conf) - set(MODEL_ARGS)
    return SimpleNamespace(**{**MODEL_ARGS, **conf})


def official_yarn(args):
    """The official code's rule: YaRN frequencies and the mscale^2 softmax factor iff max_seq_len > original_seq_len."""
    return args.max_seq_len > args.original_seq_len


def official_softmax_scale(args):
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    if official_yarn(args):
        scale *= (0.1 * args.mscale * math.log(args.rope_factor) + 1.0) ** 2
    return scale


@pytest.mark.parametrize("yarn", [False, True])
def test_official_layout_round_trips_and_loads_into_model_args(tmp_path, yarn):
    """--to=official: the weights restack into ours; config.json builds the official ModelArgs, and the official YaRN
    rule gives our model's RoPE tables and softmax scale: a yarn=False model trained at max_seq_len >
    original_seq_len must not turn YaRN on there."""
    m = random_model(q_lora_rank=8, n_expert_groups=2, n_limited_groups=1, max_seq_len=32, original_seq_len=8,
                     rope_factor=4.0, beta_fast=16, beta_slow=2, mscale=0.7, route_scale=2.5, yarn=yarn)
    cfg = m.cfg
    export.export(cfg, m.state_dict(), tmp_path, to="official", dtype="bfloat16")
    sd = load_file(tmp_path / "model0-mp1.safetensors")
    assert "layers.2.ffn.experts.7.w2.weight" in sd and not any(k.startswith("mtp.") for k in sd)
    assert sd["layers.1.ffn.gate.bias"].dtype == torch.float32 and sd["embed.weight"].dtype == torch.bfloat16
    back = {}  # restacked: every non-MTP tensor survives (to bf16)
    for k, v in sd.items():
        if ".ffn.experts." in k:
            stem, e, w, _ = k.rsplit(".", 3)
            back.setdefault(f"{stem}.{w}", {})[int(e)] = v
        else:
            back[k] = v
    back = {k: torch.stack([v[e] for e in sorted(v)]) if isinstance(v, dict) else v for k, v in back.items()}
    ours = {k: v for k, v in m.state_dict().items() if not k.startswith("mtp.")}
    assert set(back) == set(ours)
    for k, v in ours.items():
        assert torch.equal(back[k].float(), v.to(back[k].dtype).float()), k
    args = official_model_args(tmp_path)  # n_limited_groups, q_lora_rank, score_func='sigmoid' ... as ours
    assert args.dtype == "bf16" and args.max_batch_size == 8  # bf16 compute: fp8 would expect scale tensors
    for f in set(MODEL_ARGS) - {"max_batch_size", "dtype", "scale_fmt", "original_seq_len"}:
        assert getattr(args, f) == getattr(cfg, f), f
    assert official_yarn(args) == yarn and args.original_seq_len == (8 if yarn else 32)
    assert official_softmax_scale(args) == pytest.approx(m.layers[0].attn.softmax_scale, rel=1e-12)
    # the official precompute_freqs_cis switches YaRN by the same rule; ours, switched that way, gives our tables
    theirs = precompute_freqs_cis(replace(cfg, yarn=official_yarn(args), original_seq_len=args.original_seq_len))
    assert all(torch.equal(a, b) for a, b in zip(precompute_freqs_cis(cfg), theirs))
    if not yarn:  # a model that never exceeds original_seq_len keeps its value
        small = random_model(max_seq_len=32, original_seq_len=64)
        export.export(small.cfg, small.state_dict(), tmp_path / "small", to="official")
        args = official_model_args(tmp_path / "small")
        assert args.original_seq_len == 64 and not official_yarn(args)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory, gpt2_enc):
    d = tmp_path_factory.mktemp("tok")
    export.write_tokenizer(gpt2_enc, d, 1024)
    return AutoTokenizer.from_pretrained(d)


TEXTS = ["Hello world", "The mitochondria is the powerhouse of the cell.", "  leading and trailing   ",
         "def f(x):\n    return x ** 2  # square\n\tindented\n", "3.14159, 12345678 and 1,000,000!",
         "I'm sure you're right; they'll see we've won, he'd say.", "héllo wörld, naïve café", "日本語のテキスト、中文文本",
         "emoji 🤖🚀 👍🏽 done", "a\n\n\nb   \n  c\r\nd", "\u00a0non-breaking\u200bzero-width", "", " ", "\n"]


def test_tokenizer_matches_tiktoken(hf_tokenizer, gpt2_enc):
    tok = hf_tokenizer
    assert tok.bos_token == tok.eos_token == tok.unk_token == "<|endoftext|>" and tok.eos_token_id == 50256 and \
        len(tok) == gpt2_enc.n_vocab == 50257
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=True)
        assert ids == gpt2_enc.encode_ordinary(text) and tok.decode(ids) == text, text
    mixed = "<|endoftext|>a new document<|endoftext|>"
    assert tok.encode(mixed) == gpt2_enc.encode(mixed, allowed_special="all")
    with gzip.open(SAMPLE_FILE, "rt", encoding="utf-8") as f:  # real text: the bundled FineWeb-Edu sample's first 40
        for _, line in zip(range(40), f):
            assert tok.encode(json.loads(line)["text"]) == gpt2_enc.encode_ordinary(json.loads(line)["text"])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real train.py run (tiny dims, GPT-2 vocab, 4 steps on the bundled FineWeb-Edu sample) and its export."""
    from data.fineweb import prepare_sample
    root = tmp_path_factory.mktemp("trained")
    prepare_sample(root / "shards")
    ok(run_forked("train.py", *train_args(vocab_size=50304, max_seq_len=128, n_layers=3, n_heads=4), "--max_iters=4",
                  "--eval_interval=100", "--eval_iters=1", "--learning_rate=1e-2", f"--data_dir={root / 'shards'}",
                  f"--out_dir={root / 'run'}", HF_HUB_OFFLINE="1"))
    assert "exported" in ok(run_forked("export.py", f"--out_dir={root / 'run'}", f"--hf_dir={root / 'hf'}")).stderr
    return root / "run", root / "hf"


def test_cli_exports_a_train_checkpoint(trained_run):
    """train.py's checkpoint -> `python export.py` -> AutoModelForCausalLM + AutoTokenizer load it offline, and
    greedy generation gives our model's tokens."""
    run_dir, hf_dir = trained_run
    m, _ = load_model(str(run_dir))
    assert any(g.bias.abs().sum() > 0 for g in m.gates())  # trained: the balancer has moved the biases
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompt = tok("The mitochondria is", return_tensors="pt")
    out = hf.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    ours = list(generate_tokens(m, prompt["input_ids"][0].tolist(), 8, temperature=0))
    assert out[0, prompt["input_ids"].shape[1]:].tolist() == ours and isinstance(tok.decode(out[0]), str)


def test_hellaswag_scores_equal_through_transformers(trained_run, shared_data, gpt2_enc):
    """hellaswag.py's scoring of the first 20 items: per-ending losses (hence every choice) are the same through
    the exported transformers model as through ours."""
    import hellaswag
    run_dir, hf_dir = trained_run
    ours, _ = load_model(str(run_dir))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    items = hellaswag.load_examples(shared_data / "hellaswag" / "hellaswag_val.jsonl", limit=20)
    batch = hellaswag.collate([hellaswag.render(ex, gpt2_enc, 128) for ex in items])  # hellaswag.py's tokenizer
    with torch.no_grad():
        s_ours, m_ours = hellaswag.ending_losses(ours, batch)
        s_hf, m_hf = hellaswag.ending_losses(lambda idx: (hf(idx).logits,), batch)
    torch.testing.assert_close(s_hf, s_ours, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(m_hf, m_ours, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(hellaswag.pick(s_ours.view(-1, 4), m_ours.view(-1, 4)),
                                                 hellaswag.pick(s_hf.view(-1, 4), m_hf.view(-1, 4))))


@pytest.mark.parametrize("case", ["no_checkpoint", "hf_dir_is_a_file", "hf_dir_is_a_file_official"])
def test_cli_errors_are_one_line(tmp_path, case):
    """A missing checkpoint, or --hf_dir naming an existing file: one error line, and the file is left as it was."""
    run_dir = tmp_path / "nothing" if case == "no_checkpoint" else save_ckpt(tmp_path / "run", random_model())
    target = tmp_path / "model.bin"
    target.write_bytes(b"someone's file\n\x00\x01")
    msg = exit_message(export.main, [f"--out_dir={run_dir}", f"--hf_dir={target}", "--tokenizer=False",
                                     f"--to={'official' if case.endswith('official') else 'hf'}"], "export.py")
    assert msg.startswith("export.py: error: no checkpoint at") if case == "no_checkpoint" else str(target) in msg
    assert target.read_bytes() == b"someone's file\n\x00\x01"


CHATS = [
    [{"role": "user", "content": "What is 17 + 25?"}],
    [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hello there!"}],
    [{"role": "user", "content": "Spell 'cat' backwards."}, {"role": "assistant", "content": "tac"},
     {"role": "user", "content": "  And 'dog', with spaces? 🙂 "}],
    [{"role": "system", "content": "Answer in one word.\nBe polite."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Colour of the sky?"}],
]


def test_chat_export_template_and_greedy_generation_equal_ours(tmp_path, gpt2_enc):
    """An SFT model's export: apply_chat_template(..., add_generation_prompt=True) gives exactly render_prompt's ids
    (with and without a system prompt, multi-turn), and transformers' greedy generate from them is chat.py's
    greedy reply, token for token, stopping at the chat's EOS."""
    import chat
    from data.loader import EOS, render_prompt
    m = random_model(3, vocab_size=50304, max_seq_len=96)
    export.export(m.cfg, m.state_dict(), str(tmp_path), enc=gpt2_enc, chat=True)
    tok, hf = AutoTokenizer.from_pretrained(tmp_path), load_hf_clean(tmp_path)
    assert tok.eos_token_id == hf.generation_config.eos_token_id == EOS and tok.bos_token_id == 50257
    for messages in CHATS:
        ids = render_prompt(messages, gpt2_enc)
        assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=False) == ids, messages
        ours = list(generate_tokens(m, ids, 12, temperature=0.0, eot=EOS, n_vocab=EOS + 1))  # what chat.py decodes
        if all(msg["role"] != "assistant" for msg in messages):  # a first turn: chat.py's Chat replies the same
            system = messages[0]["content"] if messages[0]["role"] == "system" else ""
            reply = chat.Chat(m, gpt2_enc, system=system, temperature=0.0).reply(messages[-1]["content"], 12)
            assert list(reply) == [t for t in ours if t != EOS]
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=EOS, pad_token_id=EOS,
                          suppress_tokens=list(range(EOS + 1, 50304)))  # chat.py samples among ids <= EOS
        assert out[0, len(ids):].tolist() == ours, messages
