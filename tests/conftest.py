"""Shared test helpers: the tiny model every test file builds, one thread per test, the data fixtures, and running a
script as users run it.

The tokenizer and a real-text sample ship with the repository (data/gpt2.tiktoken.gz and
data/fineweb_edu_sample.jsonl.gz), so tests that need "the tokenizer" (`gpt2_enc`) or real text never skip.
Tests that need real data files from outside the repository (NANODS_SHARED_DATA points at the folder: the full
HellaSwag file, the original sample CSV, tiktoken's own cached GPT-2 files) ask for the `shared_data` /
`tiktoken_gpt2` fixtures. On a fresh offline machine those skip with a reason; in CI (NANODS_REQUIRE_SHARED=1) a
missing file is an error instead, so a skip can never hide a broken path.
"""
import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
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
    started (torchrun's workers too) and fails the test. torchrun (TORCHRUN first): its launcher is forked from
    conftest's fork server (run_forked) instead of a fresh interpreter's start; the workers it starts are fresh
    processes, as always."""
    if list(args[:2]) == TORCHRUN[:2]:
        return run_forked(*args, timeout=timeout, **env)
    p = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"hung for {timeout} s: python {' '.join(map(str, args))}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


# python -c FORK_SERVER: imports torch (and what every script imports from it) once, then, for each request (one
# JSON line on stdin), forks a child that runs `python SCRIPT ARGS` (or `python -m MODULE ARGS`) as the interpreter
# would: SCRIPT as __main__ with that argv, sys.path[0] and environment, stdin from /dev/null, stdout and stderr into
# the files named, an uncaught exception through sys.excepthook (traceback from the script's frames on; exit 1),
# SystemExit as Python handles it (None: 0, an int: itself, anything else: printed on stderr, 1), then the atexit
# functions. It answers each request with the child's exit status (negative: killed by that signal) and ends at EOF.
FORK_SERVER = r"""import atexit, json, os, runpy, sys
import numpy, tqdm, torch, torch.distributed, torch.distributed.tensor, torch.nn.parallel  # noqa: F401

def child(req):
    code, argv = 1, req["argv"]
    try:
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        module = argv[1] if argv[0] == "-m" else None
        sys.argv = argv[1:] if module else list(argv)
        sys.path[0] = os.getcwd() if module else os.path.dirname(os.path.abspath(argv[0]))
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                sys.stdout.flush()
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException as e:
            tb = e.__traceback__
            while not module and tb is not None and tb.tb_frame.f_code.co_filename != argv[0]:
                tb = tb.tb_next
            tb = tb or e.__traceback__
            sys.excepthook(type(e), e.with_traceback(tb), tb)
            code = 1
        atexit._run_exitfuncs()
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:
                pass
        os._exit(code & 0xFF)

for line in iter(sys.stdin.readline, ""):
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        child(json.loads(line))
    sys.stdout.write(f"{os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}\n")
    sys.stdout.flush()
"""
_fork_servers = [None, None]  # used in turn: two runs in a row differ in hash seed and RNG states, as fresh ones do
_turn = [0]


def _stop_fork_server(i):
    server, _fork_servers[i] = _fork_servers[i], None
    if server is not None:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait()


atexit.register(lambda: [_stop_fork_server(i) for i in range(len(_fork_servers))])


def run_forked(*args, timeout=600, **env):
    """run(*ARGS) for `python SCRIPT ARGS` or `python -m MODULE ARGS`: the same process to everything a test sees
    (exit status, stdout, stderr, the files it writes), without a fresh interpreter's start-up: a child forked from a
    server that has imported torch already (the ~1.5 s of CPU every fresh `python` here spends first). Two servers take
    the runs in turn, so that two runs in a row, e.g. a run and its resumption, differ in what a fresh interpreter draws
    anew (the hash seed, address layout, numpy's global RNG), as two fresh processes do. A hang kills the server with
    every process it started (the next call starts a new one) and fails the test."""
    i = _turn[0]
    _turn[0] = 1 - i
    server = _fork_servers[i]
    if server is None or server.poll() is not None:
        server = _fork_servers[i] = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    args = list(map(str, args))
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        req = dict(argv=args, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, cwd=str(ROOT), stdout=str(out),
                   stderr=str(err))
        server.stdin.write((json.dumps(req) + "\n").encode())
        server.stdin.flush()
        answer, deadline = b"", time.monotonic() + timeout
        while not answer.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([server.stdout], [], [], left)[0]:
                _stop_fork_server(i)
                pytest.fail(f"hung for {timeout} s: python {' '.join(args)}")
            chunk = os.read(server.stdout.fileno(), 64)
            if not chunk:
                raise RuntimeError(f"conftest's fork server died (exit {server.wait()}): python {' '.join(args)}")
            answer += chunk
        return subprocess.CompletedProcess([sys.executable, *args], int(answer), out.read_text(), err.read_text())


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
