"""Shared test helpers: the tiny model every test file builds, one thread per test, and the data fixtures.

The tokenizer and a real-text sample ship with the repository (data/gpt2.tiktoken.gz and
data/fineweb_edu_sample.jsonl.gz), so tests that need "the tokenizer" (`gpt2_enc`) or real text never skip.
Tests that need real data files from outside the repository (NANODS_SHARED_DATA points at the folder: the full
HellaSwag file, the original sample CSV, tiktoken's own cached GPT-2 files) ask for the `shared_data` /
`tiktoken_gpt2` fixtures. On a fresh offline machine those skip with a reason; in CI (NANODS_REQUIRE_SHARED=1) a
missing file is an error instead, so a skip can never hide a broken path.
"""
import os
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # flat repo: `import model`, `import checkpoint`, ...

_DEFAULT_SHARED = ROOT.parent / "shared" / "data"  # where the developers' data folder sits
SHARED = Path(os.environ.get("NANODS_SHARED_DATA", _DEFAULT_SHARED))
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")


def need(condition, reason):
    """Skip (fresh machine) or fail (CI with NANODS_REQUIRE_SHARED=1) when test data is missing."""
    if condition:
        return
    if os.environ.get("NANODS_REQUIRE_SHARED") == "1":
        pytest.fail(f"required test data missing in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data():
    need(SHARED.is_dir(), f"needs the developers' test data (full HellaSwag file, original FineWeb-Edu CSV), which "
                          f"is not shipped: set NANODS_SHARED_DATA to its folder (looked in {SHARED})")
    return SHARED


@pytest.fixture(scope="session")
def gpt2_enc():
    """The project's GPT-2 tokenizer: data/fineweb.py's loader of the bundled file (no network, never skips)."""
    from data.fineweb import get_tokenizer
    return get_tokenizer()


@pytest.fixture(scope="session")
def tiktoken_gpt2():
    """tiktoken's own "gpt2" encoding, from its cached BPE files only (never downloads): the reference that the
    bundled tokenizer is checked against."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    need(cache and Path(cache, "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").is_file()
         and Path(cache, "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6").is_file(),
         "tiktoken's cached GPT-2 BPE files not found in TIKTOKEN_CACHE_DIR (set it to the developers' tiktoken_cache)")
    import tiktoken
    return tiktoken.get_encoding("gpt2")


# ---- the tiny model -------------------------------------------------------------------------------------

TINY = dict(vocab_size=128, dim=32, n_layers=3, n_dense_layers=1, n_heads=4, inter_dim=64, moe_inter_dim=16,
            q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, max_seq_len=32, n_mtp=1, init_std=0.02)


def tiny_cfg(**overrides):
    """A ModelConfig small enough for a 2-core CPU: every DeepSeek-V3 part present (dense first layer, MoE with
    shared experts, MLA, one MTP module)."""
    from model import ModelConfig
    return ModelConfig(**{**TINY, **overrides})


def tiny_model(seed=0, **overrides):
    from model import Transformer
    torch.manual_seed(seed)
    return Transformer(tiny_cfg(**overrides))


def save_ckpt(path, model, **extra):
    """A checkpoint in train.py's format (the fields sample.py / hellaswag.py read) at path/ckpt.pt."""
    from checkpoint import save_checkpoint
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_checkpoint(str(path / "ckpt.pt"), {"model": model.state_dict(), "model_config": asdict(model.cfg), **extra})
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add start-up cost, and on a busy 2-core machine they can spin-wait. One
    thread also fixes the reduction order, so results repeat bit for bit from run to run."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
