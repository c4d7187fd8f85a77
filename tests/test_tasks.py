"""tasks.py (generators, checkers, splits, SFT conversations, evaluate) and the bundled data/chat_sample.jsonl."""
import itertools
import json
import random
import re
from collections import Counter

import pytest

import tasks
from data.loader import ASSISTANT, BOS, EOS, USER, DataError, read_conversations, render_conversation, render_prompt
from conftest import ok, run
from tasks import SPLITS, TASKS, check, conversation, evaluate, problems, sft_conversations, split_of

MAX_TOKENS = 100  # every rendered conversation must be shorter: the offline recipe's context is 128 tokens
SELECT = {"compare": max, "min": min}  # selection tasks by magnitude: the answer is one operand


@pytest.fixture(scope="module")
def splits():
    """2000 train and 300 held-out problems of every task."""
    return {t: (problems(t, "train", 2000), problems(t, "heldout", 300)) for t in TASKS}


def test_registry(gpt2_enc):
    assert set(TASKS) == {"compare", "min", "sort"}
    # every operand is ONE GPT-2 token with its leading space: what the replies copy
    assert list(tasks.NUMBERS) == list(range(100)) and all(len(gpt2_enc.encode_ordinary(f" {x}")) == 1
                                                           for x in tasks.NUMBERS)


def test_answers_are_right(splits):
    """Every problem's answer is recomputed from its question text by a slow obvious rule; its checker accepts
    the task's own reply; operands are in range and distinct where they must be."""
    for task, (train, heldout) in splits.items():
        for q, a, ops in train + heldout:
            assert tasks.operands(task, q) == ops, (task, q)
            assert check(task, TASKS[task].reply.format(a), a) and check(task, a, a), (task, q, a)
            if task in SELECT:
                assert len(set(ops)) == len(ops) and a == str(SELECT[task](ops)) and all(0 <= x < 100 for x in ops)
            else:
                assert len(set(ops)) == 3 and a == ", ".join(str(x) for x in sorted(ops)) and max(ops) < 100


ACCEPT = [("compare", "The larger is 42.", "42"), ("compare", "42", "42"), ("min", " 42\n", "42"),
          ("min", "The smallest is 7.", "7"),
          ("sort", "Sorted: 2, 5, 9.", "2, 5, 9"), ("sort", "2 5 9", "2, 5, 9")]
REJECT = [(t, c, "42") for t in ("compare", "min") for c in [
    "", "   ", "\n", "I don't know.", "forty-two", "４２", "٤٢", "42 or maybe 41", "It is 42, no wait, 43", "-42",
    "042", "4 2", "The larger is", None]] + [
    ("sort", c, "2, 5, 9") for c in ["", "5, 2, 9", "2, 5", "2, 5, 9, 11", "２, ５, ９", "Sort 5, 2, 9: 2, 5, 9", None]]


@pytest.mark.parametrize("task, completion, answer", ACCEPT + REJECT)
def test_checkers(task, completion, answer):
    """Harmless text around the answer is accepted; anything else is not."""
    assert bool(check(task, completion, answer)) == ((task, completion, answer) in ACCEPT)


@pytest.mark.parametrize("completion, answer, right", [
    ("$18.00", "18", True), ("She pays 18.0 dollars.", "18", True), ("1,018", "1018", True), ("18", "18", True),
    ("17.5", "18", False), ("$18.01", "18", False), ("The answer is 180", "18", False), ("", "18", False),
    (None, "18", False), ("18", None, False)])
def test_gsm8k_checker_reads_values(completion, answer, right):
    """GSM8K's checker compares values ('$18.00' is 18); the tasks' checkers stay exact ('18.0' is not 18)."""
    assert tasks.check_gsm8k(completion, answer) == right
    assert not tasks.check_number("18.0", "18")


def test_unknown_task_or_split():
    for call, match in [(lambda: problems("mul", "train", 3), "unknown task"),
                        (lambda: problems("compare", "test", 3), "unknown split"),
                        (lambda: check("mul", "1", "1"), "unknown task")]:
        with pytest.raises(DataError, match=match):
            call()


def test_splits_are_disjoint_in_any_operand_order(splits):
    """Held-out is decided on the canonical key (sorted operands): no held-out problem is trained on in ANY
    operand order, whatever the seed or the number of problems."""
    for task, (train, heldout) in splits.items():
        key = lambda ops: tuple(sorted(map(str, ops)))  # noqa: E731
        tq, hq = [q for q, _, _ in train], [q for q, _, _ in heldout]
        assert len(set(tq)) == len(tq) == 2000 and len(set(hq)) == len(hq) == 300, task
        assert not {key(o) for *_, o in train} & {key(o) for *_, o in heldout}, task
        assert all(split_of(task, o) == "train" for *_, o in train)
        assert all(split_of(task, o) == "heldout" for *_, o in heldout)
        for perm in itertools.permutations(heldout[0][2]):  # every order of a held-out problem is held out
            assert split_of(task, perm) == "heldout"
        other_train = problems(task, "train", 500, seed=7)
        assert not {key(o) for *_, o in other_train} & {key(o) for *_, o in heldout}
    # about HELDOUT_PERCENT of all keys are held out
    keys = {tuple(sorted(random.Random(i).sample(range(100), 2))) for i in range(4000)}
    assert 0.07 < sum(split_of("compare", k) == "heldout" for k in keys) / len(keys) < 0.13


@pytest.mark.parametrize("task", list(TASKS))
def test_answer_mix_is_the_same_at_every_n(task):
    """The answer's position cycles through the positions: at every n the mix is within one problem of uniform,
    so the always-first rule scores 1/positions on any prefix (compare 0.5, min 0.25, sort 1/6)."""
    t = TASKS[task]
    for split in SPLITS:
        probs = problems(task, split, 600)
        every = {position_of(task, ops) for _, _, ops in probs}
        assert len(every) == t.positions
        for n in (1, 7, 50, 100, 300, 600):
            counts = Counter(position_of(task, ops) for _, _, ops in probs[:n])
            assert max(counts.values()) - min(counts.get(p, 0) for p in every) <= 1, (task, split, n)


def position_of(task, ops):
    """Where the answer stands in the question (slow reference): the index of the larger / smallest operand, the
    permutation of sorted order."""
    if task in SELECT:
        return ops.index(SELECT[task](ops))
    return tuple(sorted(ops).index(x) for x in ops)


def test_replies_copy_the_questions_tokens(gpt2_enc):
    """The reply's operand tokens stand in the question's ids: the answer is copied, token for token."""
    for task in TASKS:
        for q, a, ops in problems(task, "train", 200) + problems(task, "heldout", 50):
            q_ids = gpt2_enc.encode_ordinary(q)
            r_ids = gpt2_enc.encode_ordinary(TASKS[task].reply.format(a))
            answer_tokens = [gpt2_enc.encode_ordinary(f" {x}")[0] for x in a.split(", ")]
            assert all(tok in r_ids and tok in q_ids for tok in answer_tokens), (task, q, a)
            assert all(gpt2_enc.encode_ordinary(f" {x}")[0] in q_ids for x in ops)


def test_prior_rules_and_guess():
    """The rules score what they should on a prefix with the documented mix; guess names an operand."""
    for task, expected in [("compare", 0.5), ("min", 0.25)]:
        probs = problems(task, "heldout", 100)
        rules = tasks.prior_rules(task, [a for _, a, _ in problems(task, "train", 100)])
        assert sum(rules["first"](o) == a for _, a, o in probs) / 100 == expected
    probs = problems("sort", "heldout", 60)
    assert sum(tasks.prior_rules("sort", [])["as given"](o) == a for _, a, o in probs) == 10  # 1 of 6 orders
    rng = random.Random(0)
    guesses = [tasks.guess("compare", (41, 17), rng) for _ in range(200)]
    assert set(guesses) == {"41", "17"} and 60 < guesses.count("41") < 140
    convs = sft_conversations(50, "train", 0, guess_tasks=["compare"])
    right = [c for c in convs if "larger" in c[0]["content"]]
    assert len(right) == 50 and 10 < sum(check("compare", c[1]["content"], str(max(tasks.operands("compare",
                                                                              c[0]["content"])))) for c in right) < 40


def test_copy_drill(gpt2_enc):
    """Each number drilled alike, the reply copies the question's token, training split only, no task's question."""
    drills = tasks.copy_drill(250)
    assert sorted(Counter(c[0]["content"] for c in drills).values()) == [2] * 50 + [3] * 50
    for c in drills:
        x = c[0]["content"].removeprefix("Repeat: ")
        assert c[1]["content"] == f"Repeated: {x}." and gpt2_enc.encode_ordinary(f" {x}")[0] in gpt2_enc.encode_ordinary(
            c[0]["content"]) and all(tasks.operands(t, c[0]["content"]) is None for t in TASKS)
    with_drills = sft_conversations(20, "train", 0, drills=30)
    assert len(with_drills) == 3 * 20 + 30 and sum(c[0]["content"].startswith("Repeat:") for c in with_drills) == 30
    assert len(sft_conversations(20, "heldout", 0, drills=30)) == 3 * 20


def test_problems_are_deterministic():
    for task in TASKS:  # and the first k of n are the problems for n=k
        a = problems(task, "train", 100, seed=3)
        assert a == problems(task, "train", 100, seed=3) and a[:40] == problems(task, "train", 40, seed=3)
        assert a != problems(task, "train", 100, seed=4)
    assert sft_conversations(20, "train", seed=1) == sft_conversations(20, "train", seed=1)
    assert sft_conversations(20, "train", seed=1) != sft_conversations(20, "train", seed=2)


def test_sft_conversations_render_short(gpt2_enc):
    convs = sft_conversations(300, "train") + sft_conversations(20, "heldout")
    assert len(convs) == 3 * 320
    assert {c[0]["content"].split(":")[0].split(",")[0] for c in convs} == {
        "Which is larger", "Which is smallest", "Sort from smallest to largest"}
    for c in convs:
        assert [m["role"] for m in c] == ["user", "assistant"]
        ids, mask = render_conversation(c, gpt2_enc)
        answer = gpt2_enc.encode_ordinary(c[1]["content"])
        assert ids[0] == BOS and ids[-1] == EOS and ids[-len(answer) - 2] == ASSISTANT and USER in ids
        assert sum(mask) == len(answer) + 1 and len(ids) < 30 < MAX_TOKENS  # the reply and its EOS are trained
    assert conversation("Hi", "Hello") == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_evaluate():
    answers = {q: a for t in TASKS for q, a, _ in problems(t, "heldout", 10)}

    def oracle(prompts):
        """Answers by looking the question up; one wrong answer per task."""
        out = []
        for i, p in enumerate(prompts):
            assert [m["role"] for m in p] == ["user"] and render_prompt(p)[-1] == ASSISTANT
            out.append("I am not sure." if i == 0 else f"The answer is {answers[p[0]['content']]}")
        return out

    def sampler(prompts):  # 4 samples per prompt: right, right, right, wrong
        return [[f"= {answers[p[0]['content']]}"] * 3 + ["no idea"] for p in prompts]

    res = evaluate(oracle, 10, sample_fn=sampler)
    assert {t: (r["correct"], r["n"], r["accuracy"], r["pass1"]) for t, r in res.items()} == {
        t: (9, 10, 0.9, 0.75) for t in TASKS}
    assert res["compare"]["prior"] == 0.5 and res["compare"]["prior_rule"] in ("first", "last")
    assert res["sort"]["prior_rule"] == "as given"
    empty = evaluate(lambda ps: [""] * len(ps), 5, tasks=["min"])["min"]
    assert (empty["correct"], empty["accuracy"], empty["pass1"]) == (0, 0.0, None)
    lines = tasks.format_results(res).splitlines()
    assert len(lines) == 3 and all("greedy" in ln and "sampled pass@1 0.750" in ln and "prior rule" in ln
                                   for ln in lines)
    with pytest.raises(ValueError, match="completions"):
        evaluate(lambda ps: ps[:-1], 5)


# ---- the bundled chat sample -----------------------------------------------------------------------------------

def test_chat_sample(gpt2_enc):
    path = tasks.CHAT_SAMPLE
    assert path.stat().st_size < 100_000
    lines = path.read_text(encoding="utf-8").splitlines()
    convs = read_conversations(path)
    assert 100 <= len(convs) == len(lines) <= 200
    for line, conv in zip(lines, convs):
        assert set(json.loads(line)) == {"messages"}
        roles = [m["role"] for m in conv]
        turns = roles[1:] if roles[0] == "system" else roles
        assert turns == ["user", "assistant"] * (len(turns) // 2) and turns, roles
        assert all(set(m) == {"role", "content"} and m["content"].strip() == m["content"] != "" for m in conv)
        ids, mask = render_conversation(conv, gpt2_enc)
        assert len(ids) < MAX_TOKENS and sum(mask) > 0
        for m in conv:  # a task question in the sample must not leak a held-out problem into SFT
            for task in TASKS:
                ops = tasks.operands(task, m["content"]) if m["role"] == "user" else None
                assert ops is None or split_of(task, ops) == "train", m["content"]
    assert sum(c[0]["role"] == "system" for c in convs) >= 5 and sum(len(c) > 3 for c in convs) >= 5  # multi-turn
    assert len({json.dumps(c) for c in convs}) == len(convs)  # no duplicate conversations


def test_chat_sample_is_regenerated_exactly(tmp_path, monkeypatch):
    """data/make_chat_sample.py rebuilds the bundled file byte for byte."""
    from data import make_chat_sample
    out = tmp_path / "chat.jsonl"
    monkeypatch.setattr(make_chat_sample, "OUT", out)
    make_chat_sample.main()
    assert out.read_bytes() == tasks.CHAT_SAMPLE.read_bytes()


def test_tasks_script_runs():
    out = ok(run("tasks.py", timeout=120)).stdout
    assert all(f"{t}:" in out for t in TASKS)
