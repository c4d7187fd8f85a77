"""data/fineweb.py: the shard writer (content, resume, --input formats, offline errors) and ShardReader."""
import csv
import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from data import fineweb
from data.fineweb import DataError, ShardReader, main

SHARD = 20000  # ~89k tokens in the CSV sample -> 1 val + 4 train shards


@pytest.fixture(scope="module")
def sample_csv(shared_data):
    return shared_data / "fineweb_edu_sample" / "training_data.csv"


@pytest.fixture(scope="module")
def sample_texts(sample_csv):
    csv.field_size_limit(sys.maxsize)
    with open(sample_csv, newline="", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def sample_dir(sample_csv, gpt2_enc, tmp_path_factory):
    """The CSV sample tokenized once into small shards, shared by the reader tests (which never modify it)."""
    out = tmp_path_factory.mktemp("shards")
    main(["--input", str(sample_csv), "--out_dir", str(out), "--shard_size", str(SHARD), "--num_workers", "1"])
    return out


def expected_tokens(enc, texts):
    return np.concatenate([[enc.eot_token] + enc.encode_ordinary(t) for t in texts]).astype(np.uint16)


def read_all(out_dir):
    meta = json.loads((out_dir / "meta.json").read_text())
    return meta, [np.load(out_dir / s["file"]) for s in meta["shards"]]


def files_bytes(out_dir):
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


# ---------------------------------------------------------------------------------------------------- writer

def test_shards_match_tiktoken(sample_dir, sample_texts, gpt2_enc):
    meta, shards = read_all(sample_dir)
    want = expected_tokens(gpt2_enc, sample_texts)
    assert len(sample_texts) == 150
    assert np.array_equal(np.concatenate(shards), want)
    assert [s["split"] for s in meta["shards"]] == ["val"] + ["train"] * (len(shards) - 1)
    assert meta["shards"][0]["file"] == "edufineweb_val_000000.npy"
    assert meta["shards"][1]["file"] == "edufineweb_train_000001.npy"
    assert [s["tokens"] for s in meta["shards"]] == [len(t) for t in shards]
    assert all(len(t) == SHARD for t in shards[:-1]) and 0 < len(shards[-1]) <= SHARD and len(shards) >= 4
    assert all(t.dtype == np.uint16 for t in shards)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot"], meta["dtype"]) == ("gpt2", 50257, 50256, "uint16")
    assert meta["complete"] and meta["docs"] == 150
    assert sorted(p.name for p in sample_dir.iterdir()) == sorted([s["file"] for s in meta["shards"]] + ["meta.json"])


def test_two_workers_give_identical_files(sample_dir, sample_csv, tmp_path):
    main(["--input", str(sample_csv), "--out_dir", str(tmp_path), "--shard_size", str(SHARD), "--num_workers", "2"])
    assert files_bytes(tmp_path) == files_bytes(sample_dir)


def test_resume_after_crash_is_byte_identical(sample_dir, sample_csv, tmp_path, monkeypatch, capsys):
    argv = ["--input", str(sample_csv), "--out_dir", str(tmp_path), "--shard_size", str(SHARD), "--num_workers", "1"]
    real_write = fineweb.write_shard
    calls = []

    def crash_on_third(path, tokens):
        calls.append(path.name)
        if len(calls) == 3:  # die half-way through writing shard 2: a partial temp file stays behind
            path.with_name(path.name + ".tmp").write_bytes(b"\x93NUMPY partial")
            raise RuntimeError("simulated crash")
        real_write(path, tokens)

    monkeypatch.setattr(fineweb, "write_shard", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(argv)
    assert (tmp_path / "edufineweb_train_000002.npy.tmp").exists()
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == ["edufineweb_train_000001.npy",
                                                              "edufineweb_val_000000.npy"]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert not meta["complete"] and len(meta["shards"]) == 2
    with pytest.raises(DataError, match="unfinished"):
        ShardReader(tmp_path, "train", 2, 16)

    monkeypatch.setattr(fineweb, "write_shard", real_write)
    finished = {n: (tmp_path / n).stat().st_mtime_ns for n in calls[:2]}
    main(argv)
    assert "resumed after 2 finished shards" in capsys.readouterr().out
    assert {n: (tmp_path / n).stat().st_mtime_ns for n in calls[:2]} == finished  # not rewritten
    assert not list(tmp_path.glob("*.tmp"))  # the crash's leftover was overwritten, then renamed
    assert files_bytes(tmp_path) == files_bytes(sample_dir)

    main(argv)  # a finished dataset is left alone
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other settings"):
        main(argv[:-4] + ["--shard_size", "30000"])


def test_max_docs_and_max_tokens(sample_csv, sample_texts, gpt2_enc, tmp_path):
    main(["--input", str(sample_csv), "--out_dir", str(tmp_path / "d"), "--max_docs", "10", "--num_workers", "1"])
    meta, shards = read_all(tmp_path / "d")
    assert len(shards) == 1 and meta["shards"][0]["split"] == "val"
    assert np.array_equal(shards[0], expected_tokens(gpt2_enc, sample_texts[:10]))

    main(["--input", str(sample_csv), "--out_dir", str(tmp_path / "t"), "--max_tokens", "12345",
          "--shard_size", "5000", "--num_workers", "1"])
    meta, shards = read_all(tmp_path / "t")
    assert [len(s) for s in shards] == [5000, 5000, 2345]
    assert np.array_equal(np.concatenate(shards), expected_tokens(gpt2_enc, sample_texts)[:12345])


def test_input_jsonl_txt_parquet_and_directories(gpt2_enc, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    jsonl_docs = ["First JSON document.", "Second one,\nwith a newline and ünïcödé."]
    (src / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(jsonl_docs)))
    # .txt: blank (or whitespace-only) lines separate documents; single newlines stay inside a document
    (src / "b.txt").write_text("\n\nPara one, line one.\nPara one, line two.\n\n   \n\n"
                               "Para two.\n<|endoftext|> is text here.\n")
    txt_docs = ["Para one, line one.\nPara one, line two.", "Para two.\n<|endoftext|> is text here."]
    (src / "notes.md").write_text("ignored: not a supported suffix")
    main(["--input", str(src), "--out_dir", str(tmp_path / "out"), "--num_workers", "1"])
    _, shards = read_all(tmp_path / "out")
    assert np.array_equal(np.concatenate(shards), expected_tokens(gpt2_enc, jsonl_docs + txt_docs))

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["Parquet doc."], "score": [3.5]}), tmp_path / "c.parquet")
    (tmp_path / "d.json").write_text(json.dumps([{"text": "JSON array doc."}]))
    main(["--input", str(tmp_path / "c.parquet"), str(tmp_path / "d.json"), str(src / "b.txt"),
          "--out_dir", str(tmp_path / "out2"), "--num_workers", "1"])
    _, shards = read_all(tmp_path / "out2")
    assert np.array_equal(np.concatenate(shards),
                          expected_tokens(gpt2_enc, ["Parquet doc.", "JSON array doc."] + txt_docs))


def test_input_errors(tmp_path, gpt2_enc):
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(SystemExit, match=r"fineweb.py: error: .*bad.jsonl line 1: .*'text'"):
        main(["--input", str(tmp_path / "bad.jsonl"), "--out_dir", str(tmp_path / "o"), "--num_workers", "1"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--input", str(tmp_path / "nope.csv"), "--out_dir", str(tmp_path / "o")])
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(SystemExit, match="unsupported file type"):
        main(["--input", str(tmp_path / "x.xml"), "--out_dir", str(tmp_path / "o")])


def one_line_exit(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    msg = str(exc.value.code)
    assert msg.startswith("fineweb.py: error: ") and "\n" not in msg
    return msg


def test_offline_hub_error_is_one_line(tmp_path, monkeypatch, gpt2_enc):
    # a stand-in `datasets` module whose load_dataset fails like the real one does with no network
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    msg = one_line_exit(["--out_dir", str(tmp_path), "--num_workers", "1"])
    assert "could not reach the Hugging Face Hub" in msg and "--input" in msg

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    msg = one_line_exit(["--out_dir", str(tmp_path), "--num_workers", "1"])
    assert "pip install datasets" in msg and "--input" in msg


def test_tokenizer_offline_error_names_cache_dir(tmp_path, monkeypatch):
    import tiktoken

    def fail(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'\n(details)")

    monkeypatch.setattr(tiktoken, "get_encoding", fail)
    with pytest.raises(DataError, match="TIKTOKEN_CACHE_DIR"):
        fineweb.get_tokenizer()
    assert "TIKTOKEN_CACHE_DIR" in one_line_exit(["--input", str(tmp_path), "--out_dir", str(tmp_path / "o")])


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
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, T)
    assert (x[:, 1:] == y[:, :-1]).all()
    train = shards[1:]
    for xi, yi in zip(x.numpy(), y.numpy()):  # each row is a window at a multiple of T in some train shard
        w = np.concatenate([xi, yi[-1:]])
        assert any(np.array_equal(w, s[k * T:k * T + T + 1]) for s in train for k in range((len(s) - 1) // T))
    assert r.n_windows == sum((len(s) - 1) // T for s in train)

    v = ShardReader(sample_dir, "val", batch_size=3, seq_len=T, shuffle=False)  # file order
    x, y = v.next_batch()
    assert np.array_equal(x.numpy(), shards[0][:3 * T].reshape(3, T))
    assert np.array_equal(y.numpy()[0], shards[0][1:T + 1])
    v.next_batch()
    v.reset()
    assert np.array_equal(v.next_batch()[0].numpy(), x.numpy())


def test_same_seed_same_batches_and_disjoint_ranks(sample_dir):
    a = ShardReader(sample_dir, "train", batch_size=8, seq_len=32, seed=7)
    b = ShardReader(sample_dir, "train", batch_size=8, seq_len=32, seed=7)
    c = ShardReader(sample_dir, "train", batch_size=8, seq_len=32, seed=8)
    assert epoch_windows(a, 5) == epoch_windows(b, 5) != epoch_windows(c, 5)

    per_rank = a.n_windows // 2
    r0 = ShardReader(sample_dir, "train", batch_size=per_rank, seq_len=32, rank=0, world_size=2, seed=7)
    r1 = ShardReader(sample_dir, "train", batch_size=per_rank, seq_len=32, rank=1, world_size=2, seed=7)
    w0, w1 = epoch_windows(r0, 1), epoch_windows(r1, 1)  # exactly one epoch each
    every = set(epoch_windows(ShardReader(sample_dir, "train", batch_size=a.n_windows, seq_len=32), 1))
    assert len(set(w0)) == len(set(w1)) == per_rank
    assert not set(w0) & set(w1) and set(w0) | set(w1) <= every
    assert r0.state_dict()["epoch"] == 0 and r0.state_dict()["pos"] == per_rank
    assert epoch_windows(r0, 1) != w0  # the next epoch is a new permutation
    assert r0.state_dict()["epoch"] == 1


@pytest.mark.parametrize("skip", [3, 7])  # with 6 batches per epoch: resume mid-epoch, and across a boundary
def test_resume_from_state_is_exact(sample_dir, skip):
    make = lambda: ShardReader(sample_dir, "train", batch_size=250, seq_len=24, rank=1, world_size=2, seed=3)
    a = make()
    assert 5 * 250 < a.n_windows // 2 < 6 * 250  # so skip=7 resumes in epoch 1 and the next batches cross into 2
    epoch_windows(a, skip)
    state = a.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    want = epoch_windows(a, 6)
    b = make()
    b.load_state_dict(state)
    assert epoch_windows(b, 6) == want
    assert b.state_dict() == a.state_dict()

    other = ShardReader(sample_dir, "train", batch_size=250, seq_len=24, rank=0, world_size=2, seed=3)
    with pytest.raises(DataError, match=r"rank=1 \(this reader: 0\)"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="seed=3"):
        ShardReader(sample_dir, "train", batch_size=250, seq_len=24, rank=1, world_size=2).load_state_dict(state)


@pytest.fixture
def copy_dir(sample_dir, tmp_path):
    return shutil.copytree(sample_dir, tmp_path / "copy")


def test_reader_errors(copy_dir, tmp_path):
    with pytest.raises(DataError, match=r"meta.json missing.*python data/fineweb.py"):
        ShardReader(tmp_path / "nowhere", "train", 2, 16)
    with pytest.raises(DataError, match=r"vocab_size 50257 but the model's vocab_size is 50000"):
        ShardReader(copy_dir, "train", 2, 16, vocab_size=50000)
    with pytest.raises(DataError, match="no 'test' shards"):
        ShardReader(copy_dir, "test", 2, 16)
    with pytest.raises(DataError, match=r"has 20000 tokens: 0 windows of seq_len \+ 1 = 20001 tokens, but each "
                                        r"of the 1 rank\(s\) needs at least one window"):
        ShardReader(copy_dir, "val", 2, seq_len=SHARD)

    shard = copy_dir / "edufineweb_train_000002.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])  # cut off: the header promises more than the file holds
    with pytest.raises(DataError, match=r"edufineweb_train_000002.npy is truncated"):
        ShardReader(copy_dir, "train", 2, 16)
    np.save(shard, np.zeros(SHARD - 10, np.uint16))  # a whole .npy, but shorter than meta.json says
    with pytest.raises(DataError, match=rf"has {SHARD - 10} tokens but meta.json says {SHARD} \(truncated"):
        ShardReader(copy_dir, "train", 2, 16)
    np.save(shard, np.zeros(SHARD, np.int32))
    with pytest.raises(DataError, match="holds int32.*not 1-D uint16"):
        ShardReader(copy_dir, "train", 2, 16)
    shard.unlink()
    with pytest.raises(DataError, match="edufineweb_train_000002.npy listed in meta.json is missing"):
        ShardReader(copy_dir, "train", 2, 16)
    ShardReader(copy_dir, "val", 2, 16)  # the other split is still fine

    (copy_dir / "meta.json").unlink()
    with pytest.raises(DataError, match="meta.json missing"):
        ShardReader(copy_dir, "val", 2, 16)
