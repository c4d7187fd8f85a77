"""Shared test helpers: the tiny model every test file builds, one thread per test, the data fixtures, and running a
script as users run it.

The tokenizer and a real-text sample ship with the repository (data/gpt2.tiktoken.gz and
data/fineweb_edu_sample.jsonl.gz), so tests that need "the tokenizer" (`gpt2_enc`) or real text never skip.
Tests that need real data files from outside the repository (NANODS_SHARED_DATA points at the folder: the full
HellaSwag file, the original sample CSV, tiktoken's own cached GPT-2 files) ask for the `shared_data` /
`tiktoken_gpt2` fixtures. On a fresh offline machine those skip with a reason; in CI (NANODS_REQUIRE_SHARED=1) a
missing file is an error instead, so a skip can never hide a broken path.
"""
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # flat repo: `import model`, `import checkpoint`, ...

SHARED = Path(os.environ.get("NANODS_SHARED_DATA", ROOT.parent / "shared" / "data"))  # the developers' data folder
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
    """The project's GPT-2 tokenizer: data/loader.py's loader of the bundled file (no network, never skips)."""
    from data.loader import get_tokenizer
    return get_tokenizer()


@pytest.fixture(scope="session")
def tiktoken_gpt2():
    """tiktoken's own "gpt2" encoding, from its cached BPE files only (never downloads): the reference that the
    bundled tokenizer is checked against."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    need(cache and all(Path(cache, f).is_file() for f in ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
                                                          "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")),
         "tiktoken's cached GPT-2 BPE files not found in TIKTOKEN_CACHE_DIR (set it to the developers' tiktoken_cache)")
    import tiktoken
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add start-up cost, and on a busy 2-core machine they can spin-wait. One
    thread also fixes the reduction order, so results repeat bit for bit from run to run."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def loss_of(parts):
    """A scalar to backpropagate from every loss part (the real weighting is train.py's v3_loss)."""
    return parts["ce"] + parts["mtp"].sum() + parts["balance"]


def save_ckpt(path, model, **extra):
    """A checkpoint in train.py's format (the fields sample.py / hellaswag.py read) at path/ckpt.pt."""
    from checkpoint import save_checkpoint
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_checkpoint(str(path / "ckpt.pt"), {"model": model.state_dict(), "model_config": asdict(model.cfg), **extra})
    return path


def train_args(**model):
    """train.py settings for a tiny CPU run: the test model (2 layers, 2 heads, vocab 512, context 64 unless
    overridden), 512 tokens a step."""
    model = {**TINY, "vocab_size": 512, "n_layers": 2, "n_heads": 2, "max_seq_len": 64, **model}
    return [f"--{k}={v}" for k, v in model.items()] + [
        "--device=cpu", "--dtype=float32", "--compile=False", "--batch_size=4", "--total_batch_size=512",
        "--learning_rate=3e-3", "--min_lr=3e-4", "--warmup_iters=3", "--log_interval=1", "--eval_iters=2",
        "--sample_tokens=0", "--bias_update_speed=1e-2"]


# ---- scripts as users run them ----------------------------------------------------------------------------

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]  # 2 gloo ranks


def run(*args, timeout=600, **env):
    """`python ARGS` in the repository, one thread per process; a run that hangs is killed with every process it
    started (torchrun's workers too) and fails the test."""
    p = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"hung for {timeout} s: python {' '.join(map(str, args))}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def ok(p):
    assert p.returncode == 0, f"exit {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def one_line_error(p, script):
    """A user error: exit status 1 and exactly one line on stderr, '<script>: error: ...' (no traceback)."""
    err = p.stderr.strip()
    assert p.returncode == 1 and p.stderr.splitlines() == [err] and err.startswith(f"{script}: error: "), err[-3000:]
    return err


def exit_message(main, argv, script=None):
    """The message main(argv) stops with (SystemExit(str): Python prints it and exits 1), checked to be one line and,
    with script, to start '<script>: error: '."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg, msg
    assert script is None or msg.startswith(f"{script}: error: "), msg
    return msg


# ---- a local stand-in for HellaSwag's download, for scripts run as users run them (subprocess, torchrun) ---

# python standin.py SCRIPT ARGS...: runs SCRIPT (train.py or hellaswag.py) with HellaSwag's download served from
# $STANDIN_FILE instead of the network ("offline": every download fails), slowly, so that downloads by several
# ranks would overlap; every download is logged to $STANDIN_LOG as "<RANK> <url>". For hellaswag.py it runs what
# `python hellaswag.py` runs, in the module it patched.
HELLASWAG_STANDIN = '''import hashlib, io, os, runpy, sys, time, urllib.error
sys.path.insert(0, os.getcwd())
import hellaswag
source = os.environ["STANDIN_FILE"]
data = None if source == "offline" else open(source, "rb").read()
if data is not None:
    hellaswag._SHA256 = hashlib.sha256(data).hexdigest()
class Slow(io.BytesIO):
    def read(self, n=-1):
        time.sleep(0.02)
        return super().read(4096)
def urlopen(url, timeout=None):
    with open(os.environ["STANDIN_LOG"], "a") as f:
        f.write(f"{os.environ.get('RANK', '-')} {url}\\n")
    if data is None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    return Slow(data)
hellaswag.urllib.request.urlopen = urlopen
sys.argv[0] = script = sys.argv.pop(1)
hellaswag.main() if script == "hellaswag.py" else runpy.run_path(script, run_name="__main__")
'''


def hellaswag_standin(tmp_path, n_items=8):
    """(launcher script, env) for running train.py / hellaswag.py against a stand-in HellaSwag download of n_items
    made-up items, with an empty cache (XDG_CACHE_HOME). n_items=0: offline, every download fails."""
    script = tmp_path / "standin.py"
    script.write_text(HELLASWAG_STANDIN)
    source = "offline"
    if n_items:
        words = "the cat sat on a warm mat while dogs ran past the old red barn".split()
        rows = [{"ctx": " ".join(words[i % 5:i % 5 + 6]).capitalize(),
                 "endings": [" ".join(words[(i + j) % 7:(i + j) % 7 + 4]) for j in range(4)], "label": i % 4}
                for i in range(n_items)]
        source = tmp_path / "standin_hellaswag.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return script, dict(XDG_CACHE_HOME=str(tmp_path / "cache"), STANDIN_FILE=str(source),
                        STANDIN_LOG=str(tmp_path / "downloads.log"))


def downloads(tmp_path):
    """The stand-in's download log: one line per download."""
    log = tmp_path / "downloads.log"
    return log.read_text().splitlines() if log.exists() else []


def cached_hellaswag(tmp_path):
    """The files in the HellaSwag cache under the stand-in's XDG_CACHE_HOME."""
    cache = tmp_path / "cache" / "nanodeepseek" / "hellaswag"
    return sorted(f.name for f in cache.iterdir()) if cache.exists() else []
