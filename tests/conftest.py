"""Shared test helpers.

Tests that need the real data in ../shared/data (or the GPT-2 BPE files) ask for the `shared_data` /
`gpt2_enc` fixtures. On a fresh offline machine they skip with a reason; in CI (NANODS_REQUIRE_SHARED=1)
a missing file is an error instead, so a skip can never hide a broken path.
"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # flat repo: `import model`, `import train`, ...

_DEFAULT_SHARED = ROOT.parent / "shared" / "data"
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
    need(SHARED.is_dir(), f"shared data folder not found at {SHARED} (set NANODS_SHARED_DATA)")
    return SHARED


@pytest.fixture(scope="session")
def gpt2_enc():
    """tiktoken's GPT-2 encoding, loaded from the local cache only (never downloads in tests)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    need(cache and Path(cache, "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").is_file(),
         "GPT-2 BPE files not in TIKTOKEN_CACHE_DIR (point it at shared/data/tiktoken_cache)")
    import tiktoken
    return tiktoken.get_encoding("gpt2")
