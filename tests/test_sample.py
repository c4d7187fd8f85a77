"""sample.py: cached and speculative generation against slow references, and the command line (CPU, tiny models)."""
import pytest
import torch

import sample
from checkpoint import load_model
from conftest import exit_message, one_line_error, run_forked, save_ckpt, tiny_model


def tiny(seed=0, **kw):
    return tiny_model(seed, **{"vocab_size": 64, "n_layers": 2, "max_seq_len": 64, **kw}).eval()


def prompt_of(seed, length):
    return torch.randint(0, 64, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(model, prompt, n, **kw):
    return list(sample.generate_tokens(model, prompt, n, temperature=0, **kw))


# ---------------------------------------------------------------------------------------------------------------
# the sampling distribution, plain cached decoding

def test_sample_probs_greedy_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    for rows, temperature, kw, want in [(2, 0, {}, [[1.0, 0, 0, 0], [0, 0, 0, 1]]),  # greedy: one-hot on the argmax
                                        (1, 1.0, dict(top_k=2), [[0.625, 0.375, 0, 0]]),
                                        (1, 1.0, dict(top_p=0.7), [[0.625, 0.375, 0, 0]]),  # prefix {0.5, 0.3}
                                        (1, 1.0, dict(top_p=0.45), [[1.0, 0, 0, 0]])]:
        torch.testing.assert_close(sample.sample_probs(logits[:rows], temperature, **kw), torch.tensor(want))


def test_stop_at_eot_stats_and_n_vocab():
    m = tiny()
    prompt = prompt_of(3, 5)
    ref = greedy(m, prompt, 20)
    eot = next(t for t in ref if ref.index(t) >= 2)  # a token first generated third or later
    st = {}
    out = greedy(m, prompt, 20, eot=eot, stats=st)
    assert out == ref[:ref.index(eot) + 1]
    assert st["prefill_tokens"] == 5 and st["decode_tokens"] == len(out) - 1 and st["prefill_s"] > 0 and st["decode_s"] > 0
    # n_vocab: sample among the first n_vocab ids only
    out = list(sample.generate_tokens(m, prompt, 40, temperature=2.0, generator=torch.Generator().manual_seed(0),
                                      n_vocab=10))
    assert len(out) == 40 and max(out) < 10 and max(greedy(m, prompt, 20, n_vocab=5)) < 5


# ---------------------------------------------------------------------------------------------------------------
# speculative decoding

@pytest.mark.parametrize("n_mtp", [1, 2])
def test_cached_and_speculative_greedy_equal_uncached_greedy(n_mtp):
    for model_seed in range(2):
        m = tiny(model_seed, n_mtp=n_mtp)
        for seed, length in [(0, 1), (1, 6), (1, 7), (2, 17), (2, 20)]:
            # the obviously-correct reference: the full forward over the whole sequence for every new token
            idx = torch.tensor([prompt_of(seed, length)])
            with torch.no_grad():
                for _ in range(30):
                    idx = torch.cat([idx, m(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
            st = {}
            assert greedy(m, idx[0, :length].tolist(), 30) == idx[0, length:].tolist() == \
                greedy(m, idx[0, :length].tolist(), 30, speculative=True, stats=st)
            assert st["drafted"] > 0 and 0 <= st["accepted"] <= st["drafted"]


@pytest.mark.parametrize("n_mtp", [1, 2])
@pytest.mark.parametrize("oracle", [False, True])
def test_speculative_drafts_equal_mtp_from_scratch(n_mtp, oracle, monkeypatch):
    """Every draft the incremental MTP caches produce equals the MTP modules run from scratch on the same tokens.
    oracle=True replaces the drafts by the main model's own greedy tokens (the MTP modules still run and keep
    their caches), so every draft is accepted: the accept path, where caches advance D + 1 positions a round."""
    m = tiny(1, n_mtp=n_mtp)
    prompt, n_new = prompt_of(5, 9), 31
    full = prompt + greedy(m, prompt, n_new)
    calls, real = [], m.mtp_decode

    def spy(k, h_prev, idx, cache, start_pos):
        logits, h = real(k, h_prev, idx, cache, start_pos)
        n = start_pos + idx.size(1)   # module k drafts t_{n+k+1} from position n-1
        calls.append((k, n, idx[0, idx.size(1) - k:].tolist(), logits[0, -1].clone()))
        if oracle:
            logits = torch.full_like(logits, -1e4)
            logits[0, -1, full[n + k + 1]] = 0.0
        return logits, h

    monkeypatch.setattr(m, "mtp_decode", spy)
    st = {}
    assert greedy(m, prompt, n_new, speculative=True, stats=st) == full[len(prompt):]
    monkeypatch.undo()
    assert {k for k, *_ in calls} == set(range(n_mtp))
    for k, n, drafts, logits in calls:
        # MTP module k at position n-1 by the training path (no cache, no incremental hidden states) over the
        # committed x_0..x_n, then this round's drafts d_1..d_k
        s = torch.tensor([full[:n + 1] + (drafts if k else [])])
        with torch.no_grad():
            h, _ = m.trunk(s[:, :n])
            for j in range(k + 1):
                h, _ = m.mtp[j](h, m.embed(s[:, j + 1:n + j + 1]), m.rope_cos[:n], m.rope_sin[:n])
        torch.testing.assert_close(logits, m.head(m.mtp[k].norm(h[:, -1]))[0], rtol=1e-4, atol=1e-4)
    if oracle:
        assert st["accepted"] == st["drafted"] > 0
        assert sum(1 for k, *_ in calls if k == 0) <= -(-(n_new - 1) // (n_mtp + 1)) + 1  # rounds: D + 1 tokens each
    else:
        assert st["accepted"] < st["drafted"]  # a random model's drafts are mostly rejected


def test_accept_or_resample_preserves_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.40, 0.25, 0.00, 0.30])
    q = torch.tensor([0.30, 0.10, 0.20, 0.25, 0.15])  # proposes a token p never makes (3), misses none
    N = 20000
    draft = torch.multinomial(q.expand(N, -1), 1, replacement=True, generator=g).squeeze(-1)
    accepted, token = sample.accept_or_resample(p.expand(N, -1), q.expand(N, -1), draft, g)
    assert (torch.bincount(token, minlength=5).float() / N - p).abs().max() < 0.02
    assert accepted.float().mean().item() == pytest.approx(torch.minimum(p, q).sum().item(), abs=0.02)
    assert not accepted[draft == 3].any() and torch.equal(token[accepted], draft[accepted])
    # q == p: every draft is kept; one-hot (greedy) p and q: kept iff equal, else the argmax of p
    draft = torch.multinomial(p.expand(N, -1), 1, replacement=True, generator=g).squeeze(-1)
    acc, tok = sample.accept_or_resample(p.expand(N, -1), p.expand(N, -1), draft, g)
    assert acc.all() and torch.equal(tok, draft)
    eye = torch.eye(5)
    acc, tok = sample.accept_or_resample(eye[[1, 2, 4]], eye[[1, 3, 0]], torch.tensor([1, 3, 0]), g)
    assert acc.tolist() == [True, False, False] and tok.tolist() == [1, 2, 4]


def test_speculative_sampling_runs_with_filters():
    m = tiny(n_mtp=2, init_std=0.3)  # peaky logits, so that some drafts are accepted
    st = {}
    out = list(sample.generate_tokens(m, prompt_of(6, 4), 40, temperature=0.7, top_k=8, top_p=0.9,
                                      generator=torch.Generator().manual_seed(0), speculative=True, stats=st))
    assert len(out) == 40 and all(0 <= t < 64 for t in out) and 0 < st["accepted"] <= st["drafted"]


def test_request_errors():
    m = tiny(n_mtp=0)
    for prompt, kw, match in [([1] * 60, {}, "max_seq_len=64"), ([1], dict(speculative=True), "n_mtp=0"),
                              ([], {}, "empty prompt")]:
        with pytest.raises(ValueError, match=match):
            sample.generate_tokens(m, prompt, 5, **kw)  # raised at the call, before any token
    assert len(greedy(m, [1] * 59, 5)) == 5  # exactly max_seq_len is fine


# ---------------------------------------------------------------------------------------------------------------
# command line

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    paths = {D: str(save_ckpt(root / f"mtp{D}", tiny(vocab_size=50304, n_mtp=D), step=0)) for D in (0, 2)}
    paths["v128"] = str(save_ckpt(root / "v128", tiny(vocab_size=128), step=0))  # smaller vocab than GPT-2's
    return paths


def test_text_stream_joins_to_decode(gpt2_enc):
    enc = gpt2_enc
    ids = enc.encode("naïve café 你好 🙂 done") + [enc.eot_token] + enc.encode("🙂")
    for tokens in (ids, ids[:-1], [ids[i] for i in torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]):
        text = sample.text_stream(enc)
        assert "".join([text(t) for t in tokens] + [text()]) == enc.decode(tokens)
    text = sample.text_stream(enc)
    assert [text(t) for t in enc.encode("🙂")][-1] == "🙂"  # held back, not printed as replacement characters


def test_cli_file_prompt_samples_and_stats(ckpts, tmp_path, capsys, gpt2_enc):
    prompt = "The mitochondria is"
    (tmp_path / "prompt.txt").write_text(prompt)
    sample.main([f"--out_dir={ckpts[2]}", f"--start=FILE:{tmp_path / 'prompt.txt'}", "--num_samples=2",
                 "--max_new_tokens=10", "--temperature=0.9", "--top_k=50", "--top_p=0.9", "--seed=3", "--stats",
                 "--stop_at_eot=False"])
    out, err = capsys.readouterr()
    # stdout is exactly the samples: prompt + the tokens generate_tokens gives with the same generator
    model, _ = load_model(ckpts[2])
    g, ids, expected = torch.Generator().manual_seed(3), gpt2_enc.encode(prompt), ""
    for _ in range(2):
        tokens = list(sample.generate_tokens(model, ids, 10, 0.9, 50, 0.9, g, n_vocab=gpt2_enc.n_vocab))
        expected += gpt2_enc.decode(ids + tokens) + "\n---------------\n"
    assert out == expected and "KV cache per token" in err and "prefill:" in err and "decode:" in err and "tok/s" in err


def test_cli_speculative_greedy_output_equals_plain_and_default_length_fits(ckpts, capsys):
    """Without --max_new_tokens a model with a short context (max_seq_len 64 here) fills it instead of refusing;
    an explicit number that does not fit is refused (test_cli_errors_are_one_line)."""
    args = [f"--out_dir={ckpts[2]}", "--start=Once upon a time", "--num_samples=1", "--temperature=0",
            "--stop_at_eot=False"]
    sample.main(args + ["--stats"])
    plain, err = capsys.readouterr()
    assert f"decode: {64 - 4 - 1} tokens" in err  # 4 prompt tokens, 60 new ones (the first comes with the prefill)
    sample.main(args + ["--speculative=True", "--top_k=0"])
    spec, err = capsys.readouterr()
    assert spec == plain and plain.startswith("Once upon a time") and plain.endswith("\n---------------\n")
    assert "accepted" in err and "drafts" in err


CLI_ERRORS = {  # case: (checkpoint, arguments, what the one line must say); later arguments win
    "no_mtp": (0, ["--speculative=True"], "n_mtp=0"), "missing": (2, ["--out_dir=NOWHERE"], "no checkpoint"),
    "too_long": (2, ["--start=" + "hello " * 40, "--max_new_tokens=30"], "max_seq_len=64"),
    "bad_dtype": (2, ["--dtype=float8"], "dtype must be one of"),
    "bad_file": (2, ["--start=FILE:NOWHERE/none.txt"], "prompt file"),
    "top_k_negative": (2, ["--top_k=-5"], "--top_k must be >= 0"),
    "top_p_zero": (2, ["--top_p=0"], "--top_p must be in (0, 1]"),
    "top_p_above_one": (2, ["--top_p=1.5"], "--top_p must be in (0, 1]"),
    "device_gpu": (2, ["--device=gpu"], "--device='gpu'"), "device_meta": (2, ["--device=meta"], "--device='meta'"),
    "no_cuda": (2, ["--device=cuda"], "CUDA is not available"),
    "cuda_index": (2, ["--device=cuda:3"], "--device='cuda:3'"),
    "prompt_past_vocab": ("v128", ["--start=hello world"], "vocab_size is 128"),
    "empty_prompt_past_vocab": ("v128", ["--start="], "vocab_size is 128"),  # falls back to <|endoftext|> = 50256
}


def _cli_args(case, ckpts, tmp_path):
    ckpt, args, expect = CLI_ERRORS[case]
    args = [a.replace("NOWHERE", str(tmp_path / "nowhere")) for a in args]
    return [f"--out_dir={ckpts[ckpt]}", "--max_new_tokens=10", *args], expect


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_errors_are_one_line(case, ckpts, tmp_path, capsys, monkeypatch):
    """A user error ends main with SystemExit(one line), so Python prints that line to stderr and exits 1 (as the
    real process below shows). Nothing is generated or printed first, and it is never a traceback from deep inside."""
    if case in ("no_cuda", "cuda_index"):  # the same answer on a machine with or without GPUs
        monkeypatch.setattr(torch.cuda, "is_available", lambda: case == "cuda_index")
        monkeypatch.setattr(torch.cuda, "device_count", lambda: int(case == "cuda_index"))
    args, expect = _cli_args(case, ckpts, tmp_path)
    assert expect in exit_message(sample.main, args, "sample.py")
    assert capsys.readouterr() == ("", "")  # no prompt, no samples, no settings line before the error


def test_cli_error_exit_status_without_traceback(ckpts, tmp_path):
    """The same through a real process (forked from conftest's server): exit status 1, one line on stderr, no
    traceback, no stdout."""
    args, expect = _cli_args("prompt_past_vocab", ckpts, tmp_path)
    p = run_forked("sample.py", *args, timeout=300)
    assert expect in one_line_error(p, "sample.py") and p.stdout == "" and "Traceback" not in p.stderr


@pytest.mark.parametrize("mode", [["--temperature=0"], ["--temperature=1.0", "--top_k=0"],
                                  ["--temperature=0", "--speculative=True"],
                                  ["--temperature=1.0", "--speculative=True"]],
                         ids=["greedy", "sampled", "speculative_greedy", "speculative_sampled"])
def test_cli_never_emits_ids_past_the_tokenizer(mode, tmp_path, capsys, gpt2_enc, monkeypatch):
    """The head's padded rows (50257..50303) are untrained and have no text; here they win every argmax, yet the CLI
    only ever emits ids the tokenizer can decode. A model with a smaller vocabulary (128) samples among its own."""
    big = tiny(vocab_size=50304, n_mtp=2)
    with torch.no_grad():
        big.head.weight[gpt2_enc.n_vocab:] *= 1000
    # unrestricted, it would emit only those
    assert all(t >= gpt2_enc.n_vocab for t in greedy(big, gpt2_enc.encode("Once upon a time"), 5))
    emitted, real = [], sample.generate_tokens  # the CLI's generator, recording every token it yields
    monkeypatch.setattr(sample, "generate_tokens", lambda *a, **kw: (emitted.append(t) or t for t in real(*a, **kw)))
    for model, start in ((big, "Once upon a time"), (tiny(vocab_size=128, n_mtp=2), "a")):
        emitted.clear()
        path = save_ckpt(tmp_path / str(model.cfg.vocab_size), model, step=0)
        sample.main([f"--out_dir={path}", f"--start={start}", "--num_samples=1", "--max_new_tokens=12",
                     "--stop_at_eot=False", *mode])
        out, _ = capsys.readouterr()
        assert len(emitted) == 12 and max(emitted) < min(gpt2_enc.n_vocab, model.cfg.vocab_size)
        assert out == gpt2_enc.decode(gpt2_enc.encode(start) + emitted) + "\n---------------\n"
