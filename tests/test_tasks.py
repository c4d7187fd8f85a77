"""tasks.py (generators, checkers, splits, SFT conversations, evaluate) and the bundled data/chat_sample.jsonl."""
import json
import random
import re
import subprocess
import sys

import pytest

import tasks
from data.loader import ASSISTANT, BOS, EOS, USER, DataError, read_conversations, render_conversation, render_prompt
from tasks import TASKS, check, conversation, evaluate, problems, sft_conversations, split_of

MAX_TOKENS = 100  # every rendered conversation must be shorter: the offline recipe's context is 128 tokens


@pytest.fixture(scope="module")
def splits():
    """2000 train and 200 held-out problems of every task (fewer where the task has fewer: reverse)."""
    return {t: (problems(t, "train", 2000), problems(t, "heldout", 200)) for t in TASKS}


def test_registry():
    assert set(TASKS) == {"add", "sub", "reverse", "count", "sort", "compare"}
    assert all(callable(t.generate) and callable(t.check) for t in TASKS.values())
    assert all(re.fullmatch(r"[a-z]{3,7}", w) for w in tasks.WORDS) and tasks.WORDS == sorted(set(tasks.WORDS))
    assert len(tasks.WORDS) >= 200


def test_answers_are_right(splits):
    """Every generated problem's answer is recomputed from its question, and its checker accepts it."""
    for task, (train, heldout) in splits.items():
        for q, a in train + heldout:
            assert check(task, a, a), (task, q, a)
            if task in ("add", "sub"):
                x, op, y = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", q).groups()
                assert int(a) == (int(x) + int(y) if op == "+" else int(x) - int(y)) >= 0
                assert len(x) <= 3 and len(y) <= 3
            elif task == "reverse":
                assert a == re.fullmatch(r"Spell '([a-z]{3,7})' backwards\.", q).group(1)[::-1]
            elif task == "count":
                letter, word = re.fullmatch(r"How many times does the letter '([a-z])' appear in '([a-z]+)'\?",
                                            q).groups()
                assert a == str(word.count(letter))
            elif task == "sort":
                nums = [int(x) for x in q.split(": ")[1].split(", ")]
                assert 3 <= len(nums) <= 5 and a == ", ".join(map(str, sorted(nums)))
            else:
                x, y = map(int, re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", q).groups())
                assert x != y and a == str(max(x, y))


def test_answer_variety(splits):
    """The generators cover their ranges: 1- to 3-digit operands and sums past 1000, zero counts, 3 and 5 numbers."""
    adds = [a for q, a in splits["add"][0]]
    assert min(map(int, adds)) < 10 and max(map(int, adds)) >= 1000
    counts = {a for q, a in splits["count"][0]}
    assert {"0", "1", "2"} <= counts
    assert {len(a.split(", ")) for q, a in splits["sort"][0]} == {3, 4, 5}


def test_checkers_accept_harmless_text():
    assert check("add", "42", "42") and check("add", "The answer is 42.", "42") and check("add", " 42\n", "42")
    assert check("add", "17 + 25 = 42", "42") and check("add", "1,042", "1042")
    assert check("sub", "83 - 27 = 56", "56") and check("compare", "31 is larger.", "31")
    assert check("count", "There are 3 r's in 'strawberry': 3", "3")
    assert check("reverse", "tac", "tac") and check("reverse", "The word backwards is 'tac'.", "tac")
    assert check("reverse", "Tac", "tac")
    assert check("sort", "2, 5, 9", "2, 5, 9") and check("sort", "Sorted: 2 5 9.", "2, 5, 9")


@pytest.mark.parametrize("completion", ["", "   ", "\n", "I don't know.", "forty-two", "Forty two", "４２", "٤٢",
                                        "42 or maybe 41", "It is 42, no wait, 43", "-42", "42.5", "042", "4 2",
                                        "The answer is", None])
def test_numeric_checker_rejects(completion):
    for task in ("add", "sub", "count", "compare"):
        assert not check(task, completion, "42"), (task, completion)


@pytest.mark.parametrize("completion", ["", "cat", "tac is the answer", "t a c", "tàc", "tacs", "ta", "123",
                                        "tac tac cat", None])
def test_reverse_checker_rejects(completion):
    assert not check("reverse", completion, "tac")


@pytest.mark.parametrize("completion", ["", "5, 2, 9", "2, 5", "2, 5, 9, 11", "2, 9, 5", "２, ５, ９",
                                        "two, five, nine", "Sort 5, 2, 9: 2, 5, 9", "25, 9", None])
def test_sort_checker_rejects(completion):
    assert not check("sort", completion, "2, 5, 9")


def test_unknown_task_or_split():
    with pytest.raises(DataError, match="unknown task"):
        problems("mul", "train", 3)
    with pytest.raises(DataError, match="unknown split"):
        problems("add", "test", 3)
    with pytest.raises(DataError, match="unknown task"):
        check("mul", "1", "1")


def test_splits_are_disjoint_and_fixed(splits):
    for task, (train, heldout) in splits.items():
        tq, hq = [q for q, _ in train], [q for q, _ in heldout]
        assert len(set(tq)) == len(tq) and len(set(hq)) == len(hq)  # distinct within a split
        assert not set(tq) & set(hq), task
        assert all(split_of(q) == "train" for q in tq) and all(split_of(q) == "heldout" for q in hq)
        if task == "reverse":  # one problem per word: the two splits are all the words, 10% held out
            assert len(tq) + len(hq) == len(tasks.WORDS) and 0.04 < len(hq) / len(tasks.WORDS) < 0.2
        else:
            assert (len(tq), len(hq)) == (2000, 200), task
        # another seed or size draws other problems, but each keeps its split
        other_heldout, other_train = problems(task, "heldout", 50, seed=7), problems(task, "train", 300, seed=7)
        assert not {q for q, _ in other_heldout} & set(tq) and not {q for q, _ in other_train} & set(hq)
    # about HELDOUT_PERCENT of all questions are held out
    rng = random.Random(0)
    qs = {tasks.gen_add(rng)[0] for _ in range(5000)}
    assert 0.07 < sum(split_of(q) == "heldout" for q in qs) / len(qs) < 0.13


def test_problems_are_deterministic():
    for task in TASKS:
        a = problems(task, "train", 100, seed=3)
        assert a == problems(task, "train", 100, seed=3)
        assert a[:40] == problems(task, "train", 40, seed=3)  # the first k of n are the problems for n=k
        assert a != problems(task, "train", 100, seed=4)
    assert sft_conversations(20, "train", seed=1) == sft_conversations(20, "train", seed=1)
    assert sft_conversations(20, "train", seed=1) != sft_conversations(20, "train", seed=2)


def test_sft_conversations_render_short(gpt2_enc):
    convs = sft_conversations(300, "train") + sft_conversations(20, "heldout")
    assert len(convs) == 6 * 320
    assert {c[0]["content"].split()[0] for c in convs} == {"What", "Spell", "How", "Sort", "Which"}
    longest = 0
    for c in convs:
        assert [m["role"] for m in c] == ["user", "assistant"]
        ids, mask = render_conversation(c, gpt2_enc)
        answer = gpt2_enc.encode_ordinary(c[1]["content"])
        assert ids[0] == BOS and ids[-1] == EOS and ids[-len(answer) - 2] == ASSISTANT and USER in ids
        assert sum(mask) == len(answer) + 1  # the answer and its EOS are trained, nothing else
        longest = max(longest, len(ids))
    assert longest < 40 < MAX_TOKENS
    assert conversation("What is 1 + 1?", "2") == [{"role": "user", "content": "What is 1 + 1?"},
                                                    {"role": "assistant", "content": "2"}]


def test_evaluate():
    def oracle(prompts):
        """Answers by looking the question up; one wrong answer per task."""
        answers = {q: a for t in TASKS for q, a in problems(t, "heldout", 10)}
        out = []
        for i, p in enumerate(prompts):
            assert [m["role"] for m in p] == ["user"] and render_prompt(p)[-1] == ASSISTANT
            out.append("I am not sure." if i == 0 else f"The answer is {answers[p[0]['content']]}")
        return out

    res = evaluate(oracle, 10)
    assert set(res) == set(TASKS)
    for task, r in res.items():
        assert r == {"correct": 9, "n": 10, "accuracy": 0.9}, task
    assert evaluate(lambda ps: [""] * len(ps), 5, tasks=["add"]) == {"add": {"correct": 0, "n": 5, "accuracy": 0.0}}
    with pytest.raises(ValueError, match="completions"):
        evaluate(lambda ps: ps[:-1], 5)


# ---- the bundled chat sample -----------------------------------------------------------------------------------

TASK_FORM = re.compile(r"What is \d+ [+-] \d+\?|Spell '[a-z]+' backwards\.|Which is larger, \d+ or \d+\?|"
                       r"How many times does the letter|Sort from smallest to largest:")


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
            if m["role"] == "user" and TASK_FORM.match(m["content"]):
                assert split_of(m["content"]) == "train", m["content"]
    assert sum(c[0]["role"] == "system" for c in convs) >= 5
    assert sum(len(c) > 3 for c in convs) >= 5  # multi-turn
    assert len({json.dumps(c) for c in convs}) == len(convs)  # no duplicate conversations


def test_chat_sample_is_regenerated_exactly(tmp_path, monkeypatch):
    """data/make_chat_sample.py rebuilds the bundled file byte for byte."""
    from data import make_chat_sample
    out = tmp_path / "chat.jsonl"
    monkeypatch.setattr(make_chat_sample, "OUT", out)
    make_chat_sample.main()
    assert out.read_bytes() == tasks.CHAT_SAMPLE.read_bytes()


def test_tasks_script_runs():
    out = subprocess.run([sys.executable, "tasks.py"], cwd=tasks.CHAT_SAMPLE.parents[1], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert all(f"{t}:" in out.stdout for t in TASKS)
