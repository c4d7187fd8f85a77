"""grpo.py: the GRPO objective against hand computations (REINFORCE gradient, clip, k3, advantages, the prompt mask),
the reward checkers on adversarial strings, and the script end to end: exact resume, 2-process gloo = 1 process, the
GPU recipe on an offline GSM8K fixture, one-line errors."""
import json
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import grpo
import tasks
from conftest import save_ckpt, tiny_model
from data.loader import EOS, get_tokenizer, render_conversation


# ---- the objective, by hand ----------------------------------------------------------------------------------

def test_advantages_are_zero_when_a_group_agrees_and_normalised_otherwise():
    for std_normalize in (True, False):
        for r in ([1.0, 1.0, 1.0, 1.0], [0.0, 0.0], [0.3] * 8):
            a = grpo.group_advantages(torch.tensor(r), std_normalize)
            assert torch.equal(a, torch.zeros(len(r)))  # exactly 0, no NaN from the zero std
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])  # mean 0.5, population std 0.5
    want = torch.tensor([0.5, -0.5, -0.5, 0.5])
    torch.testing.assert_close(grpo.group_advantages(r, False), want)
    torch.testing.assert_close(grpo.group_advantages(r, True), want / (0.5 + grpo.ADV_EPS))
    r = torch.tensor([2.0, 0.0, 0.0, 0.0])  # mean 0.5, std sqrt(0.75)
    torch.testing.assert_close(grpo.group_advantages(r, True), (r - 0.5) / (0.75 ** 0.5 + grpo.ADV_EPS))


def test_k3_is_nonnegative_zero_at_the_reference_and_unbiased():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(5, 11, generator=g), -1)
    ref = torch.log_softmax(torch.randn(5, 11, generator=g) * 2, -1)
    kl = grpo.k3(logp, ref, max_value=None)
    assert (kl >= 0).all() and (kl > 0).any()
    assert torch.equal(grpo.k3(logp, logp), torch.zeros_like(logp))
    # unbiased: its expectation over tokens drawn from pi is the exact KL(pi || pi_ref)
    expected = (logp.exp() * kl).sum(-1)
    exact = (logp.exp() * (logp - ref)).sum(-1)
    torch.testing.assert_close(expected, exact)
    # at pi = pi_ref its gradient is 0 too (k3's minimum)
    x = logp.clone().requires_grad_()
    grpo.k3(x, logp).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    # capped at K3_MAX: a token pi has all but dropped (d = 5: k3 = e^5 - 6 = 142) gives 10 and no gradient; below the
    # cap the value and the gradient 1 - e^d are k3's own
    x = torch.tensor([-6.0, -2.0], requires_grad=True)
    kl = grpo.k3(x, torch.tensor([-1.0, -1.0]))
    kl.sum().backward()
    torch.testing.assert_close(kl.detach(), torch.tensor([grpo.K3_MAX, math.e - 2]))
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1 - math.e]))


def test_clip_stops_the_gradient_only_where_the_advantage_pushes_past_the_trust_region():
    """Per token: rho 1.5 (above 1 + eps), 1.0 (inside), 0.5 (below 1 - eps). A > 0 stops the gradient at 1.5, not at
    0.5 (lowering a good token's prob further is never clipped); A < 0 the reverse. Elsewhere d(loss)/d(logp) is
    -A * rho / n_tokens."""
    old = torch.zeros(1, 3)
    rho = torch.tensor([[1.5, 1.0, 0.5]])
    mask = torch.ones(1, 3)
    for a, stopped in ((1.0, 0), (-1.0, 2)):
        logp = torch.log(rho).requires_grad_()
        loss, st = grpo.grpo_loss(logp, old, None, torch.tensor([a]), mask, 0.2, 0.0, "token", 3)
        loss.backward()
        want = -a * rho / 3
        want[0, stopped] = 0.0
        torch.testing.assert_close(logp.grad, want)
        assert st["clipped"].item() == 1
        torch.testing.assert_close(loss, -(torch.minimum(rho * a, rho.clamp(0.8, 1.2) * a)).sum() / 3)


def test_dual_clip_bounds_a_bad_tokens_loss_as_its_ratio_grows():
    """A < 0, dual_clip 3: rho 1.5 and 2.9 keep PPO's gradient -A rho / n; at rho 5 the objective is 3A and the
    gradient stops (without dual clip it is -A * 5 / n, growing with rho). A > 0 is untouched."""
    old, mask = torch.zeros(1, 3), torch.ones(1, 3)
    rho = torch.tensor([[1.5, 2.9, 5.0]])
    for dual, want_last in ((3.0, 0.0), (0.0, 5.0 / 3)):
        logp = torch.log(rho).requires_grad_()
        loss, st = grpo.grpo_loss(logp, old, None, torch.tensor([-1.0]), mask, 0.2, 0.0, "token", 3, dual)
        loss.backward()
        torch.testing.assert_close(logp.grad, torch.tensor([[0.5, 2.9 / 3, want_last]]))
        torch.testing.assert_close(loss, torch.tensor((1.5 + 2.9 + (3.0 if dual else 5.0)) / 3))
        assert st["clipped"].item() == (1 if dual else 0)
    logp = torch.log(rho).requires_grad_()
    loss, _ = grpo.grpo_loss(logp, old, None, torch.tensor([1.0]), mask, 0.2, 0.0, "token", 3, 3.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0]]))  # all above 1 + eps with A > 0: clipped


def two_completions():
    """A tiny model (vocab 128, so that no restriction to the chat vocabulary applies), a 3-token prompt and two
    completions of 3 and 2 tokens; the second is padded with one token past its end."""
    model = tiny_model(1)
    prompt = [5, 17, 9]
    comps = [[40, 41, 42], [50, 51, 99]]
    lengths = torch.tensor([3, 2])
    ids = torch.tensor([prompt + c for c in comps])
    return model, prompt, comps, lengths, ids


@pytest.mark.parametrize("loss_norm", ["sequence", "token"])
def test_one_epoch_without_kl_is_reinforce_with_the_group_mean_as_baseline(loss_norm):
    """mu = 1, beta = 0, rewards (1, 0): A = (+1, -1) (mean 0.5, std 0.5), rho = 1 and the gradient of grpo_loss over
    every parameter is REINFORCE's, -(1/n) sum_i A_i sum_t grad log pi(o_it | q, o_i<t) with n = 2 completions, each
    term over its own 3 or 2 tokens ('sequence'), or n = 5 tokens ('token'); each log-prob from its own forward."""
    model, prompt, comps, lengths, ids = two_completions()
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0]), rtol=1e-3, atol=0)
    mask = grpo.completion_mask(lengths, 3)
    denom = 2 if loss_norm == "sequence" else 5
    logp, _ = grpo.completion_logprobs(model, ids, len(prompt), n_vocab=128)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv, mask, 0.2, 0.0, loss_norm, denom)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    hand = 0.0
    for i, comp in enumerate(comps):
        n = int(lengths[i])
        for t in range(n):
            seq = torch.tensor([prompt + comp[:t]])
            lp = torch.log_softmax(model(seq)[0][0, -1], -1)[comp[t]]
            weight = adv[i] / (n * 2) if loss_norm == "sequence" else adv[i] / 5
            hand = hand - weight * lp
    hand.backward()
    assert got.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    assert len(got) > 20 and all(not n.startswith("mtp.") for n in got)  # the main head's path only
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
    assert sum(g.abs().sum() for g in got.values()) > 0


def test_prompt_and_padding_carry_no_loss():
    """Lengths and mask by hand; log-prob t of a completion is the model's next-token log-prob after the prompt and the
    completion's first t tokens (nothing of the prompt is scored); tokens after a completion's end change nothing."""
    toks = torch.tensor([[7, EOS, EOS, EOS], [7, 8, 9, 10], [EOS, EOS, EOS, EOS], [3, 4, EOS, EOS]])
    lengths, ended = grpo.completion_lengths(toks)
    assert lengths.tolist() == [2, 4, 1, 3] and ended.tolist() == [True, False, True, True]
    assert grpo.completion_mask(lengths, 4).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]
    model, prompt, comps, lengths, ids = two_completions()
    logp, ent = grpo.completion_logprobs(model, ids, len(prompt), n_vocab=128, entropy=True)
    assert logp.shape == ent.shape == (2, 3)
    with torch.no_grad():
        for i, comp in enumerate(comps):
            for t in range(3):
                probs = torch.log_softmax(model(torch.tensor([prompt + comp[:t]]))[0][0, -1], -1)
                assert logp[i, t].item() == pytest.approx(probs[comp[t]].item(), abs=1e-5)
                assert ent[i, t].item() == pytest.approx(-(probs.exp() * probs).sum().item(), abs=1e-4)
    mask = grpo.completion_mask(lengths, 3)
    adv = torch.tensor([0.7, -0.7])

    def loss_and_grad(ids):
        model.zero_grad()
        lp, _ = grpo.completion_logprobs(model, ids, len(prompt), n_vocab=128)
        old, ref = torch.full_like(lp, -4.7), torch.full_like(lp, -4.9)  # fixed: rho ~ 1, inside the clip range
        loss, _ = grpo.grpo_loss(lp, old, ref, adv, mask, 0.2, 0.5, "token", 5)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    before = loss_and_grad(ids)
    other = ids.clone()
    other[1, -1] = 7  # the padding after the second completion's end
    after = loss_and_grad(other)
    assert before[0] == after[0] and all(torch.equal(a, b) for a, b in zip(before[1], after[1]))
    other[1, -2] = 7  # a token it did produce: now the loss changes
    assert loss_and_grad(other)[0] != before[0]


# ---- rewards ---------------------------------------------------------------------------------------------------

def P(task, answer):
    return {"messages": [], "task": task, "answer": answer}


@pytest.mark.parametrize("completion,right", [
    ("42", True), ("The answer is 42.", True), ("<think>6 x 7</think> 42", True), (" 42\n", True),
    ("41 or 42", True),                        # the LAST number counts...
    ("42 or maybe 41", False), ("It is 42, no, 43", False), ("<think>42</think> 41", False),
    ("<think>it is 42</think>", False),        # ...after the reasoning: an answer missing there is missing
    ("forty-two", False), ("Forty two", False), ("４２", False), ("٤٢", False), ("4 2", False), ("042", False),
    ("-42", False), ("42.5", False), ("", False), ("I don't know", False),
])
def test_correct_reward_on_adversarial_strings(completion, right):
    for task in ("compare", "min"):
        assert grpo.reward_correct(P(task, "42"), completion) == float(right), (task, completion)
    gsm = P("gsm8k", tasks.last_number("She pays 1,040 + 2 = 1,042 dollars.\nThe answer is 1,042."))
    assert gsm["answer"] == "1042"
    if completion != "042":  # GSM8K compares values: '01,042' is 1042 (test_gsm8k_reward_reads_decimals)
        assert grpo.reward_correct(gsm, completion.replace("42", "1,042")) == float(right), completion
    assert grpo.reward_correct(gsm, "so 1042") == 1.0


@pytest.mark.parametrize("completion,right", [
    ("$18.00", True), ("18.0", True), ("The answer is 18.", True), ("<think>9 x 2</think> $18", True),
    ("17.5", False), ("18.5", False), ("-18", False), ("eighteen", False), ("18 or 17", False), ("", False),
])
def test_gsm8k_reward_reads_decimals(completion, right):
    """GSM8K's reward is tasks.check_gsm8k's: the value of the last number, as people write money and measures."""
    assert grpo.reward_correct(P("gsm8k", "18"), completion) == float(right), completion


@pytest.mark.parametrize("completion,score", [
    ("Sorted: 7, 41, 63.", 1.0), ("Sorted: 7, 63, 41.", 1 / 3), ("Sorted: 41, 7, 63.", 1 / 3), ("7, 41, 9", 2 / 3),
    ("Sorted: 63, 7, 41.", 0.0), ("Sorted: 63, 41, 7.", 1 / 3), ("Sorted: 7, 41.", 0.0), ("Sorted: 7, 41, 63, 63.", 0.0), ("", 0.0),
    ("<think>7 < 41 < 63</think> Sorted: 7, 41, 99.", 2 / 3),
])
def test_partial_reward_grades_sort_by_place_and_is_exact_elsewhere(completion, score):
    """'partial' gives sort the fraction of its numbers in place (a reply of another length: 0); every other task's
    reward stays reward_correct's 0 or 1, and the exact checker still says 0 for anything short of right."""
    assert grpo.reward_partial(P("sort", "7, 41, 63"), completion) == pytest.approx(score)
    assert tasks.check("sort", completion.rpartition("</think>")[2], "7, 41, 63") == (score == 1.0)
    for task, c in (("compare", "The larger is 41."), ("min", "The smallest is 4 or 41."), ("gsm8k", "$41.00")):
        assert grpo.reward_partial(P(task, "41"), c) == grpo.reward_correct(P(task, "41"), c) == 1.0
        assert grpo.reward_partial(P(task, "41"), c.replace("41", "14")) == 0.0


def test_format_reward_and_unended_completions():
    fmt = lambda c: grpo.reward_format(P("compare", "42"), c)  # noqa: E731
    assert fmt("<think>6 times 7</think> 42") == 1.0 and fmt("  <think>a\nb</think>\nThe answer is 42.") == 1.0
    for bad in ("42", "<think>6 times 7</think>", "<think></think> 42", "6 x 7</think> 42", "<think>6 x 7 42",
                "<think>a</think><think>b</think> 42", "<think>a <think>b</think> 42", "x <think>a</think> 42",
                "<think>a</think> 42 </think>"):
        assert fmt(bad) == 0.0, bad
    fns = grpo.parse_rewards("correct,format:0.5")
    assert [(n, w) for n, _, w in fns] == [("correct", 1.0), ("format", 0.5)]
    assert grpo.score(P("compare", "42"), "<think>6 x 7</think> 42", True, fns) == (1.5, [1.0, 1.0])
    assert grpo.score(P("compare", "42"), "<think>6 x 7</think> 42", False, fns) == (0.0, [0.0, 0.0])  # never ended
    for spec, msg in (("correct,lenght", "unknown reward 'lenght'"), ("correct:x", "weight 'x' of 'correct'")):
        with pytest.raises(grpo.UserError, match=msg) as e:
            grpo.parse_rewards(spec)
        assert "\n" not in str(e.value)


# ---- the script end to end -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_thread_here():
    """conftest's one thread, for module fixtures too (they run before it): runs must repeat bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory, one_thread_here):
    """A tiny chat model: 40 AdamW steps on the training prompts of COMMON (the first 2 compare problems at grpo.py's
    seed), each answered once with either operand, so that it replies in a few tokens and EOS (a random model never
    ends a reply: every reward would be 0) and names one of the pool's numbers, the right one about a third of the
    time (too small to learn the comparison itself in seconds): groups with different rewards to learn from."""
    model = tiny_model(0, vocab_size=50304, max_seq_len=64)
    convs = [tasks.conversation(q, tasks.TASKS["compare"].reply.format(v))
             for q, _, ops in tasks.problems("compare", "train", 2, grpo.seed) for v in ops]
    rows = [render_conversation(c) for c in convs]
    x = torch.full((len(rows), max(len(i) for i, _ in rows)), EOS)
    y = torch.full_like(x, -1)
    for k, (ids, mask) in enumerate(rows):
        x[k, :len(ids)] = torch.tensor(ids)
        y[k, :len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        b = torch.randint(len(rows), (16,), generator=g)
        h, _ = model.trunk(x[b])
        keep = y[b] >= 0  # the head on the reply tokens only: cheap
        F.cross_entropy(model.head(model.norm(h[keep])), y[b][keep]).backward()
        opt.step()
        opt.zero_grad()
    return save_ckpt(tmp_path_factory.mktemp("sft"), model.eval(), step=40, config={"chat_data": "tasks"})


def test_rollout_is_the_cached_decoders_sampling(chat_ckpt):
    """G rows of a prompt through the latent cache: at temperature 0 every row is chat.complete's greedy reply (the
    full forward's argmax at every step), EOS-padded after its end; sampled rows are a function of the prompt's
    generator seed alone, the same whether the prompt decodes alone or batched with others of its length."""
    import chat
    from checkpoint import load_model
    model, _ = load_model(str(chat_ckpt))
    enc = get_tokenizer()
    messages = [{"role": "user", "content": "Which is larger, 41 or 17?"}]
    ids = grpo.render_prompt(messages, enc)
    greedy = grpo.rollout(model, [ids], 3, 6, temperature=0.0)
    (text,) = chat.complete(model, enc, [messages], max_new_tokens=6)
    lengths, ended = grpo.completion_lengths(greedy)
    assert (greedy == greedy[0]).all() and bool(ended[0]) and 1 < int(lengths[0]) <= 6
    assert enc.decode(greedy[0, :lengths[0] - 1].tolist()) == text and (greedy[0, lengths[0]:] == EOS).all()
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731  (a new generator per call)
    draw = lambda seed: grpo.rollout(model, [ids], 8, 6, 1.0, None, [gen(seed)])  # noqa: E731
    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a, b) and not torch.equal(a, c) and len({tuple(r) for r in a.tolist()}) > 1
    # batched: three prompts of one length, each row block equal to that prompt's rollout alone (trimmed to its width)
    others = [grpo.render_prompt([{"role": "user", "content": f"Which is larger, {x} or {y}?"}], enc)
              for x, y in ((5, 93), (60, 2))]
    assert all(len(o) == len(ids) for o in others)
    batch = grpo.rollout(model, [ids, *others], 8, 6, 1.0, None, [gen(1), gen(3), gen(4)])
    for block, (prompt, seed) in zip(batch.split(8), [(ids, 1), *zip(others, (3, 4))]):
        alone = grpo.rollout(model, [prompt], 8, 6, 1.0, None, [gen(seed)])
        assert torch.equal(block[:, :alone.size(1)], alone) and (block[:, alone.size(1):] == EOS).all()


@pytest.mark.parametrize("V,block", [(50257, 1024), (3000, 1000), (37, 8)])
def test_inverse_cdf_is_the_flat_inverse_cdf(V, block):
    """The two-level draw picks the token the one-level float64 cumsum picks, for every row and u (zeros included:
    top-k's masked ids are never drawn)."""
    torch.manual_seed(0)
    probs = torch.rand(64, V) ** 8
    probs[:, ::3] = 0
    u = torch.cat([torch.rand(60, 1), torch.tensor([[0.0], [1e-9], [0.5], [1 - 2 ** -24]])])  # torch.rand is < 1
    cdf = probs.double().cumsum(-1)
    flat = torch.searchsorted(cdf, u.double() * cdf[:, -1:], right=True).squeeze(1)
    got = grpo.inverse_cdf(probs, u, block)
    assert torch.equal(got, flat) and bool((probs.gather(1, got[:, None]) > 0).all())


def test_rollout_samples_the_models_distribution(chat_ckpt):
    """rollout's inverse-CDF draw is the model's distribution at the temperature: the first tokens of 4,000 rows
    against the prefill's softmax, within 4 standard errors for every token of probability > 0.2%, and no token drawn
    that has probability 0 (beyond the chat vocabulary)."""
    from checkpoint import load_model
    model, _ = load_model(str(chat_ckpt))
    enc = get_tokenizer()
    ids = grpo.render_prompt([{"role": "user", "content": "Which is larger, 41 or 17?"}], enc)
    ids += enc.encode_ordinary("The larger is")  # where the reply names a number
    n, temperature = 4000, 1.5  # flatter than the policy's: several likely tokens
    first = grpo.rollout(model, [ids], n, 1, temperature, None, [torch.Generator().manual_seed(0)])[:, 0]
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0][0, -1, :EOS + 1]
    p = torch.softmax(logits.double() / temperature, -1)
    freq = torch.bincount(first, minlength=logits.size(-1)).double() / n
    big = p > 0.002  # the likely numbers (a long tail holds the rest of the mass at this temperature)
    assert int(big.sum()) >= 5 and int(first.max()) <= EOS, p.topk(10).values
    assert ((freq[big] - p[big]).abs() <= 4 * (p[big] * (1 - p[big]) / n).sqrt()).all(), (freq[big], p[big])


COMMON = ["--prompts=compare", "--task_problems=2", "--group_size=4", "--prompts_per_step=2", "--max_new_tokens=8",
          "--ppo_epochs=2", "--beta=0.1", "--learning_rate=3e-3", "--eval_n=0", "--device=cpu", "--dtype=float32"]


def run_grpo(*args):
    grpo.main([*COMMON, *args])


def read_log(out, name="log.jsonl"):
    return [json.loads(line) for line in open(out / name)]


def same(rec):  # every logged figure but the clock's
    return {k: v for k, v in rec.items() if k not in ("time", "tok_per_s", "rollout_s", "step_s")}


@pytest.fixture(scope="module")
def straight(chat_ckpt, tmp_path_factory, one_thread_here):
    out = tmp_path_factory.mktemp("straight")
    run_grpo(f"--init_from={chat_ckpt}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2")
    return out


def test_runs_learns_and_resumes_exactly(chat_ckpt, straight, tmp_path, capsys):
    log = read_log(straight)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(0 < r["ended"] and 1 <= r["len"] <= 8 and r["entropy"] > 0 for r in log)
    assert any(0 < r["reward"] < 1 for r in log) and any(r["clip_frac"] > 0 for r in log)
    assert all(r["reward_by_task"] == {"compare": pytest.approx(r["reward"])} for r in log)  # the one prompt source
    # the KL of the sampling policy: 0 (pi_ref itself) up to the first step with a gradient, then > 0
    moved = next(i for i, r in enumerate(log) if r["grad_norm"] > 0)
    assert all(r["kl"] == 0 for r in log[:moved + 1]) and log[moved + 1]["kl"] > 0
    ckpt = torch.load(straight / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["reference"]["path"] == str(chat_ckpt) and ckpt["config"]["chat_data"] == "tasks"
    sft = torch.load(chat_ckpt / "ckpt.pt", weights_only=True)["model"]
    moved = {k for k in sft if not torch.equal(sft[k], ckpt["model"][k])}
    assert "head.weight" in moved and "layers.0.attn.wq.weight" in moved
    assert not any(k.startswith("mtp.") or k.endswith(("gate.weight", "gate.bias")) for k in moved)  # frozen
    # a normal model checkpoint: chat.py and sample.py load it as they load any
    from checkpoint import load_model
    load_model(str(straight))
    # exact resume: 2 steps, then 2 more from the checkpoint, equal the 4 straight steps bit for bit
    split = tmp_path / "split"
    run_grpo(f"--init_from={chat_ckpt}", f"--out_dir={split}", "--max_iters=2", "--eval_interval=2")
    run_grpo("--init_from=resume", f"--out_dir={split}", "--max_iters=4", "--eval_interval=2")
    assert "resumed" in capsys.readouterr().out
    assert [same(r) for r in read_log(split)] == [same(r) for r in log]
    resumed = torch.load(split / "ckpt.pt", weights_only=True)
    for k in ckpt["model"]:
        assert torch.equal(ckpt["model"][k], resumed["model"][k]), k
    assert torch.equal(ckpt["rng"]["sampling"], resumed["rng"]["sampling"])
    # the reference must be the one the run started from
    changed = tiny_model(3, vocab_size=50304, max_seq_len=64)
    other = save_ckpt(tmp_path / "moved_ref", changed)
    state = torch.load(split / "ckpt.pt", weights_only=True)
    state["reference"]["path"] = str(other)
    torch.save(state, split / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        run_grpo("--init_from=resume", f"--out_dir={split}", "--max_iters=6")
    assert str(e.value).startswith("grpo.py: error: the reference model") and "\n" not in str(e.value)


def test_two_gloo_processes_equal_one(chat_ckpt, straight, tmp_path):
    """torchrun, 2 ranks x 1 prompt per step: the same prompts and completions as one process taking both (the
    sampling RNG is shared, one seed per prompt), hence the same rewards, and the same updates."""
    out = tmp_path / "ddp"
    from conftest import TORCHRUN, run
    p = run(*TORCHRUN, "grpo.py", *COMMON, f"--init_from={chat_ckpt}", f"--out_dir={out}", "--max_iters=4",
            "--eval_interval=2", timeout=300)  # torchrun's launcher forked (conftest.run), its 2 workers fresh
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on 2 process(es)" in p.stdout and p.stdout.count("step 4/4") == 1  # rank 0 logs
    single, ddp = read_log(straight), read_log(out)
    assert [r["step"] for r in ddp] == [1, 2, 3, 4]
    for s, d in zip(single, ddp):
        for k in ("reward", "reward_correct", "len", "ended", "same_reward_groups"):
            assert d[k] == s[k], (k, s, d)
        for k in ("kl", "entropy", "clip_frac", "grad_norm"):
            assert d[k] == pytest.approx(s[k], rel=1e-3, abs=1e-6), (k, s, d)
    a = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(straight / "ckpt.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_gpu_recipe_on_an_offline_gsm8k_fixture(chat_ckpt, tmp_path, monkeypatch):
    """config/grpo_fineweb.py, shrunk to the CPU, with GSM8K rows in the datasets' own format (a stand-in `datasets`
    module: no network): prompts from the train split, the final-number reward, chat.py's GSM8K eval on the test
    split; and config/grpo_tiny.py's settings are valid too."""
    from data import loader
    rows = {"train": [{"question": f"What is {a} + {b}?", "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
                      for a, b in ((1, 2), (3, 4), (2, 2))],
            "test": [{"question": "What is 2 + 3?", "answer": "2+3=<<2+3=5>>5\n#### 5"}]}
    asked = []

    def load_dataset(path, name=None, split=None):
        asked.append((path, name, split))
        return rows[split]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(loader, "hub_offline_reason", lambda: None)
    monkeypatch.setattr(grpo, "hub_offline_reason", lambda: None)
    out = tmp_path / "fineweb"
    grpo.main(["config/grpo_fineweb.py", f"--init_from={chat_ckpt}", f"--out_dir={out}", "--device=cpu",
               "--dtype=float32", "--group_size=2", "--prompts_per_step=2", "--max_new_tokens=4", "--max_iters=1",
               "--eval_n=1", "--eval_gsm8k=1"])
    assert ("openai/gsm8k", "main", "train") in asked and ("openai/gsm8k", "main", "test") in asked
    (rec,) = read_log(out)
    assert "reward_correct" in rec and rec["len"] <= 4
    evals = read_log(out, "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 1] and all("task_gsm8k" in e and "task_compare" in e for e in evals)
    cfg = torch.load(out / "ckpt.pt", weights_only=True)["config"]
    assert cfg["prompts"] == "gsm8k" and cfg["rewards"].startswith("correct")
    monkeypatch.setattr(grpo, "hub_offline_reason", lambda: "HF_HUB_OFFLINE=1 is set")
    with pytest.raises(SystemExit) as e:
        grpo.main(["config/grpo_fineweb.py", f"--init_from={chat_ckpt}", f"--out_dir={tmp_path / 'offline'}"])
    assert str(e.value) == ("grpo.py: error: could not reach the Hugging Face Hub for GSM8K (HF_HUB_OFFLINE=1 is set); "
                            "offline, use tasks.py's prompts (e.g. prompts='compare')")
    grpo.main(["config/grpo_tiny.py", f"--init_from={chat_ckpt}", f"--out_dir={tmp_path / 'tiny'}", "--max_iters=1",
               "--eval_n=0", "--prompts_per_step=2"])
    assert torch.load(tmp_path / "tiny" / "ckpt.pt", weights_only=True)["config"]["prompts"]


@pytest.mark.parametrize("args,message", [
    (["--rewards=correct,brevity"], "unknown reward 'brevity'"),
    (["--group_size=1"], "group_size must be >= 2"),
    (["--prompts=compare,multiply"], "unknown prompt source 'multiply'"),
    (["--prompts=compare,sort:0"], "prompt weight '0' of 'sort' must be an integer >= 1"),
    (["--prompts=compare,sort:1.5"], "prompt weight '1.5' of 'sort' must be an integer >= 1"),
    (["--loss_norm=sample"], "loss_norm must be 'token' or 'sequence'"),
    (["--temperature=0"], "temperature must be > 0"),
    (["--init_from=NOWHERE"], "init_from must be a chat-tuned out_dir holding a ckpt.pt"),
    (["--init_from=resume"], "init_from='resume' but there is no checkpoint"),
    (["--init_from=SMALL_VOCAB"], "vocab_size 128 has no rows for the chat tokens"),
])
def test_clear_errors(args, message, tmp_path):
    small = save_ckpt(tmp_path / "small", tiny_model(0))
    args = [a.replace("NOWHERE", str(tmp_path / "none")).replace("SMALL_VOCAB", str(small)) for a in args]
    with pytest.raises(SystemExit) as e:
        grpo.main([*COMMON, f"--out_dir={tmp_path / 'out'}", *args])
    text = str(e.value)
    assert text.startswith("grpo.py: error: ") and message.replace("NOWHERE", str(tmp_path / "none")) in text
    assert "\n" not in text
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_lora_grpo_trains_the_adapters_only_and_resumes_exactly(chat_ckpt, tmp_path):
    """lora_rank > 0: only adapters move (the checkpoint holds them, with the base's path and hash), a resume
    continues bit for bit, and readers get the merged policy."""
    from checkpoint import load_model
    lora = ["--lora_rank=4", "--learning_rate=3e-2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_grpo(f"--init_from={chat_ckpt}", f"--out_dir={straight}", "--max_iters=4", "--eval_interval=2", *lora)
    run_grpo(f"--init_from={chat_ckpt}", f"--out_dir={split}", "--max_iters=2", "--eval_interval=2", *lora)
    run_grpo("--init_from=resume", f"--out_dir={split}", "--max_iters=4", "--eval_interval=2", *lora)
    assert [same(r) for r in read_log(split)] == [same(r) for r in read_log(straight)]
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (straight, split))
    assert a["lora"]["base"] == str(chat_ckpt) and all("lora_" in k for k in a["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    moved = [k for k, v in a["model"].items() if k.endswith("lora_B") and v.abs().sum() > 0]
    assert moved and not any(k.startswith("mtp.") for k in moved)  # MTP's adapters stay frozen (at 0)
    merged, _ = load_model(str(straight))
    sft, _ = load_model(str(chat_ckpt))
    assert not torch.equal(merged.layers[0].attn.wq.weight, sft.layers[0].attn.wq.weight)
    assert torch.equal(merged.head.weight, sft.head.weight) and torch.equal(merged.embed.weight, sft.embed.weight)
    with pytest.raises(SystemExit) as e:
        run_grpo("--init_from=resume", f"--out_dir={split}", "--max_iters=6")
    assert "is a LoRA run: resume it with lora_rank=4" in str(e.value)


def settings(**overrides):
    """grpo.py's settings (its defaults), as main() passes them to check_settings, with some overridden."""
    return types.SimpleNamespace(**{**grpo._SETTINGS, "device": "cpu", "dtype": "float32", **overrides})


def test_lora_experts_on_cuda_need_a_rank_aligned_for_grouped_mm():
    """train.py's guard, checked before anything is loaded (no GPU needed: the device is a setting): CUDA's grouped_mm
    needs the experts' adapter rank to be a multiple of 8."""
    with pytest.raises(grpo.UserError, match="lora_experts on CUDA needs lora_rank a multiple of 8") as e:
        grpo.check_settings(settings(device="cuda", lora_rank=4, lora_experts=True))
    assert str(e.value) == ("lora_experts on CUDA needs lora_rank a multiple of 8 (grouped_mm's alignment), got 4")
    grpo.check_settings(settings(device="cpu", lora_rank=4, lora_experts=True))  # the CPU has no such constraint
    for device in ("cuda", "cuda:0"):  # aligned, or no experts: only the device itself can still be refused
        for s in (settings(device=device, lora_rank=8, lora_experts=True), settings(device=device, lora_rank=4)):
            if torch.cuda.is_available():
                grpo.check_settings(s)
            else:
                with pytest.raises(grpo.UserError, match="CUDA is not available here"):
                    grpo.check_settings(s)


def test_one_line_errors_as_a_user_meets_them(chat_ckpt, straight, tmp_path):
    """Run as a user runs them (a process, its stderr): a CUDA device on a CPU-only machine, no training problems, and
    train.py asked to resume a grpo.py run each end in one line, without a traceback and without writing anything."""
    from conftest import one_line_error, run_forked  # a process, forked from conftest's server (no start-up)
    common = [f"--init_from={chat_ckpt}", f"--out_dir={tmp_path / 'out'}", "--max_iters=1"]
    if not torch.cuda.is_available():
        err = one_line_error(run_forked("grpo.py", *common, "--device=cuda", timeout=300), "grpo.py")
        assert err == "grpo.py: error: CUDA is not available here: use --device=cpu"
    err = one_line_error(run_forked("grpo.py", *common, "--device=cpu", "--task_problems=0", timeout=300), "grpo.py")
    assert "task_problems must be >= 1" in err
    assert not (tmp_path / "out").exists()
    out = tmp_path / "grpo_run"  # a copy: the fixture's out_dir stays as it is
    out.mkdir()
    (out / "ckpt.pt").write_bytes((straight / "ckpt.pt").read_bytes())
    err = one_line_error(run_forked("train.py", "--init_from=resume", f"--out_dir={out}", "--chat_data=tasks",
                                    "--chat_tasks=8", "--batch_size=2", "--total_batch_size=128", "--device=cpu",
                                    "--dtype=float32", "--compile=False", timeout=300), "train.py")
    assert err == (f"train.py: error: {out / 'ckpt.pt'} is a grpo.py checkpoint: resume it with python grpo.py "
                   f"--init_from=resume --out_dir={out}")
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt"]


def test_token_logprob_matches_log_softmax_and_its_gradient():
    """TokenLogprob's value, entropy and gradient against the plain log_softmax + gather, and torch's gradcheck
    (float64)."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 5, 37, dtype=torch.float64)).requires_grad_()
    target = torch.randint(37, (2, 5))
    got, ent = grpo.TokenLogprob.apply(logits, target, True)
    logp_all = torch.log_softmax(logits, -1)
    want = logp_all.gather(-1, target[..., None]).squeeze(-1)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ent, -(logp_all.exp() * logp_all).sum(-1))
    g = torch.randn(2, 5, dtype=torch.float64)
    got_grad, = torch.autograd.grad(got, logits, g)
    want_grad, = torch.autograd.grad(want, logits, g)
    torch.testing.assert_close(got_grad, want_grad)
    assert torch.autograd.gradcheck(lambda z: grpo.TokenLogprob.apply(z, target)[0], (logits,))


def test_prompt_weights_repeat_a_source_in_the_pool(gpt2_enc):
    """'compare,sort:3': sort's training problems enter the pool three times, so a uniform draw from the pool picks
    sort three times as often as compare (as many problems each); 'sort:1' is 'sort'."""
    enc = gpt2_enc
    assert grpo.parse_prompts("compare, sort:3") == [("compare", 1), ("sort", 3)]
    pool, dropped = grpo.load_prompts("compare,sort:3", 20, 0, enc, 100)
    assert dropped == 0 and [p["task"] for p in pool] == ["compare"] * 20 + ["sort"] * 60
    sorts = [p["answer"] for p in pool if p["task"] == "sort"]
    assert sorts[:20] == sorts[20:40] == sorts[40:] and len(set(sorts)) > 15  # the same 20 problems, three times
    plain, _ = grpo.load_prompts("compare,sort:1", 20, 0, enc, 100)
    assert [p["ids"] for p in plain] == [p["ids"] for p in pool[:40]]
