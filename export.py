"""
Export a train.py checkpoint for use outside this repository.

    python export.py --out_dir=out-fineweb --hf_dir=hf-model                   # Hugging Face DeepseekV3 folder
    python export.py --out_dir=out-fineweb --hf_dir=hf-model --dtype=bfloat16  # half the size
    python export.py --out_dir=out-fineweb --hf_dir=ds-model --to=official     # DeepSeek-V3 inference/ layout

--to=hf (default) writes what `transformers.AutoModelForCausalLM.from_pretrained(hf_dir)` loads as
DeepseekV3ForCausalLM with model.py's logits (fp32: max |diff| <= 1e-4, tests/test_export.py), and what
lm-evaluation-harness and vLLM read as a DeepSeek-V3 checkpoint (no remote code): config.json (the released
config's field names), model.safetensors, generation_config.json, and the GPT-2 tokenizer rebuilt from tiktoken
(tokenizer.json, tokenizer_config.json, special_tokens_map.json; bos/eos/unk <|endoftext|>).

Weight names (ours -> Hugging Face / released DeepSeek-V3):
  embed, norm, head                  -> model.embed_tokens, model.norm, lm_head
  layers.N.attn_norm / ffn_norm      -> model.layers.N.input_layernorm / post_attention_layernorm
  attn.wq | wq_a, q_norm, wq_b       -> self_attn.q_proj | q_a_proj, q_a_layernorm, q_b_proj
  attn.wkv_a, kv_norm, wkv_b, wo     -> self_attn.kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj
  ffn.w1 / w3 / w2 (dense layers)    -> mlp.gate_proj / up_proj / down_proj
  ffn.gate.weight, ffn.gate.bias     -> mlp.gate.weight, mlp.gate.e_score_correction_bias (always fp32)
  ffn.shared_experts.w1/w3/w2        -> mlp.shared_experts.gate_proj/up_proj/down_proj
  ffn.experts.w1/w3/w2 (E, out, in)  -> mlp.experts.E.gate_proj/up_proj/down_proj: the released per-expert
      layout (vLLM, SGLang, llama.cpp); transformers 5.x fuses them itself on load.
  mtp.k                              -> model.layers.{n_layers + k}: enorm, hnorm, eh_proj, shared_head.norm, the
      block's usual names, and copies of embed_tokens and shared_head.head, as the released layer 61 stores them.
      config.json num_nextn_predict_layers = n_mtp lets vLLM find them. transformers skips MTP tensors silently
      only at index 61 and reports them as unexpected elsewhere, so --mtp=auto writes them into model.safetensors
      when n_layers == 61 and otherwise into mtp.safetensors (which transformers never opens, vLLM reads);
      --mtp=True always into model.safetensors, --mtp=False not at all (num_nextn_predict_layers 0).

Numerics: both sides use interleaved RoPE (rope_interleave; transformers permutes q and k alike, so q.k is
unchanged) and the same sigmoid, group-limited (-inf masked), renormalised, route_scale'd routing as
transformers 5.x (earlier versions masked groups with 0.0, which differs only when a bias drifts below -1).
YaRN becomes the released rope_scaling form plus attention_factor 1.0 (see hf_config); transformers' note that
max_seq_len != rope_factor * original_seq_len is harmless, it uses the explicit factor as model.py does.

--to=official writes DeepSeek-V3's inference/ layout (our names are its names): model0-mp1.safetensors with the
experts unstacked (layers.N.ffn.experts.E.w1.weight, ...) and no MTP modules, and config.json with exactly its
ModelArgs fields (see official_config). Its Gate creates the selection bias only when dim == 7168: for other
widths load with strict=False or add the bias there.
"""
import os
import sys
import time

from checkpoint import load_model
from configurator import UserError, check_choice, configure, config_keys, one_line_errors
from data.loader import BOS, CHAT_TOKENS, EOS, EOT, bytes_to_unicode, get_tokenizer, write_json
from model import DTYPES

# -----------------------------------------------------------------------------------------------------------------
out_dir = 'out-fineweb'          # a train.py out_dir holding ckpt.pt, or a checkpoint file
hf_dir = 'hf-model'              # the folder to write (created; existing files of the same names are replaced)
to = 'hf'                        # hf | official
dtype = 'float32'                # float32 | bfloat16 | float16: the weights' dtype (the expert bias stays fp32)
mtp = 'auto'                     # auto | True | False: where to write the MTP modules (see the docstring)
tokenizer = True                 # write the tokenizer files (--to=hf)
# -----------------------------------------------------------------------------------------------------------------
_SETTINGS = config_keys(globals())
EOT_TEXT = "<|endoftext|>"
BOS_TEXT, EOS_TEXT = ({i: t for t, i in CHAT_TOKENS.items()}[i] for i in (BOS, EOS))
# the network fields of the official ModelArgs: its generate.py builds ModelArgs(**json.load(f)), so config.json
# holds these and "dtype", nothing else
OFFICIAL_FIELDS = ["max_seq_len", "vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers",
                   "n_heads", "n_routed_experts", "n_shared_experts", "n_activated_experts", "n_expert_groups",
                   "n_limited_groups", "score_func", "route_scale", "q_lora_rank", "kv_lora_rank",
                   "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "original_seq_len", "rope_theta",
                   "rope_factor", "beta_fast", "beta_slow", "mscale"]
# our tensor names -> Hugging Face's, within a block's attn / ffn
Q_LORA = (("wq_a", "q_a_proj"), ("q_norm", "q_a_layernorm"), ("wq_b", "q_b_proj"))
KV_O = (("wkv_a", "kv_a_proj_with_mqa"), ("kv_norm", "kv_a_layernorm"), ("wkv_b", "kv_b_proj"), ("wo", "o_proj"))
SWIGLU = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))


class ExportError(UserError):
    """A one-line, user-facing reason the export cannot proceed."""


def _require(module):
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"export needs the {module} package: pip install {module} "
                          "(or pip install -r requirements-dev.txt)") from None


# -----------------------------------------------------------------------------------------------------------------
# Hugging Face layout

def _block_to_hf(sd, src, dst, cfg, layer_id):
    """One Block (ours: prefix src) -> HF decoder-layer tensors (prefix dst), yielded as (name, tensor)."""
    yield f"{dst}.input_layernorm.weight", sd[f"{src}.attn_norm.weight"]
    yield f"{dst}.post_attention_layernorm.weight", sd[f"{src}.ffn_norm.weight"]
    for ours, theirs in (Q_LORA if cfg.q_lora_rank else (("wq", "q_proj"),)) + KV_O:
        yield f"{dst}.self_attn.{theirs}.weight", sd[f"{src}.attn.{ours}.weight"]
    f, m = f"{src}.ffn", f"{dst}.mlp"
    if layer_id < cfg.n_dense_layers:
        for ours, theirs in SWIGLU:
            yield f"{m}.{theirs}.weight", sd[f"{f}.{ours}.weight"]
        return
    yield f"{m}.gate.weight", sd[f"{f}.gate.weight"]
    yield f"{m}.gate.e_score_correction_bias", sd[f"{f}.gate.bias"]
    for ours, theirs in SWIGLU:
        yield f"{m}.shared_experts.{theirs}.weight", sd[f"{f}.shared_experts.{ours}.weight"]
        for e in range(cfg.n_routed_experts):
            yield f"{m}.experts.{e}.{theirs}.weight", sd[f"{f}.experts.{ours}"][e]


def hf_state_dict(sd, cfg, with_mtp=True):
    """Our state dict -> {HF name: tensor} (views; nothing is copied here)."""
    out = {"model.embed_tokens.weight": sd["embed.weight"]}
    for i in range(cfg.n_layers):
        out.update(_block_to_hf(sd, f"layers.{i}", f"model.layers.{i}", cfg, i))
    out["model.norm.weight"], out["lm_head.weight"] = sd["norm.weight"], sd["head.weight"]
    for k in range(cfg.n_mtp if with_mtp else 0):
        src, dst = f"mtp.{k}", f"model.layers.{cfg.n_layers + k}"
        out[f"{dst}.embed_tokens.weight"] = sd["embed.weight"]
        for name in ("enorm", "hnorm", "eh_proj"):
            out[f"{dst}.{name}.weight"] = sd[f"{src}.{name}.weight"]
        out.update(_block_to_hf(sd, f"{src}.block", dst, cfg, cfg.n_layers + k))
        out[f"{dst}.shared_head.norm.weight"] = sd[f"{src}.norm.weight"]
        out[f"{dst}.shared_head.head.weight"] = sd["head.weight"]
    return out


def hf_config(cfg, torch_dtype="float32"):
    """config.json for transformers' DeepseekV3Config (the released DeepSeek-V3 config's field names)."""
    eot = EOT if EOT < cfg.vocab_size else None  # a toy vocabulary (tests) has no <|endoftext|> row
    # YaRN's attention_factor 1.0: model.py puts the whole YaRN temperature into the softmax scale (mscale_all_dim)
    # and none on cos/sin. transformers infers that 1.0 itself from mscale == mscale_all_dim, except when they
    # are 0, where it would scale cos/sin by 0.1 * ln(factor) + 1
    rope_scaling = {"type": "yarn", "rope_type": "yarn", "factor": cfg.rope_factor,
                    "original_max_position_embeddings": cfg.original_seq_len, "beta_fast": cfg.beta_fast,
                    "beta_slow": cfg.beta_slow, "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale,
                    "attention_factor": 1.0} if cfg.yarn else None
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim, "moe_intermediate_size": cfg.moe_inter_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "first_k_dense_replace": cfg.n_dense_layers, "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts, "num_experts_per_tok": cfg.n_activated_experts,
        "n_group": cfg.n_expert_groups, "topk_group": cfg.n_limited_groups, "routed_scaling_factor": cfg.route_scale,
        "norm_topk_prob": True, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1,
        "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling, "rope_interleave": True, "rms_norm_eps": 1e-6,
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "bos_token_id": eot, "eos_token_id": eot, "num_nextn_predict_layers": cfg.n_mtp,
        "initializer_range": cfg.init_std, "use_cache": True, "torch_dtype": torch_dtype,
    }


# -----------------------------------------------------------------------------------------------------------------
# tokenizer: GPT-2 byte-level BPE rebuilt from tiktoken's mergeable ranks

def recover_merges(ranks):
    """tiktoken ranks (bytes -> id) -> GPT-2 merges [(left bytes, right bytes)] in rank order. A token of rank r
    is the merge of the two parts that BPE reaches on its bytes using only merges of rank < r."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            r, i = min((ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1))
            if r >= rank:  # no merge of lower rank applies
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ExportError(f"cannot recover the BPE merge of token {token!r} (rank {rank})")
        merges.append(tuple(parts))
    return merges


# data/loader.py's chat template in Jinja, for transformers' apply_chat_template (the same ids: the special tokens
# split the text, so each message's content is encoded on its own, as render_conversation does)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
                 "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
                 "{% else %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")


def write_tokenizer(enc, dest, max_len, chat=False):
    """tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) equivalent to the tiktoken GPT-2 encoding;
    chat=True adds the chat tokens (ids 50257-50260), makes BOS/EOS the chat's and writes the chat_template."""
    _require("tokenizers")
    from tokenizers import Tokenizer, AddedToken, decoders, models, pre_tokenizers, processors
    ranks = enc._mergeable_ranks
    if len(ranks) != EOT or enc.eot_token != EOT:
        raise ExportError(f"expected tiktoken's GPT-2 encoding (50256 ranks + <|endoftext|>), got {len(ranks)} ranks")
    u = bytes_to_unicode()
    to_str = lambda b: "".join(u[x] for x in b)
    merges = [(to_str(a), to_str(b)) for a, b in recover_merges(ranks)]
    tok = Tokenizer(models.BPE(vocab={to_str(t): r for t, r in ranks.items()}, merges=merges, fuse_unk=False))
    # tiktoken's gpt2 pattern is GPT-2's; ByteLevel(use_regex=True) applies that same pattern
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = {EOT_TEXT: EOT, **(CHAT_TOKENS if chat else {})}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    assert all(tok.token_to_id(t) == i for t, i in added.items())
    tok.save(os.path.join(dest, "tokenizer.json"))
    bos, eos = (BOS_TEXT, EOS_TEXT) if chat else (EOT_TEXT, EOT_TEXT)
    special = {"bos_token": bos, "eos_token": eos, "unk_token": EOT_TEXT}
    write_json(os.path.join(dest, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": max_len, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
        **({"chat_template": CHAT_TEMPLATE} if chat else {})})
    write_json(os.path.join(dest, "special_tokens_map.json"), special)


# -----------------------------------------------------------------------------------------------------------------
# official inference/ layout

def official_state_dict(state):
    """Our state dict -> the official inference/model.py names: the same names, routed experts unstacked to
    layers.N.ffn.experts.E.w{1,2,3}.weight, MTP modules dropped (that code has none)."""
    out = {}
    for k, v in state.items():
        if ".ffn.experts.w" in k and not k.startswith("mtp."):
            stem, w = k.rsplit(".", 1)
            out.update({f"{stem}.{e}.{w}.weight": v[e] for e in range(v.shape[0])})
        elif not k.startswith("mtp."):
            out[k] = v
    return out


def official_config(cfg):
    """config.json for the official ModelArgs. That code has no yarn switch: it applies YaRN (frequencies and the
    mscale^2 softmax factor) whenever max_seq_len > original_seq_len, so a yarn=False model says original_seq_len
    >= max_seq_len there. The weights' dtype is not a ModelArgs field; the safetensors file records it."""
    d = {f: getattr(cfg, f) for f in OFFICIAL_FIELDS}
    if not cfg.yarn:
        d["original_seq_len"] = max(cfg.original_seq_len, cfg.max_seq_len)
    d["dtype"] = "bf16"  # the official code computes in bf16 (its other choice is fp8); weights load with a cast
    return d


# -----------------------------------------------------------------------------------------------------------------

def _save_safetensors(tensors, path, dtype):
    _require("safetensors")
    from safetensors.torch import save_file
    out = {}
    for k, v in tensors.items():
        t = v.detach().to("cpu")
        if k.endswith("e_score_correction_bias") or k.endswith("gate.bias"):
            t = t.float()  # the selection bias is fp32 in the released weights and in transformers
        elif t.is_floating_point():
            t = t.to(dtype)
        out[k] = t.contiguous().clone()  # own storage: shared views (embed/head copies for MTP) are not allowed
    save_file(out, path, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors creates the file 0600; give it the usual permissions
    return sum(t.numel() * t.element_size() for t in out.values())


def resolve_mtp(setting, cfg, to):
    """Where the MTP modules go: 'model' (model.safetensors), 'separate' (mtp.safetensors) or None."""
    if to != "hf" or cfg.n_mtp == 0:
        return None
    choice = {"True": "model", "true": "model", "1": "model", "False": None, "false": None, "0": None,
              "auto": "model" if cfg.n_layers == 61 else "separate"}  # transformers skips only index 61 silently
    if str(setting) not in choice:
        raise ExportError(f"--mtp must be auto, True or False, got {str(setting)!r}")
    return choice[str(setting)]


def export(model_cfg, state, dest, to="hf", dtype="float32", mtp="auto", enc=None, write_tok=True, chat=False):
    """Write the export of one model (ModelConfig + state dict) into dest; chat=True for a chat-tuned model (its
    tokenizer gets the chat tokens and template, and generation stops at its EOS). Returns what was written."""
    check_choice("--dtype", dtype, DTYPES)
    check_choice("--to", to, ("hf", "official"))
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise ExportError(f"--hf_dir={dest} is an existing file, not a folder (nothing was written)")
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as e:  # e.g. a parent that is a file, or no permission
        raise ExportError(f"cannot create --hf_dir={dest}: {e.strerror}") from None
    with_mtp = resolve_mtp(mtp, model_cfg, to)
    path = lambda name: os.path.join(dest, name)
    if to == "official":
        tensors = official_state_dict(state)
        nbytes = _save_safetensors(tensors, path("model0-mp1.safetensors"), DTYPES[dtype])
        write_json(path("config.json"), official_config(model_cfg))
        return {"tensors": len(tensors), "bytes": nbytes, "mtp": None}
    cfg_json = hf_config(model_cfg, dtype)
    if chat:
        cfg_json.update(bos_token_id=BOS, eos_token_id=EOS)
    if with_mtp is None:
        cfg_json["num_nextn_predict_layers"] = 0
    tensors = hf_state_dict(state, model_cfg, with_mtp is not None)
    if os.path.exists(path("mtp.safetensors")):
        os.remove(path("mtp.safetensors"))  # a stale file from an earlier export would be read by vLLM
    files = {"model.safetensors": tensors}
    if with_mtp == "separate":
        prefixes = tuple(f"model.layers.{model_cfg.n_layers + k}." for k in range(model_cfg.n_mtp))
        files["mtp.safetensors"] = {k: v for k, v in tensors.items() if k.startswith(prefixes)}
        files["model.safetensors"] = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
    nbytes = sum(_save_safetensors(t, path(name), DTYPES[dtype]) for name, t in files.items())
    write_json(path("config.json"), cfg_json)
    write_json(path("generation_config.json"), {k: cfg_json[k] for k in ("bos_token_id", "eos_token_id")})
    if write_tok:
        write_tokenizer(get_tokenizer() if enc is None else enc, dest, model_cfg.max_seq_len, chat)
    return {"tensors": len(tensors), "bytes": nbytes, "mtp": with_mtp}


@one_line_errors("export.py")
def main(argv=None):
    args = configure(_SETTINGS, argv, description=__doc__.strip().split("\n\n")[0], quiet=True)
    t0 = time.time()
    model, ckpt = load_model(args["out_dir"], device="cpu")  # validated: one-line errors for a bad checkpoint
    chat = bool(ckpt.get("config", {}).get("chat_data"))  # an SFT run: a chat model
    info = export(model.cfg, model.state_dict(), args["hf_dir"], to=args["to"], dtype=args["dtype"],
                  mtp=args["mtp"], write_tok=args["tokenizer"], chat=chat)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(args["hf_dir"]) for f in fs)
    print(f"exported {args['out_dir']} -> {args['hf_dir']} ({args['to']}, {args['dtype']}): {info['tensors']} tensors, "
          f"{info['bytes'] / 2**20:.1f} MiB of weights, folder {size / 2**20:.1f} MiB, "
          f"MTP layers: {info['mtp'] or 'not written'}, {time.time() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
