"""
Export a train.py checkpoint for use outside this repository.

    python export.py --out_dir=out-fineweb --hf_dir=hf-model                   # Hugging Face DeepseekV3 folder
    python export.py --out_dir=out-fineweb --hf_dir=hf-model --dtype=bfloat16  # half the size
    python export.py --out_dir=out-fineweb --hf_dir=ds-model --to=official     # DeepSeek-V3 inference/ layout

--to=hf (default) writes a folder that `transformers.AutoModelForCausalLM.from_pretrained(hf_dir)` loads as
`DeepseekV3ForCausalLM` with the same logits as model.py, and that lm-evaluation-harness and vLLM read as a
DeepSeek-V3 checkpoint (config.json + model.safetensors, no remote code):
  config.json             model_type deepseek_v3, our ModelConfig in the released config's field names
  model.safetensors       the weights under the released checkpoint's names (below)
  generation_config.json  bos/eos <|endoftext|>
  tokenizer.json          GPT-2 byte-level BPE for the `tokenizers` library, built from the tiktoken encoding
  tokenizer_config.json   + special_tokens_map.json: bos/eos/unk = <|endoftext|>

Weight names (ours -> Hugging Face / released DeepSeek-V3):
  embed, norm, head                  -> model.embed_tokens, model.norm, lm_head
  layers.N.attn_norm / ffn_norm      -> model.layers.N.input_layernorm / post_attention_layernorm
  attn.wq | wq_a, q_norm, wq_b       -> self_attn.q_proj | q_a_proj, q_a_layernorm, q_b_proj
  attn.wkv_a, kv_norm, wkv_b, wo     -> self_attn.kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj
  ffn.w1 / w3 / w2 (dense layers)    -> mlp.gate_proj / up_proj / down_proj
  ffn.gate.weight, ffn.gate.bias     -> mlp.gate.weight, mlp.gate.e_score_correction_bias (always fp32)
  ffn.shared_experts.w1/w3/w2        -> mlp.shared_experts.gate_proj/up_proj/down_proj
  ffn.experts.w1/w3/w2 (E, out, in)  -> mlp.experts.E.gate_proj/up_proj/down_proj, one matrix per expert. This
      is the released checkpoints' per-expert layout, which vLLM, SGLang and llama.cpp read; transformers 5.x
      keeps experts fused (mlp.experts.gate_up_proj / down_proj) and fuses these names itself on load.
  mtp.k (MTP module k)               -> model.layers.{n_layers + k}: enorm, hnorm, eh_proj, shared_head.norm,
      the block under the usual self_attn/mlp/layernorm names, plus copies of the shared embedding
      (embed_tokens) and head (shared_head.head), as the released weights store their layer 61.
      config.json num_nextn_predict_layers = n_mtp, which is how vLLM finds them (DeepSeek MTP speculative
      decoding; vLLM reads every *.safetensors file of a folder without an index). transformers'
      DeepseekV3ForCausalLM runs the main model only and skips the MTP layer silently only at the released
      index 61 (its `_keys_to_ignore_on_load_unexpected`); at any other index, MTP tensors in model.safetensors
      are reported as unexpected weights. So --mtp=auto (default) puts them into model.safetensors only when
      n_layers == 61 and otherwise into a second file, mtp.safetensors, which transformers never opens;
      --mtp=True always writes them into model.safetensors (transformers then warns), --mtp=False drops them
      (num_nextn_predict_layers 0).

Numerics against model.py (checked by tests/test_export.py, fp32, max |logit difference| <= 1e-4):
  - RoPE: both use DeepSeek's interleaved pairs (config rope_interleave true). transformers' interleaved rotary
    returns the rotated q/k with the pair members de-interleaved (evens, then odds), the same permutation for q
    and k, so q.k and the logits are unchanged: no weight permutation is needed.
  - Routing: sigmoid scores, the bias only for the choice, group-limited routing by the top-2 sum with the other
    groups masked to -inf, weights renormalised over the top-k, x routed_scaling_factor: the same rule in
    transformers 5.x. Some earlier transformers versions (and the V2/V3 remote code) masked the dropped groups
    with 0.0 instead of -inf; that picks a different expert only when a kept group's biased score
    (sigmoid + bias) is below 0, i.e. when an expert's bias has drifted below -1 (n_expert_groups > 1 only).
  - YaRN (yarn=True) becomes rope_scaling {type yarn, factor, original_max_position_
    embeddings, beta_fast, beta_slow, mscale = mscale_all_dim = our mscale}: the released config's form, plus
    attention_factor 1.0 (model.py scales only the softmax; without it transformers would also scale cos/sin
    when mscale is 0).
    transformers logs a note when max_seq_len != rope_factor * original_seq_len (it checks that ratio); it then
    uses the explicit factor, as model.py does, so the logits still match.

--to=official writes the layout of DeepSeek-V3's inference/ code (our parameter names already are its names):
model0-mp1.safetensors with experts unstacked to layers.N.ffn.experts.E.w1.weight etc., and config.json with
the fields of its ModelArgs and nothing else (it builds ModelArgs(**config)), dtype "bf16". That code turns YaRN
on whenever max_seq_len > original_seq_len, so a yarn=False model is written with original_seq_len >= max_seq_len.
It has no MTP modules, so none are written; its Gate creates the selection bias only when dim == 7168, so for
other widths load it with strict=False or add the bias there.
"""
import json
import os
import sys
import time

from checkpoint import load_model
from configurator import UserError, configure, config_keys
from data.loader import EOT, bytes_to_unicode
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
# the fields of the official inference/model.py ModelArgs that describe the network (its generate.py builds
# ModelArgs(**json.load(f)), so config.json holds these and its "dtype", nothing else)
OFFICIAL_FIELDS = ["max_seq_len", "vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers",
                   "n_heads", "n_routed_experts", "n_shared_experts", "n_activated_experts", "n_expert_groups",
                   "n_limited_groups", "score_func", "route_scale", "q_lora_rank", "kv_lora_rank",
                   "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "original_seq_len", "rope_theta",
                   "rope_factor", "beta_fast", "beta_slow", "mscale"]


class ExportError(UserError):
    """A one-line, user-facing reason the export cannot proceed."""


def _require(module, pip_name):
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"export needs the {pip_name} package: pip install {pip_name} "
                          "(or pip install -r requirements-dev.txt)") from None


# -----------------------------------------------------------------------------------------------------------------
# Hugging Face layout

def _block_to_hf(sd, src, dst, cfg, dense):
    """One Block (ours: prefix src) -> HF decoder-layer tensors (prefix dst), yielded as (name, tensor)."""
    yield f"{dst}.input_layernorm.weight", sd[f"{src}.attn_norm.weight"]
    yield f"{dst}.post_attention_layernorm.weight", sd[f"{src}.ffn_norm.weight"]
    a, h = f"{src}.attn", f"{dst}.self_attn"
    if cfg.q_lora_rank == 0:
        yield f"{h}.q_proj.weight", sd[f"{a}.wq.weight"]
    else:
        yield f"{h}.q_a_proj.weight", sd[f"{a}.wq_a.weight"]
        yield f"{h}.q_a_layernorm.weight", sd[f"{a}.q_norm.weight"]
        yield f"{h}.q_b_proj.weight", sd[f"{a}.wq_b.weight"]
    yield f"{h}.kv_a_proj_with_mqa.weight", sd[f"{a}.wkv_a.weight"]
    yield f"{h}.kv_a_layernorm.weight", sd[f"{a}.kv_norm.weight"]
    yield f"{h}.kv_b_proj.weight", sd[f"{a}.wkv_b.weight"]
    yield f"{h}.o_proj.weight", sd[f"{a}.wo.weight"]
    f, m = f"{src}.ffn", f"{dst}.mlp"
    swiglu = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))
    if dense:
        for ours, theirs in swiglu:
            yield f"{m}.{theirs}.weight", sd[f"{f}.{ours}.weight"]
        return
    yield f"{m}.gate.weight", sd[f"{f}.gate.weight"]
    yield f"{m}.gate.e_score_correction_bias", sd[f"{f}.gate.bias"]
    for ours, theirs in swiglu:
        yield f"{m}.shared_experts.{theirs}.weight", sd[f"{f}.shared_experts.{ours}.weight"]
    for e in range(cfg.n_routed_experts):
        for ours, theirs in swiglu:
            yield f"{m}.experts.{e}.{theirs}.weight", sd[f"{f}.experts.{ours}"][e]


def hf_state_dict(state, cfg, with_mtp=True):
    """Our state dict -> {HF name: tensor} (views; nothing is copied here)."""
    sd = state
    out = {"model.embed_tokens.weight": sd["embed.weight"]}
    for i in range(cfg.n_layers):
        out.update(_block_to_hf(sd, f"layers.{i}", f"model.layers.{i}", cfg, i < cfg.n_dense_layers))
    out["model.norm.weight"] = sd["norm.weight"]
    out["lm_head.weight"] = sd["head.weight"]
    if with_mtp:
        for k in range(cfg.n_mtp):
            src, dst = f"mtp.{k}", f"model.layers.{cfg.n_layers + k}"
            out[f"{dst}.embed_tokens.weight"] = sd["embed.weight"]
            out[f"{dst}.enorm.weight"] = sd[f"{src}.enorm.weight"]
            out[f"{dst}.hnorm.weight"] = sd[f"{src}.hnorm.weight"]
            out[f"{dst}.eh_proj.weight"] = sd[f"{src}.eh_proj.weight"]
            out.update(_block_to_hf(sd, f"{src}.block", dst, cfg, cfg.n_layers + k < cfg.n_dense_layers))
            out[f"{dst}.shared_head.norm.weight"] = sd[f"{src}.norm.weight"]
            out[f"{dst}.shared_head.head.weight"] = sd["head.weight"]
    return out


def hf_config(cfg, torch_dtype="float32"):
    """config.json for transformers' DeepseekV3Config (the released DeepSeek-V3 config's field names)."""
    eot = EOT if EOT < cfg.vocab_size else None  # a toy vocabulary (tests) has no <|endoftext|> row
    rope_scaling = None
    if cfg.yarn:
        # attention_factor 1.0: model.py puts the whole YaRN temperature into the softmax scale (mscale_all_dim)
        # and none on cos/sin. transformers infers that 1.0 itself from mscale == mscale_all_dim, except when
        # they are 0, where it would scale cos/sin by 0.1 * ln(factor) + 1
        rope_scaling = {"type": "yarn", "rope_type": "yarn", "factor": cfg.rope_factor,
                        "original_max_position_embeddings": cfg.original_seq_len, "beta_fast": cfg.beta_fast,
                        "beta_slow": cfg.beta_slow, "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale,
                        "attention_factor": 1.0}
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "first_k_dense_replace": cfg.n_dense_layers,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.n_activated_experts,
        "n_group": cfg.n_expert_groups,
        "topk_group": cfg.n_limited_groups,
        "routed_scaling_factor": cfg.route_scale,
        "norm_topk_prob": True,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "moe_layer_freq": 1,
        "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_interleave": True,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "num_nextn_predict_layers": cfg.n_mtp,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "torch_dtype": torch_dtype,
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
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ExportError(f"cannot recover the BPE merge of token {token!r} (rank {rank})")
        merges.append((parts[0], parts[1]))
    return merges


def write_tokenizer(enc, dest, max_len):
    """tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) equivalent to the tiktoken GPT-2 encoding."""
    _require("tokenizers", "tokenizers")
    from tokenizers import Tokenizer, AddedToken, decoders, models, pre_tokenizers, processors
    ranks = enc._mergeable_ranks
    if len(ranks) != EOT or enc.eot_token != EOT:
        raise ExportError(f"expected tiktoken's GPT-2 encoding (50256 ranks + <|endoftext|>), got {len(ranks)} ranks")
    u = bytes_to_unicode()
    to_str = lambda b: "".join(u[x] for x in b)
    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in recover_merges(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # tiktoken's gpt2 pattern is GPT-2's; ByteLevel(use_regex=True) applies that same pattern
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOT_TEXT, special=True, normalized=False)])
    assert tok.token_to_id(EOT_TEXT) == EOT
    tok.save(os.path.join(dest, "tokenizer.json"))
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": max_len,
               "add_prefix_space": False, "clean_up_tokenization_spaces": False, "add_bos_token": False,
               "add_eos_token": False}
    _write_json(os.path.join(dest, "tokenizer_config.json"), tok_cfg)
    _write_json(os.path.join(dest, "special_tokens_map.json"), special)


# -----------------------------------------------------------------------------------------------------------------
# official inference/ layout

def official_state_dict(state, cfg):
    """Our state dict -> the official inference/model.py names: the same names, routed experts unstacked to
    layers.N.ffn.experts.E.w{1,2,3}.weight, MTP modules dropped (that code has none)."""
    out = {}
    for k, v in state.items():
        if k.startswith("mtp."):
            continue
        if ".ffn.experts.w" in k:
            stem, w = k.rsplit(".", 1)
            for e in range(v.shape[0]):
                out[f"{stem}.{e}.{w}.weight"] = v[e]
        else:
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

def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _save_safetensors(tensors, path, dtype, metadata=None):
    _require("safetensors", "safetensors")
    from safetensors.torch import save_file
    out = {}
    for k, v in tensors.items():
        t = v.detach().to("cpu")
        if k.endswith("e_score_correction_bias") or k.endswith("gate.bias"):
            t = t.float()  # the selection bias is fp32 in the released weights and in transformers
        elif t.is_floating_point():
            t = t.to(dtype)
        out[k] = t.contiguous().clone()  # own storage: shared views (embed/head copies for MTP) are not allowed
    save_file(out, path, metadata=metadata or {"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors creates the file 0600; give it the usual permissions
    return sum(t.numel() * t.element_size() for t in out.values())


def resolve_mtp(setting, cfg, to):
    """Where the MTP modules go: 'model' (model.safetensors), 'separate' (mtp.safetensors) or None."""
    if to != "hf" or cfg.n_mtp == 0:
        return None
    setting = str(setting)
    if setting in ("True", "true", "1"):
        return "model"
    if setting in ("False", "false", "0"):
        return None
    if setting != "auto":
        raise ExportError(f"--mtp must be auto, True or False, got {setting!r}")
    # transformers skips an MTP layer without a warning only at the released index 61
    return "model" if cfg.n_layers == 61 else "separate"


def export(model_cfg, state, dest, to="hf", dtype="float32", mtp="auto", enc=None, write_tok=True):
    """Write the export of one model (ModelConfig + state dict) into dest. Returns a dict of what was written."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if to not in ("hf", "official"):
        raise ExportError(f"--to must be hf or official, got {to!r}")
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise ExportError(f"--hf_dir={dest} is an existing file, not a folder (nothing was written)")
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as e:  # e.g. a parent that is a file, or no permission
        raise ExportError(f"cannot create --hf_dir={dest}: {e.strerror}") from None
    with_mtp = resolve_mtp(mtp, model_cfg, to)
    if to == "hf":
        cfg_json = hf_config(model_cfg, dtype)
        if with_mtp is None:
            cfg_json["num_nextn_predict_layers"] = 0
        tensors = hf_state_dict(state, model_cfg, with_mtp is not None)
        mtp_file = os.path.join(dest, "mtp.safetensors")
        if os.path.exists(mtp_file):
            os.remove(mtp_file)  # a stale file from an earlier export would be read by vLLM
        if with_mtp == "separate":
            prefixes = tuple(f"model.layers.{model_cfg.n_layers + k}." for k in range(model_cfg.n_mtp))
            mtp_tensors = {k: v for k, v in tensors.items() if k.startswith(prefixes)}
            main_tensors = {k: v for k, v in tensors.items() if k not in mtp_tensors}
            nbytes = _save_safetensors(main_tensors, os.path.join(dest, "model.safetensors"), DTYPES[dtype])
            nbytes += _save_safetensors(mtp_tensors, mtp_file, DTYPES[dtype])
        else:
            nbytes = _save_safetensors(tensors, os.path.join(dest, "model.safetensors"), DTYPES[dtype])
        _write_json(os.path.join(dest, "config.json"), cfg_json)
        _write_json(os.path.join(dest, "generation_config.json"),
                    {"bos_token_id": cfg_json["bos_token_id"], "eos_token_id": cfg_json["eos_token_id"]})
        if write_tok:
            if enc is None:
                from data.loader import get_tokenizer
                enc = get_tokenizer()
            write_tokenizer(enc, dest, model_cfg.max_seq_len)
    else:
        tensors = official_state_dict(state, model_cfg)
        nbytes = _save_safetensors(tensors, os.path.join(dest, "model0-mp1.safetensors"), DTYPES[dtype])
        _write_json(os.path.join(dest, "config.json"), official_config(model_cfg))
    return {"tensors": len(tensors), "bytes": nbytes, "mtp": with_mtp}


def load(path):
    """(model config, state dict) of a train.py checkpoint, validated by checkpoint.load_model."""
    model, _ = load_model(path, device="cpu")
    return model.cfg, model.state_dict()


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main(argv=None):
    settings = {k: v for k, v in globals().items() if k in _SETTINGS}
    args = configure(settings, sys.argv[1:] if argv is None else argv, description=__doc__.strip().split("\n\n")[0],
                     quiet=True)
    t0 = time.time()
    try:
        model_cfg, state = load(args["out_dir"])
        info = export(model_cfg, state, args["hf_dir"], to=args["to"], dtype=args["dtype"], mtp=args["mtp"],
                      write_tok=args["tokenizer"])
    except UserError as e:
        sys.exit(f"export.py: error: {e}")
    dt = time.time() - t0
    print(f"exported {args['out_dir']} -> {args['hf_dir']} ({args['to']}, {args['dtype']}): {info['tensors']} tensors, "
          f"{info['bytes'] / 2**20:.1f} MiB of weights, folder {folder_bytes(args['hf_dir']) / 2**20:.1f} MiB, "
          f"MTP layers: {info['mtp'] or 'not written'}, {dt:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
