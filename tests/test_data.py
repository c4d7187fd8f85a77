"""data/loader.py (the bundled tokenizer, atomic_write, ShardReader) and data/fineweb.py (the bundled sample, the
shard writer: content, resume, --input formats, offline errors)."""
import csv
import functools
import gzip
import json
import re
import shutil
import socket
import sys
import time
import types

import numpy as np
import pytest
import torch

from conftest import exit_message
from data import fineweb, loader
from data.fineweb import main
from data.loader import DataError, ShardReader

SHARD = fineweb.SAMPLE_SHARD_SIZE  # 20000: ~89k tokens in the bundled sample -> 1 val + 4 train shards
SAMPLE = str(fineweb.SAMPLE_FILE)


@pytest.fixture(scope="module")
def sample_texts():
    with gzip.open(fineweb.SAMPLE_FILE, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    """The bundled sample tokenized once by prepare_sample(), shared by the reader tests (which never modify it)."""
    out = tmp_path_factory.mktemp("shards")
    fineweb.prepare_sample(out)
    return out


def expected_tokens(enc, texts):
    return np.concatenate([[enc.eot_token] + enc.encode_ordinary(t) for t in texts]).astype(np.uint16)


def read_all(out_dir):
    meta = json.loads((out_dir / "meta.json").read_text())
    return meta, [np.load(out_dir / s["file"]) for s in meta["shards"]]


def files_bytes(out_dir):
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


# ---------------------------------------------------------------------------------------------------- tokenizer

VARIED_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.", "0123456789 3.14159 -42 1/2 ½ ² 10,000,000 0x1F 2024-01-31",
    "It's 3:45pm; they'll say we've 12,345.67 apples (or 1e-9?) -- isn't it?",
    "def f(x):\n    return {'a': [x ** 2, x >> 1]}  # comment\n\tif x != 0: print(f\"{x!r}\")\n",
    "    leading spaces, inner     runs, tabs\t\t and newlines\n\n\n   trailing   ",
    "naïve café, Ünïcödé, Ελληνικά, русский, עברית, العربية, हिन्दी", "", " ", "\n", "a", "'s 'S 'll 'LL's",
    "你好，世界。日本語のテキスト、한국어 텍스트 🙂👍🏽🇫🇷 family: 👨‍👩‍👧‍👦", "\u00a0nbsp\u2003em\u200bzero-width\r\nCRLF\x00NUL \U0001F600"]


def test_bundled_tokenizer_equals_tiktoken_gpt2(gpt2_enc, tiktoken_gpt2, sample_texts):
    ref = tiktoken_gpt2
    assert (gpt2_enc.n_vocab, gpt2_enc.eot_token, gpt2_enc.name) == (ref.n_vocab, ref.eot_token, "gpt2") == \
        (50257, 50256, "gpt2")
    for text in VARIED_TEXTS + sample_texts[:20]:
        assert gpt2_enc.encode_ordinary(text) == ref.encode_ordinary(text), text[:80]
        assert gpt2_enc.encode(text) == ref.encode(text)
    special = "Document one.<|endoftext|>Document two <|endoftext|> end"
    assert gpt2_enc.encode(special, allowed_special={"<|endoftext|>"}) == \
        ref.encode(special, allowed_special={"<|endoftext|>"})
    assert gpt2_enc.encode(special, allowed_special="all").count(50256) == 2
    assert gpt2_enc.encode_ordinary(special) == ref.encode_ordinary(special)  # as plain text: no 50256
    everything = "\n".join(sample_texts)
    assert gpt2_enc.encode_ordinary(everything) == ref.encode_ordinary(everything)
    assert all(gpt2_enc.decode_single_token_bytes(i) == ref.decode_single_token_bytes(i) for i in range(50257))


def test_bundled_tokenizer_basics_without_network(gpt2_enc, tmp_path, monkeypatch):
    assert gpt2_enc.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert gpt2_enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    with pytest.raises(ValueError):  # tiktoken's guard against special tokens in ordinary text
        gpt2_enc.encode("<|endoftext|>")
    for text in VARIED_TEXTS:
        assert gpt2_enc.decode(gpt2_enc.encode_ordinary(text)) == text
    assert loader.get_tokenizer() is loader.get_tokenizer()  # loaded once per process

    # a fresh load needs no network and no tiktoken cache
    no_network = lambda *a, **k: pytest.fail("the tokenizer tried to open a network connection")  # noqa: E731
    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    t0 = time.time()
    enc = loader.get_tokenizer.__wrapped__()
    assert enc.encode_ordinary("Hello world") == [15496, 995] and time.time() - t0 < 10


def test_bundled_files_are_small_and_reproducible(tmp_path, shared_data):
    assert loader.TOKENIZER_FILE.stat().st_size + fineweb.SAMPLE_FILE.stat().st_size < 1_000_000
    from data import make_bundle
    make_bundle.make_tokenizer(shared_data / "gpt2_bpe", tmp_path / "t.gz")
    make_bundle.make_sample(shared_data / "fineweb_edu_sample" / "training_data.csv", tmp_path / "s.gz")
    assert (tmp_path / "t.gz").read_bytes() == loader.TOKENIZER_FILE.read_bytes()
    assert (tmp_path / "s.gz").read_bytes() == fineweb.SAMPLE_FILE.read_bytes()


def test_bytes_to_unicode_table():
    table = loader.bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "\u0120" and table[ord("\n")] == "\u010a"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


def write_gz(path, data):
    path.write_bytes(gzip.compress(data))
    return path


def test_bundled_tokenizer_errors_are_one_line(tmp_path, monkeypatch):
    load = loader.get_tokenizer.__wrapped__  # uncached, so that each case really loads its file
    good = gzip.decompress(loader.TOKENIZER_FILE.read_bytes())
    (tmp_path / "plain.gz").write_bytes(good[:5000])  # not gzip
    (tmp_path / "cut.gz").write_bytes(loader.TOKENIZER_FILE.read_bytes()[:100_000])  # truncated
    cases = {"missing": (tmp_path / "nope.tiktoken.gz", "is missing"), "not gzip": (tmp_path / "plain.gz", "is corrupt"),
             "truncated": (tmp_path / "cut.gz", "is corrupt"),
             "bad line": (write_gz(tmp_path / "line.gz", good[:1000] + b"garbage\n" + good[1000:]), "is corrupt"),
             "bad base64": (write_gz(tmp_path / "b64.gz", b"@@@@ 0\n" + good), "is corrupt"),
             "too few": (write_gz(tmp_path / "few.gz", good[:len(good) // 2].rsplit(b"\n", 1)[0] + b"\n"),
                         "expected 50256 distinct tokens")}
    for case, (path, expected) in cases.items():
        with pytest.raises(DataError) as e:
            load(path)
        msg = str(e.value)
        assert expected in msg and str(path) in msg and "\n" not in msg, (case, msg)
        assert "make_bundle.py" in msg and "TIKTOKEN_CACHE_DIR" not in msg
    # the CLI: one line, before anything is read or written
    monkeypatch.setattr(fineweb, "get_tokenizer", functools.partial(load, tmp_path / "cut.gz"))
    msg = one_line_exit(["--input", SAMPLE, "--out_dir", str(tmp_path / "o")])
    assert "is corrupt" in msg and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------- writer

def test_sample_shards_content_and_layout(sample_dir, sample_texts, gpt2_enc):
    meta, shards = read_all(sample_dir)
    assert len(sample_texts) == 150 and np.array_equal(np.concatenate(shards), expected_tokens(gpt2_enc, sample_texts))
    assert [s["split"] for s in meta["shards"]] == ["val"] + ["train"] * (len(shards) - 1)
    assert [s["file"] for s in meta["shards"][:2]] == ["edufineweb_val_000000.npy", "edufineweb_train_000001.npy"]
    assert [s["tokens"] for s in meta["shards"]] == [len(t) for t in shards]
    assert all(len(t) == SHARD for t in shards[:-1]) and 0 < len(shards[-1]) <= SHARD and len(shards) >= 4
    assert all(t.dtype == np.uint16 for t in shards) and meta["complete"] and meta["docs"] == 150
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot"], meta["dtype"]) == ("gpt2", 50257, 50256, "uint16")
    assert sorted(p.name for p in sample_dir.iterdir()) == sorted([s["file"] for s in meta["shards"]] + ["meta.json"])


def test_two_workers_give_identical_files(sample_dir, tmp_path):
    main(["--input", SAMPLE, "--out_dir", str(tmp_path), "--shard_size", str(SHARD), "--num_workers", "2"])
    assert files_bytes(tmp_path) == files_bytes(sample_dir)


def test_resume_after_crash_is_byte_identical(sample_dir, tmp_path, monkeypatch, capsys):
    argv = ["--input", SAMPLE, "--out_dir", str(tmp_path), "--shard_size", str(SHARD), "--num_workers", "1"]
    real_write, calls = fineweb.write_shard, []

    def crash_on_third(path, tokens):
        calls.append(path.name)
        if len(calls) == 3:  # die half-way through writing shard 2: a partial temp file stays behind
            path.with_name(path.name + ".tmp").write_bytes(b"\x93NUMPY partial")
            raise RuntimeError("simulated crash")
        real_write(path, tokens)

    monkeypatch.setattr(fineweb, "write_shard", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edufineweb_train_000001.npy", "edufineweb_train_000002.npy.tmp",
                                                          "edufineweb_val_000000.npy", "meta.json"]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert not meta["complete"] and len(meta["shards"]) == 2
    with pytest.raises(DataError, match="unfinished"):
        ShardReader(tmp_path, "train", 2, 16)

    monkeypatch.setattr(fineweb, "write_shard", real_write)
    finished = {n: (tmp_path / n).stat().st_mtime_ns for n in calls[:2]}
    main(argv)
    assert "resumed after 2 finished shards" in capsys.readouterr().out
    assert {n: (tmp_path / n).stat().st_mtime_ns for n in calls[:2]} == finished  # not rewritten
    assert files_bytes(tmp_path) == files_bytes(sample_dir)  # the crash's leftover .tmp was overwritten, then renamed

    main(argv)  # a finished dataset is left alone
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other settings"):
        main(argv[:-4] + ["--shard_size", "30000"])


def _write_slowly(path, payload, start):
    start.wait()  # every writer opens its temp file at the same moment
    def write(f):
        for i in range(0, len(payload), 64):
            f.write(payload[i:i + 64])
            time.sleep(0.002)
    loader.atomic_write(path, write)


def test_atomic_write_survives_concurrent_writers(tmp_path):
    """Four processes write the same file at once (DDP ranks fetching one download): each must finish without an
    error, and the file must be one writer's whole payload, with no temp file left. With one shared '<path>.tmp',
    the first rename took the others' temp file away (FileNotFoundError)."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    path, start = tmp_path / "shared.bin", ctx.Barrier(4)
    payloads = [bytes([65 + i]) * 2048 for i in range(4)]
    procs = [ctx.Process(target=_write_slowly, args=(path, p, start)) for p in payloads]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert path.read_bytes() in payloads and [p.name for p in tmp_path.iterdir()] == ["shared.bin"]


def test_max_docs_and_max_tokens(sample_texts, gpt2_enc, tmp_path):
    main(["--input", SAMPLE, "--out_dir", str(tmp_path / "d"), "--max_docs", "10", "--num_workers", "1"])
    meta, shards = read_all(tmp_path / "d")
    assert len(shards) == 1 and meta["shards"][0]["split"] == "val"
    assert np.array_equal(shards[0], expected_tokens(gpt2_enc, sample_texts[:10]))

    main(["--input", SAMPLE, "--out_dir", str(tmp_path / "t"), "--max_tokens", "12345",
          "--shard_size", "5000", "--num_workers", "1"])
    meta, shards = read_all(tmp_path / "t")
    assert [len(s) for s in shards] == [5000, 5000, 2345]
    assert np.array_equal(np.concatenate(shards), expected_tokens(gpt2_enc, sample_texts)[:12345])


def test_input_formats_gzip_and_directories(gpt2_enc, tmp_path):
    """A directory reads its supported files in name order (.jsonl/.json/.csv/.txt, each also .gz; .parquet) and
    skips the rest; .txt: blank (or whitespace-only) lines separate documents, single newlines stay inside one."""
    src = tmp_path / "src"
    src.mkdir()
    jsonl_docs = ["First JSON document.", "Second one,\nwith a newline and ünïcödé."]
    gz_docs = ["Gzipped JSON line.", "Second,\nwith ünïcödé 🙂."]
    (src / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(jsonl_docs)))
    write_gz(src / "a.jsonl.gz", "".join(json.dumps({"text": t}) + "\n" for t in gz_docs).encode())
    write_gz(src / "b.json.gz", json.dumps([{"text": "Array doc."}]).encode())
    (src / "b.txt").write_text("\n\nPara one, line one.\nPara one, line two.\n\n   \n\n"
                               "Para two.\n<|endoftext|> is text here.\n")
    txt_docs = ["Para one, line one.\nPara one, line two.", "Para two.\n<|endoftext|> is text here."]
    write_gz(src / "c.csv.gz", b'text,score\n"CSV doc, with ""quotes""\nand a newline.",3\n')
    write_gz(src / "d.txt.gz", b"Text block one.\n\nText block two.\n")
    (src / "notes.md").write_text("ignored: not a supported suffix")
    write_gz(src / "notes.gz", b"ignored: no supported suffix under .gz")
    write_gz(src / "e.parquet.gz", b"ignored: parquet is compressed already")
    main(["--input", str(src), "--out_dir", str(tmp_path / "out"), "--num_workers", "1"])
    meta, shards = read_all(tmp_path / "out")
    assert [p.rsplit("/", 1)[-1] for p in meta["settings"]["inputs"]] == ["a.jsonl", "a.jsonl.gz", "b.json.gz", "b.txt",
                                                                          "c.csv.gz", "d.txt.gz"]
    want = jsonl_docs + gz_docs + ["Array doc."] + txt_docs + ['CSV doc, with "quotes"\nand a newline.',
                                                               "Text block one.", "Text block two."]
    assert np.array_equal(np.concatenate(shards), expected_tokens(gpt2_enc, want))

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["Parquet doc."], "score": [3.5]}), tmp_path / "c.parquet")
    (tmp_path / "d.json").write_text(json.dumps([{"text": "JSON array doc."}]))
    main(["--input", str(tmp_path / "c.parquet"), str(tmp_path / "d.json"), str(src / "b.txt"),
          "--out_dir", str(tmp_path / "out2"), "--num_workers", "1"])
    _, shards = read_all(tmp_path / "out2")
    assert np.array_equal(np.concatenate(shards),
                          expected_tokens(gpt2_enc, ["Parquet doc.", "JSON array doc."] + txt_docs))


def test_real_csv_equals_bundled_sample(shared_data, sample_texts, sample_dir, tmp_path):
    """The original 150-document CSV (developers' data) holds exactly the bundled texts and gives the same shards."""
    path = shared_data / "fineweb_edu_sample" / "training_data.csv"
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as f:
        assert [row["text"] for row in csv.DictReader(f)] == sample_texts
    main(["--input", str(path), "--out_dir", str(tmp_path), "--shard_size", str(SHARD), "--num_workers", "1"])
    a, b = files_bytes(tmp_path), files_bytes(sample_dir)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != "meta.json")


@pytest.mark.parametrize("name, content, expected", [
    ("bad.jsonl", b'{"body": "no text field"}\n', r"bad.jsonl line 1: .*'text'"), ("nope.csv", None, "does not exist"),
    ("x.xml", b"<a/>", "unsupported file type"), ("notes.gz", gzip.compress(b"no supported suffix under .gz"),
                                                  "unsupported file type"),
    ("e.parquet.gz", gzip.compress(b"parquet is compressed already"), "unsupported file type"),
    ("bad.jsonl.gz", b"not gzip at all", "bad.jsonl.gz")])
def test_input_errors(tmp_path, name, content, expected):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    assert re.search(expected, one_line_exit(["--input", str(tmp_path / name), "--out_dir", str(tmp_path / "o"),
                                              "--num_workers", "1"]))


def one_line_exit(argv):
    return exit_message(main, argv, "fineweb.py")


@pytest.fixture
def hub_calls(monkeypatch):
    """No Hub settings in the environment, and a stand-in `datasets` module whose load_dataset fails like the real
    one does with no network; returns the list of its calls."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_offline_hub_error_is_one_line(tmp_path, hub_calls, monkeypatch):
    monkeypatch.setattr(loader, "hub_offline_reason", lambda: None)  # the quick check passes; datasets still fails
    msg = one_line_exit(["--out_dir", str(tmp_path), "--num_workers", "1"])
    assert "could not reach the Hugging Face Hub" in msg and "--input" in msg and len(hub_calls) == 1
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    msg = one_line_exit(["--out_dir", str(tmp_path), "--num_workers", "1"])
    assert "pip install datasets" in msg and "--input" in msg


@pytest.mark.parametrize("var, value", [("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                                        ("HF_HUB_OFFLINE", "true")])
def test_hub_offline_env_fails_at_once(tmp_path, hub_calls, monkeypatch, var, value):
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("no connection should be tried"))
    monkeypatch.setenv(var, value)
    t0 = time.time()
    msg = one_line_exit(["--out_dir", str(tmp_path / "o"), "--num_workers", "1"])
    assert time.time() - t0 < 2 and not hub_calls and not (tmp_path / "o").exists()
    assert f"{var}={value} is set" in msg and "--input" in msg and "fineweb_edu_sample.jsonl.gz" in msg


def test_hub_unreachable_fails_fast(tmp_path, hub_calls, monkeypatch):
    tried = []

    def refused(address, timeout=None):
        tried.append((address, timeout))
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    msg = one_line_exit(["--out_dir", str(tmp_path), "--num_workers", "1"])
    assert "could not reach the Hugging Face Hub" in msg and "huggingface.co:443" in msg and "--input" in msg
    assert tried == [(("huggingface.co", 443), loader.HUB_CHECK_SECONDS)] and not hub_calls

    tried.clear()  # through a proxy, the proxy is what must answer; HF_ENDPOINT names a mirror
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert "127.0.0.1:9" in loader.hub_offline_reason() and tried[0][0] == ("127.0.0.1", 9)
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example.org")
    assert "hf-mirror.example.org:443" in loader.hub_offline_reason()

    def hangs(address, timeout=None):  # e.g. a name lookup that never answers: cut off after the time limit
        time.sleep(3)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", hangs)
    monkeypatch.setattr(loader, "HUB_CHECK_SECONDS", 0.2)
    t0 = time.time()
    assert "within 0.2 s" in loader.hub_offline_reason() and time.time() - t0 < 1.5

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: types.SimpleNamespace(close=lambda: 0))
    assert loader.hub_offline_reason() is None


# ---------------------------------------------------------------------------------------------------- reader

def epoch_windows(reader, n_batches):
    """The windows (as bytes of x + last y) of the next n_batches batches."""
    out = []
    for _ in range(n_batches):
        x, y = reader.next_batch()
        out += [np.concatenate([xi, yi[-1:]]).tobytes() for xi, yi in zip(x.numpy(), y.numpy())]
    return out


def test_batches_are_shifted_windows_of_the_shards(sample_dir):
    _, shards = read_all(sample_dir)
    T = 64
    r = ShardReader(sample_dir, "train", batch_size=4, seq_len=T, vocab_size=50304)
    x, y = r.next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, T) and (x[:, 1:] == y[:, :-1]).all()
    train = shards[1:]
    for xi, yi in zip(x.numpy(), y.numpy()):  # each row is a window at a multiple of T in some train shard
        w = np.concatenate([xi, yi[-1:]])
        assert any(np.array_equal(w, s[k * T:k * T + T + 1]) for s in train for k in range((len(s) - 1) // T))
    assert r.n_windows == sum((len(s) - 1) // T for s in train)

    v = ShardReader(sample_dir, "val", batch_size=3, seq_len=T, shuffle=False)  # file order
    x, y = v.next_batch()
    assert np.array_equal(x.numpy(), shards[0][:3 * T].reshape(3, T)) and np.array_equal(y.numpy()[0], shards[0][1:T + 1])
    v.next_batch()
    v.reset()
    assert np.array_equal(v.next_batch()[0].numpy(), x.numpy())


def test_same_seed_same_batches_and_disjoint_ranks(sample_dir):
    a, b, c = (ShardReader(sample_dir, "train", batch_size=8, seq_len=32, seed=s) for s in (7, 7, 8))
    assert epoch_windows(a, 5) == epoch_windows(b, 5) != epoch_windows(c, 5)

    per_rank = a.n_windows // 2
    r0, r1 = (ShardReader(sample_dir, "train", batch_size=per_rank, seq_len=32, rank=r, world_size=2, seed=7)
              for r in (0, 1))
    w0, w1 = epoch_windows(r0, 1), epoch_windows(r1, 1)  # exactly one epoch each
    every = set(epoch_windows(ShardReader(sample_dir, "train", batch_size=a.n_windows, seq_len=32), 1))
    assert len(set(w0)) == len(set(w1)) == per_rank and not set(w0) & set(w1) and set(w0) | set(w1) <= every
    assert r0.state_dict()["epoch"] == 0 and r0.state_dict()["pos"] == per_rank
    assert epoch_windows(r0, 1) != w0 and r0.state_dict()["epoch"] == 1  # the next epoch: a new permutation


def test_one_pass_gives_each_of_the_ranks_windows_once_the_last_batch_shorter(sample_dir):
    """one_pass() (train.py's eval_iters=0): every window of the rank's epoch exactly once, in its order, batch_size
    rows at a time and a shorter last batch; the two ranks' passes are disjoint and together all but n % 2 windows."""
    every = ShardReader(sample_dir, "val", batch_size=1, seq_len=16, shuffle=False)
    n = every.n_windows
    assert n % 2 == 1 and (n // 2) % 5  # so both the rank split's remainder and a short last batch are exercised
    windows = {}
    for rank in (0, 1):
        r = ShardReader(sample_dir, "val", batch_size=5, seq_len=16, rank=rank, world_size=2, shuffle=False)
        batches = list(r.one_pass())
        assert [len(x) for x, _ in batches] == [5] * (n // 2 // 5) + [n // 2 % 5]
        assert all(x.dtype == y.dtype == torch.int64 and (x[:, 1:] == y[:, :-1]).all() for x, y in batches)
        windows[rank] = [np.concatenate([xi, yi[-1:]]).tobytes()
                         for x, y in batches for xi, yi in zip(x.numpy(), y.numpy())]
        r.reset()
        assert windows[rank][:5 * (n // 2 // 5)] == epoch_windows(r, n // 2 // 5)  # next_batch's order
    file_order = epoch_windows(every, n)
    assert windows[0] == file_order[0:n - 1:2] and windows[1] == file_order[1:n - 1:2]


@pytest.mark.parametrize("skip", [3, 7])  # with 6 batches per epoch: resume mid-epoch, and across a boundary
def test_resume_from_state_is_exact(sample_dir, skip):
    make = lambda: ShardReader(sample_dir, "train", batch_size=250, seq_len=24, rank=1, world_size=2, seed=3)
    a = make()
    assert 5 * 250 < a.n_windows // 2 < 6 * 250  # so skip=7 resumes in epoch 1 and the next batches cross into 2
    epoch_windows(a, skip)
    state = a.state_dict()
    want = epoch_windows(a, 6)
    assert all(isinstance(v, int) for v in state.values())
    b = make()
    b.load_state_dict(state)
    assert epoch_windows(b, 6) == want and b.state_dict() == a.state_dict()

    other = ShardReader(sample_dir, "train", batch_size=250, seq_len=24, rank=0, world_size=2, seed=3)
    with pytest.raises(DataError, match=r"rank=1 \(this reader: 0\)"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="seed=3"):
        ShardReader(sample_dir, "train", batch_size=250, seq_len=24, rank=1, world_size=2).load_state_dict(state)


def test_reader_errors(sample_dir, tmp_path):
    copy_dir = shutil.copytree(sample_dir, tmp_path / "copy")

    def refused(match, *args, where=copy_dir, **kw):
        with pytest.raises(DataError, match=match):
            ShardReader(where, *args, **kw)

    refused(r"meta.json missing.*python data/fineweb.py", "train", 2, 16, where=tmp_path / "nowhere")
    refused(r"vocab_size 50257 but the model's vocab_size is 50000", "train", 2, 16, vocab_size=50000)
    refused("no 'test' shards", "test", 2, 16)
    refused(r"has 20000 tokens: 0 windows of seq_len \+ 1 = 20001 tokens, but each of the 1 rank\(s\) needs at least "
            r"one window", "val", 2, seq_len=SHARD)
    shard = copy_dir / "edufineweb_train_000002.npy"
    shard.write_bytes(shard.read_bytes()[:-100])  # cut off: the header promises more than the file holds
    refused(r"edufineweb_train_000002.npy is truncated", "train", 2, 16)
    np.save(shard, np.zeros(SHARD - 10, np.uint16))  # a whole .npy, but shorter than meta.json says
    refused(rf"has {SHARD - 10} tokens but meta.json says {SHARD} \(truncated", "train", 2, 16)
    np.save(shard, np.zeros(SHARD, np.int32))
    refused("holds int32.*not 1-D uint16", "train", 2, 16)
    shard.unlink()
    refused("edufineweb_train_000002.npy listed in meta.json is missing", "train", 2, 16)
    ShardReader(copy_dir, "val", 2, 16)  # the other split is still fine
    (copy_dir / "meta.json").unlink()
    refused("meta.json missing", "val", 2, 16)


# ------------------------------------------------------------------------------------------------ chat rows

def chat_rows_slowly(conversations, seq_len):
    """ChatReader's packing, written the obvious way: whole conversations in order, a new row when the next one does
    not fit, EOS padding, target -1 where the mask is 0. The reference the packed arrays must equal."""
    rows, row, dropped = [], [], 0
    for messages in conversations:
        ids, mask = loader.render_conversation(messages)
        if len(ids) > seq_len + 1:
            dropped += 1
            continue
        if len(row) + len(ids) > seq_len + 1:
            rows.append(row)
            row = []
        row += list(zip(ids, mask))
    rows += [row] if row else []
    tokens = np.full((len(rows), seq_len + 1), loader.EOS, dtype=np.int64)
    targets = np.full((len(rows), seq_len + 1), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        for j, (t, m) in enumerate(r):
            tokens[i, j], targets[i, j] = t, t if m else -1
    return tokens, targets, dropped


def chats(n, seed=0):
    """n conversations of 1-3 turns and varied lengths (a few longer than the rows below)."""
    rng = np.random.default_rng(seed)
    words = "the cat sat on a warm mat while dogs ran past an old red barn".split()
    say = lambda k: " ".join(rng.choice(words, k))  # noqa: E731
    out = []
    for i in range(n):
        turns = [{"role": "system", "content": say(3)}] if i % 7 == 0 else []
        for _ in range(1 + i % 3):
            turns += [{"role": "user", "content": say(rng.integers(1, 12))},
                      {"role": "assistant", "content": say(rng.integers(0, 150 if i % 50 == 49 else 40))}]
        out.append(turns)
    return out


def test_batches_are_new_arrays_never_views_or_refilled_buffers(tmp_path):
    """train.py takes the next batch between a micro-step's forward and its backward. On the CPU x and y go to the
    model as they come (on CUDA .pin_memory() copies them first), and the backward still reads what the forward
    saved from them (the embedding's indices, the loss's targets): next_batch must hand out new arrays each time,
    never a view of the shards or rows, nor a buffer it refills."""
    np.save(tmp_path / "t_train_000000.npy", (np.arange(400) % 97).astype(np.uint16))
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16", "complete": True, "vocab_size": 97, "shards": [
        {"file": "t_train_000000.npy", "split": "train", "tokens": 400}]}))
    for reader, owned in ((ShardReader(tmp_path, "train", batch_size=3, seq_len=16), lambda r: r.shards),
                          (loader.ChatReader(chats(40), batch_size=2, seq_len=256), lambda r: [r.tokens, r.targets])):
        first = reader.next_batch()
        kept = [t.clone() for t in first]
        second = reader.next_batch()
        arrays = [t.numpy() for t in first + second]
        assert not any(np.shares_memory(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1:] + owned(reader))
        assert all(torch.equal(a, b) for a, b in zip(first, kept))


def test_chat_rows_are_packed_into_arrays_as_the_reference_packs_them():
    """Every row equals the reference packing (exact fits, drops, the last partial row), and building them holds little
    more than the rows themselves: no Python object per token (a (token, mask) tuple list took ~80 bytes a token,
    five times the 16 of the two int64 arrays)."""
    import tracemalloc
    loader.get_tokenizer()  # loaded once, before anything is measured
    full = 0
    for n, seq_len in ((1, 64), (40, 32), (300, 64), (300, 200)):
        convs = chats(n, seed=n + seq_len)
        r = loader.ChatReader(convs, batch_size=1, seq_len=seq_len, shuffle=False)
        tokens, targets, dropped = chat_rows_slowly(convs, seq_len)
        assert np.array_equal(r.tokens, tokens) and np.array_equal(r.targets, targets)
        assert r.tokens.dtype == r.targets.dtype == np.int64
        assert (r.n_windows, r.n_dropped, r.n_conversations) == (len(tokens), dropped, n - dropped)
        full += int((targets[:, -1] != -1).sum())  # a row filled to its last token (a reply's EOS)
    assert dropped > 0 and full > 0
    convs = chats(3000, seed=1)
    tracemalloc.start()
    r = loader.ChatReader(convs, batch_size=1, seq_len=256, shuffle=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    final = r.tokens.nbytes + r.targets.nbytes
    assert final > 2_000_000 and peak < 2 * final, (peak, final)
