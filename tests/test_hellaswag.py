"""hellaswag.py: decision rule on a stub scorer, batched scoring == one-ending-at-a-time reference, data
validation, the CLI, and the real validation file. CPU, fp32."""
import io
import json
import os
import re
import urllib.error
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hellaswag as H
from conftest import TORCHRUN, cached_hellaswag, downloads, exit_message, hellaswag_standin, ok, run, run_forked, \
    save_ckpt, tiny_model as _tiny


def tiny_model(max_seq_len=128, vocab_size=50304):
    return _tiny(0, vocab_size=vocab_size, n_layers=2, max_seq_len=max_seq_len).eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A random tiny checkpoint in train.py's format (max_seq_len 128: the first 50 items are <= 86 tokens)."""
    return save_ckpt(tmp_path_factory.mktemp("ckpt"), tiny_model(), step=123)


@pytest.fixture
def hs_file(shared_data):
    path = shared_data / "hellaswag" / "hellaswag_val.jsonl"
    assert path.is_file(), path
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -----------------------------------------------------------------------------------------------------------
# the decision rule, on a stub tokenizer + stub model whose per-token losses are set by a table

WORDS = ["<pad>", "the", "cat", "a", "dog", "short", "ok", "bad"]
LOSS = {"<pad>": 7.0, "the": 9.0, "cat": 9.0, "a": 9.0, "dog": 9.0, "short": 2.0, "ok": 1.0, "bad": 5.0}


STUB_ENC = SimpleNamespace(encode_ordinary=lambda text: [WORDS.index(w) for w in text.split()])  # a token per word


class StubModel(nn.Module):
    """Non-causal cheat: logits at position t put probability exp(-LOSS[next token]) on the next token, so the
    cross-entropy of every target token is exactly its LOSS entry. Records the shape of each forward."""
    def __init__(self):
        super().__init__()
        self.loss = torch.tensor([LOSS[w] for w in WORDS])
        self.calls = []

    def forward(self, idx):
        self.calls.append(tuple(idx.shape))
        (B, T), V = idx.shape, len(WORDS)
        nxt = torch.cat([idx[:, 1:], idx[:, :1]], dim=1)            # last position: anything, it is never scored
        target_loss = self.loss[nxt]                                  # (B, T)
        rest = torch.log((1 - torch.exp(-target_loss)) / (V - 1))   # the other V-1 tokens share the remaining mass
        logits = rest.unsqueeze(-1).expand(B, T, V).clone()
        logits.scatter_(-1, nxt.unsqueeze(-1), -target_loss.unsqueeze(-1))
        return logits, None


STUB_ITEMS = [
    # sums 2, 4, 5, 10; means 2, 1, 5, 5: acc picks 0 (one cheap token), acc_norm picks 1 (four cheaper tokens)
    {"ctx": "the cat", "endings": ["short", "ok ok ok ok", "bad", "bad bad"], "label": 1},
    # sums 5, 1, 10, 6; means 5, 1, 5, 3: both pick 1
    {"ctx": "a dog", "endings": ["bad", "ok", "bad bad", "ok bad"], "label": 1},
]


def test_pick_rule():
    acc, norm = H.pick([2.0, 4.0, 5.0, 10.0], [2.0, 1.0, 5.0, 5.0])
    assert (acc.item(), norm.item()) == (0, 1)
    acc, norm = H.pick(torch.tensor([[3.0, 1.0, 1.0, 2.0], [4.0, 3.0, 2.0, 1.0]]), torch.ones(2, 4))
    assert acc.tolist() == [1, 3] and norm.tolist() == [0, 0]  # ties: the first ending


def test_stub_scorer_losses_and_choices(tmp_path):
    rendered = [H.render(ex, STUB_ENC) for ex in STUB_ITEMS]
    batch = H.collate(rendered)
    assert batch["tokens"].shape == (8, 6)  # "the cat ok ok ok ok" is the longest row; the rest are padded with 0
    model = StubModel()
    s, m = H.ending_losses(model, batch)
    # ending tokens only: neither the context (9.0 per token) nor the padding (7.0) counts
    assert s.tolist() == pytest.approx([2, 4, 5, 10, 5, 1, 10, 6], abs=1e-5)
    assert m.tolist() == pytest.approx([2, 1, 5, 5, 5, 1, 5, 3], abs=1e-5)

    path = write_jsonl(tmp_path / "two.jsonl", STUB_ITEMS)
    model.calls.clear()
    res = H.evaluate(model, str(path), "cpu", enc=STUB_ENC, batch_size=2)
    assert res == {"acc": 0.5, "acc_norm": 1.0, "n": 2} and model.calls == [(8, 6)]  # 2 items x 4 rows, one forward
    model.calls.clear()
    assert H.evaluate(model, str(path), "cpu", enc=STUB_ENC, batch_size=1) == res and len(model.calls) == 2


def test_sharding_under_distributed(tmp_path, monkeypatch):
    """Rank r scores items r::world and the counts are all-reduced (here: summed over two simulated ranks)."""
    # acc is wrong on items 0, 2, 4 (the first stub item), acc_norm always right
    path = write_jsonl(tmp_path / "five.jsonl", (STUB_ITEMS * 3)[:5])
    per_rank = {}
    for rank in (0, 1):
        monkeypatch.setattr(H.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(H.dist, "get_rank", lambda: rank)
        monkeypatch.setattr(H.dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(H.dist, "all_reduce", lambda t: per_rank.setdefault(rank, t.tolist()))
        monkeypatch.setattr(H.dist, "broadcast_object_list", lambda objs, src: None)  # rank 0 found the file
        H.evaluate(StubModel(), str(path), "cpu", enc=STUB_ENC, batch_size=2)
    assert per_rank[0] == [0, 3, 3] and per_rank[1] == [2, 2, 2]  # rank 0: items 0, 2, 4; rank 1: items 1, 3


# -----------------------------------------------------------------------------------------------------------
# the real scorer: batched + padded == one ending at a time, unpadded

@torch.no_grad()
def check_against_reference(model, rendered, batch_size):
    """H.ending_losses on batches of `batch_size` items == the obvious reference (one forward per ending, no
    padding, no mask); returns the reference (sums, means)."""
    losses = []
    for r in rendered:
        c = r["ctx_len"]
        for row in r["tokens"]:
            tok = torch.tensor(row)
            losses.append(F.cross_entropy(model(tok[None])[0][0, c - 1:-1].float(), tok[c:], reduction="none"))
    ref_s, ref_m = torch.stack([x.sum() for x in losses]), torch.stack([x.mean() for x in losses])
    s, m = zip(*(H.ending_losses(model, H.collate(rendered[i:i + batch_size]))
                 for i in range(0, len(rendered), batch_size)))
    torch.testing.assert_close(torch.cat(s), ref_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(m), ref_m, rtol=1e-5, atol=1e-5)
    return ref_s, ref_m


def test_batched_matches_one_ending_at_a_time(tiny_ckpt, hs_file, gpt2_enc):
    from checkpoint import load_model
    model, _ = load_model(str(tiny_ckpt), "cpu")
    items = H.load_examples(str(hs_file), limit=50)
    rendered = [H.render(ex, gpt2_enc, model.cfg.max_seq_len) for ex in items]
    assert max(len(t) for r in rendered for t in r["tokens"]) <= model.cfg.max_seq_len  # no truncation here
    # build-nanogpt's rendering: ctx tokens, then the tokens of " " + ending
    assert rendered[0]["tokens"][2] == gpt2_enc.encode(items[0]["ctx"]) + gpt2_enc.encode(" " + items[0]["endings"][2])
    ref_s, ref_m = check_against_reference(model, rendered, 3)  # 12 rows per forward, mixed lengths, last partial
    # and evaluate() (length-sorted batches) decides exactly as the reference does (first 20 items: time)
    acc_ref, norm_ref = H.pick(ref_s[:80].view(-1, 4), ref_m[:80].view(-1, 4))
    labels = torch.tensor([ex["label"] for ex in items[:20]])
    mean = lambda hits: hits.float().mean().item()  # noqa: E731
    assert H.evaluate(model, str(hs_file), "cpu", enc=gpt2_enc, limit=20, batch_size=4) == pytest.approx(
        {"n": 20, "acc": mean(acc_ref == labels), "acc_norm": mean(norm_ref == labels)})


def test_long_items_truncate_context_from_left(hs_file, gpt2_enc):
    model = tiny_model(max_seq_len=24).train()
    assert H.evaluate(model, str(hs_file), "cpu", enc=gpt2_enc, limit=8)["n"] == 8  # would raise if too long
    assert model.training and all(g.tokens_per_expert.sum() == 0 for g in model.gates())  # mode and counters kept
    model.eval()
    items = [ex for ex in H.load_examples(str(hs_file), limit=20)
             if max(len(t) for t in H.render(ex, gpt2_enc)["tokens"]) > 24][:4]
    assert len(items) == 4
    for ex in items:
        full, r = H.render(ex, gpt2_enc), H.render(ex, gpt2_enc, max_len=24)
        assert max(len(t) for t in full["tokens"]) > 24 and max(len(t) for t in r["tokens"]) == 24
        c, fc = r["ctx_len"], full["ctx_len"]
        for t, ft in zip(r["tokens"], full["tokens"]):
            assert t[:c] == ft[:fc][-c:] == r["tokens"][0][:c] and t[c:] == ft[fc:]  # same context suffix, endings intact
    check_against_reference(model, [H.render(ex, gpt2_enc, 24) for ex in items], 4)
    # an ending that alone exceeds max_len keeps its first max_len - 1 tokens after one context token
    r = H.render(items[0], gpt2_enc, max_len=4)
    assert r["ctx_len"] == 1 and all(len(t) <= 4 for t in r["tokens"])


# -----------------------------------------------------------------------------------------------------------
# data: validation, the real file, download

GOOD = {"ctx": "A man is sitting on a roof.", "endings": ["a", "b", "c", "d"], "label": 3}


@pytest.mark.parametrize("bad, expected", [
    ('{"ctx": "x", "endings": ["a", "b"', "not valid JSON"), ([1, 2], "expected a JSON object"),
    ({**GOOD, "endings": ["a", "b", "c"]}, "exactly 4 strings, got 3 items"),
    ({**GOOD, "label": 7}, "'label' must be an int in 0..3, got 7"),
    ({k: v for k, v in GOOD.items() if k != "label"}, "missing field(s) ['label']")])
def test_malformed_line_names_the_line(tmp_path, tiny_ckpt, bad, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(H.HellaSwagError) as e:
        H.load_examples(str(path))
    assert f"{path} line 2: " in str(e.value) and expected in str(e.value) and "\n" not in str(e.value)
    assert len(H.load_examples(str(path), limit=1)) == 1  # --limit reads no further
    assert "line 2: " in exit_message(H.main, [f"--out_dir={tiny_ckpt}", f"--data_path={path}", "--device=cpu",
                                               "--progress=False"], "hellaswag.py")


def test_real_validation_file(hs_file):
    items = H.load_examples(str(hs_file))
    assert len(items) == 10042 and Counter(ex["label"] for ex in items) == {0: 2515, 1: 2485, 2: 2584, 3: 2458}


def offline(*a, **k):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_offline_download_names_data_path(tmp_path, tiny_ckpt, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(H.urllib.request, "urlopen", offline)
    with pytest.raises(H.HellaSwagError, match="--data_path"):
        H.load_examples()
    msg = exit_message(H.main, [f"--out_dir={tiny_ckpt}", "--device=cpu", "--progress=False"], "hellaswag.py")
    assert msg.startswith("hellaswag.py: error: cannot download") and "--data_path" in msg
    assert cached_hellaswag(tmp_path) == []  # no partial file left behind


def test_download_is_checked_and_atomic(tmp_path, hs_file, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    dest = H.default_data_path()
    monkeypatch.setattr(H.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b'{"truncated": '))
    with pytest.raises(H.HellaSwagError, match="sha256"):
        H.load_examples()
    assert not os.listdir(os.path.dirname(dest))
    data = hs_file.read_bytes()
    monkeypatch.setattr(H.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(data))
    assert len(H.load_examples(limit=3)) == 3 and open(dest, "rb").read() == data
    monkeypatch.setattr(H.urllib.request, "urlopen", offline)  # cached now: no network needed
    assert len(H.load_examples(limit=3)) == 3


# -----------------------------------------------------------------------------------------------------------
# CLI

def test_cli_writes_json(tiny_ckpt, hs_file, gpt2_enc, tmp_path, capsys):
    out = tmp_path / "res" / "hs.json"
    res = H.main([f"--out_dir={tiny_ckpt}", f"--data_path={hs_file}", "--limit=20", "--device=cpu",
                  "--batch_size=4", "--progress=False", f"--out_json={out}"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"hellaswag: acc \d\.\d{4} acc_norm \d\.\d{4} over 20 items \(step 123\)", line)
    got = json.loads(out.read_text())
    assert got["n"] == 20 and got["step"] == 123 and got["checkpoint"] == str(tiny_ckpt / "ckpt.pt")
    assert got["acc"] == res["acc"] and got["acc_norm"] == res["acc_norm"]
    # default --out_json: <out_dir>/hellaswag.json
    H.main([f"--out_dir={tiny_ckpt}", f"--data_path={hs_file}", "--limit=2", "--device=cpu", "--progress=False"])
    assert json.loads((tiny_ckpt / "hellaswag.json").read_text())["n"] == 2


@pytest.mark.parametrize("case, expected", [
    ("no_checkpoint", "hellaswag.py: error: no checkpoint at"), ("typo", "config error: unknown config key 'limt'"),
    # vocab_size 128 cannot read GPT-2 ids (before, an IndexError from the embedding, a device-side assert on CUDA)
    ("small_vocab", "hellaswag.py: error: the model's vocab_size is 128, smaller than the tokenizer's 50257")])
def test_cli_errors_are_one_line(tmp_path, case, expected):
    """One line, and no result file."""
    ckpt = tmp_path / "nothing"
    if case == "small_vocab":
        save_ckpt(ckpt, tiny_model(vocab_size=128), step=1)
    path = write_jsonl(tmp_path / "items.jsonl", STUB_ITEMS)
    args = [f"--out_dir={ckpt}", f"--data_path={path}", "--device=cpu", "--progress=False"]
    assert exit_message(H.main, args + ["--limt=3"] * (case == "typo")).startswith(expected)
    assert not (ckpt / "hellaswag.json").exists()


def test_torchrun_two_ranks_with_an_empty_cache(tiny_ckpt, tmp_path):
    """The README's `torchrun ... hellaswag.py` on 2 gloo ranks with no cached file: rank 0 downloads (a local
    stand-in), rank 1 waits for it, and the items are split between them. Before, both downloaded into the same
    temp file and one of them could die on the rename. The result equals a single-process run's."""
    script, env = hellaswag_standin(tmp_path)
    args = [f"--out_dir={tiny_ckpt}", "--device=cpu", "--progress=False"]
    ok(run(*TORCHRUN, script, "hellaswag.py", *args, f"--out_json={tmp_path / 'ddp.json'}", timeout=300, **env))
    assert [line.split()[0] for line in downloads(tmp_path)] == ["0"]
    assert cached_hellaswag(tmp_path) == ["hellaswag_val.jsonl"]
    ok(run_forked(script, "hellaswag.py", *args, f"--out_json={tmp_path / 'one.json'}", timeout=300, **env))
    assert len(downloads(tmp_path)) == 1  # the second run reads the cached file
    ddp, one = (json.loads((tmp_path / f).read_text()) for f in ("ddp.json", "one.json"))
    assert ddp["n"] == one["n"] == 8 and (ddp["acc"], ddp["acc_norm"]) == (one["acc"], one["acc_norm"])
