"""tasks.py (generators, checkers, splits, SFT conversations, evaluate) and the bundled data/chat_sample.jsonl."""
import json
import random
import re

import pytest

import tasks
from data.loader import ASSISTANT, BOS, EOS, USER, DataError, read_conversations, render_conversation, render_prompt
from conftest import ok, run
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


def test_answers_are_right_and_varied(splits):
    """Every generated problem's answer is recomputed from its question, and its checker accepts it. The generators
    cover their ranges: 1- to 3-digit operands and sums past 1000, zero counts, 3 and 5 numbers."""
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
    adds = [int(a) for q, a in splits["add"][0]]
    assert min(adds) < 10 and max(adds) >= 1000 and {"0", "1", "2"} <= {a for q, a in splits["count"][0]}
    assert {len(a.split(", ")) for q, a in splits["sort"][0]} == {3, 4, 5}


ACCEPT = [("add", "42", "42"), ("add", "The answer is 42.", "42"), ("add", " 42\n", "42"), ("add", "17 + 25 = 42", "42"),
          ("add", "1,042", "1042"), ("sub", "83 - 27 = 56", "56"), ("compare", "31 is larger.", "31"),
          ("count", "There are 3 r's in 'strawberry': 3", "3"), ("reverse", "tac", "tac"),
          ("reverse", "The word backwards is 'tac'.", "tac"), ("reverse", "Tac", "tac"), ("sort", "2, 5, 9", "2, 5, 9"),
          ("sort", "Sorted: 2 5 9.", "2, 5, 9")]
REJECT = [(t, c, "42") for t in ("add", "sub", "count", "compare") for c in [
    "", "   ", "\n", "I don't know.", "forty-two", "Forty two", "４２", "٤٢", "42 or maybe 41", "It is 42, no wait, 43",
    "-42", "42.5", "042", "4 2", "The answer is", None]] + [
    ("reverse", c, "tac") for c in ["", "cat", "tac is the answer", "t a c", "tàc", "tacs", "ta", "123", "tac tac cat",
                                     None]] + [
    ("sort", c, "2, 5, 9") for c in ["", "5, 2, 9", "2, 5", "2, 5, 9, 11", "2, 9, 5", "２, ５, ９", "two, five, nine",
                                      "Sort 5, 2, 9: 2, 5, 9", "25, 9", None]]


@pytest.mark.parametrize("task, completion, answer", ACCEPT + REJECT)
def test_checkers(task, completion, answer):
    """Harmless text around the answer is accepted; anything else is not."""
    assert bool(check(task, completion, answer)) == ((task, completion, answer) in ACCEPT)


def test_unknown_task_or_split():
    for call, match in [(lambda: problems("mul", "train", 3), "unknown task"),
                        (lambda: problems("add", "test", 3), "unknown split"),
                        (lambda: check("mul", "1", "1"), "unknown task")]:
        with pytest.raises(DataError, match=match):
            call()


def test_splits_are_disjoint_and_fixed(splits):
    for task, (train, heldout) in splits.items():
        tq, hq = [q for q, _ in train], [q for q, _ in heldout]
        assert len(set(tq)) == len(tq) and len(set(hq)) == len(hq) and not set(tq) & set(hq), task  # distinct
        assert all(split_of(q) == "train" for q in tq) and all(split_of(q) == "heldout" for q in hq)
        if task == "reverse":  # one problem per word: the two splits are all the words, 10% held out
            assert len(tq) + len(hq) == len(tasks.WORDS) and 0.04 < len(hq) / len(tasks.WORDS) < 0.2
        else:
            assert (len(tq), len(hq)) == (2000, 200), task
        # another seed or size draws other problems, but each keeps its split
        other_heldout, other_train = problems(task, "heldout", 50, seed=7), problems(task, "train", 300, seed=7)
        assert not {q for q, _ in other_heldout} & set(tq) and not {q for q, _ in other_train} & set(hq)
    # about HELDOUT_PERCENT of all questions are held out
    qs = {tasks.gen_add(rng)[0] for rng in [random.Random(0)] for _ in range(5000)}
    assert 0.07 < sum(split_of(q) == "heldout" for q in qs) / len(qs) < 0.13


def test_problems_are_deterministic():
    for task in TASKS:  # and the first k of n are the problems for n=k
        a = problems(task, "train", 100, seed=3)
        assert a == problems(task, "train", 100, seed=3) and a[:40] == problems(task, "train", 40, seed=3)
        assert a != problems(task, "train", 100, seed=4)
    assert sft_conversations(20, "train", seed=1) == sft_conversations(20, "train", seed=1)
    assert sft_conversations(20, "train", seed=1) != sft_conversations(20, "train", seed=2)


def test_sft_conversations_render_short(gpt2_enc):
    convs = sft_conversations(300, "train") + sft_conversations(20, "heldout")
    assert len(convs) == 6 * 320
    assert {c[0]["content"].split()[0] for c in convs} == {"What", "Spell", "How", "Sort", "Which"}
    for c in convs:
        assert [m["role"] for m in c] == ["user", "assistant"]
        ids, mask = render_conversation(c, gpt2_enc)
        answer = gpt2_enc.encode_ordinary(c[1]["content"])
        assert ids[0] == BOS and ids[-1] == EOS and ids[-len(answer) - 2] == ASSISTANT and USER in ids
        assert sum(mask) == len(answer) + 1 and len(ids) < 40 < MAX_TOKENS  # the answer and its EOS are trained
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

    assert evaluate(oracle, 10) == {t: {"correct": 9, "n": 10, "accuracy": 0.9} for t in TASKS}
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
