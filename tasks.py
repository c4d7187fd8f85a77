"""Verifiable tasks for the chat stage: seeded generators of short questions with exact answers, the checkers that
grade a model's reply (SFT evaluation, GRPO's reward), the answer-prior rules an accuracy must beat, and the
bundled chat sample.

    compare  Which is larger, 41 or 17?                  -> The larger is 41.     (select 1 of 2)
    min      Which is smallest: 63, 8, 41, 27?           -> The smallest is 8.    (select 1 of 4)
    sort     Sort from smallest to largest: 41, 7, 63    -> Sorted: 7, 41, 63.    (order 3)

Why these, by measurement (docs/results.md): a model this small learns a task in minutes when its reply COPIES
single GPT-2 tokens that stand in the question exactly as they stand in the reply. Every operand is one of the
numbers 0-99, each one token with its leading space (' 41'), and each reply repeats it after a space, as the
question has it. Multi-digit arithmetic (' 605' is ' 6' + '05', and '605' a third token) and tasks that need the
letters inside a token (spelling backwards, counting letters) were dropped: 300-500 SFT steps taught them nothing.
A word task (which of four words appears twice) was dropped too: its 300 words share no copying with the numbers,
and it reached 0.05 where compare and min reached 0.5. What stays, all on the same 100 number tokens:
  - compare and min: selection by magnitude. Copying is the hard part (the model must learn to name a token of
    the question); once a reply names an operand it is nearly always the right one.
  - sort: ordering, the reply is three copies in the right order.

Splits: a problem is held out iff the sha1 of its CANONICAL KEY (the task and its operands, sorted) falls in
HELDOUT_PERCENT % of the hash range. "Which is larger, 41 or 17?" and "..., 17 or 41?" share a key, so a held-out
problem is never trained on in any order, whatever the seed or the number asked for (split_of()).

Mix: the answer's position cycles through the positions (compare: the larger comes first, then second, ...), so
problems(task, split, n) has the same mix at every n, and the always-first rule scores 1/positions exactly.

Checkers are plain functions of (completion, answer) -> bool, exact but tolerant of harmless text around the
answer: compare and min take the LAST number in the completion (ASCII digits only), sort the whole sequence of
numbers. Anything else (no answer, a number spelled as a word) is wrong.

    python tasks.py        # a few problems of every task, their token lengths, split sizes and prior rules
"""
import hashlib
import itertools
import random
import re
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

from data.loader import DataError

HELDOUT_PERCENT = 10
SPLITS = ("train", "heldout")
CHAT_SAMPLE = Path(__file__).resolve().parent / "data" / "chat_sample.jsonl"  # written by data/make_chat_sample.py
NUMBERS = range(100)  # ' 0' ... ' 99': each one GPT-2 token

class Task(NamedTuple):
    draw: Callable      # (rng, position) -> operands (a tuple) whose answer stands at `position` of the question
    positions: int      # how many positions the answer can take; problems() cycles through them
    ask: Callable       # operands -> the question
    parse: re.Pattern   # the question -> its operands (the regex's groups), for tests and the split of any text
    solve: Callable     # operands -> the answer (a str: what the checker compares)
    reply: str          # the SFT reply, formatted with the answer: it repeats the question's operand tokens
    check: Callable     # (completion, answer) -> bool


# ---- checkers (also GRPO's reward functions) -------------------------------------------------------------------
# ASCII digits only ([0-9], not \d, which also matches '４' or '٤'); a minus sign counts only right before the
# digits, so "-56" is not 56; "1,042" is read as 1042.
NUMBER = re.compile(r"-?[0-9]+(?:,[0-9]{3})*")


def last_number(completion):
    """The last number in the text, as a string without thousands commas ('1,042' -> '1042'); None if none."""
    numbers = NUMBER.findall(completion) if isinstance(completion, str) else []
    return numbers[-1].replace(",", "") if numbers else None


def check_number(completion, answer):
    """True iff the last number of the completion is the answer, digit for digit ('042' is not '42')."""
    return last_number(completion) == answer


def check_sequence(completion, answer):
    """True iff the numbers in the completion, in order, are exactly the answer's (any separators around them)."""
    got = re.findall(r"[0-9]+", completion) if isinstance(completion, str) else []
    return bool(got) and got == re.findall(r"[0-9]+", answer)


def partial_credit(task, completion, answer):
    """A graded score in [0, 1] for GRPO's 'partial' reward; the checks above stay exact for every evaluation. A
    single-number answer scores as check does (0 or 1). A sequence (sort) scores the fraction of the answer's
    numbers that stand at their place among the completion's numbers, and 0 if it has more or fewer numbers:
    "Sorted: 7, 63, 41." for "7, 41, 63" scores 1/3. Why: sort's exact reward is nearly always 0 for all 8
    samples of a prompt (docs/results.md), so its groups teach nothing and RL only drifts it."""
    if get_task(task).check is not check_sequence:
        return float(check(task, completion, answer))
    got = re.findall(r"[0-9]+", completion) if isinstance(completion, str) else []
    want = re.findall(r"[0-9]+", answer)
    return sum(g == w for g, w in zip(got, want)) / len(want) if len(got) == len(want) else 0.0


DECIMAL = re.compile(r"-?[0-9]+(?:,[0-9]{3})*(?:\.[0-9]+)?")


def check_gsm8k(completion, answer):
    """GSM8K: the completion's last number, read as a decimal ('$18.00', '18.0', '1,018'), equals the reference's
    final number. The tasks above stay exact ('042' is wrong there); GSM8K's worked answers write money and
    measures as people do, so the value counts, not the digits."""
    numbers = DECIMAL.findall(completion) if isinstance(completion, str) else []
    if not numbers or answer is None:
        return False
    return float(numbers[-1].replace(",", "")) == float(str(answer).replace(",", ""))


# ---- generators: operands with the answer at a given position --------------------------------------------------

def draw_compare(rng, position):
    small, large = sorted(rng.sample(NUMBERS, 2))
    return (large, small) if position == 0 else (small, large)


def draw_min(rng, position):
    nums = rng.sample(NUMBERS, 4)
    smallest = min(nums)
    nums.remove(smallest)
    nums.insert(position, smallest)
    return tuple(nums)


SORT_ORDERS = list(itertools.permutations(range(3)))  # 6 orders of three numbers


def draw_sort(rng, position):
    nums = sorted(rng.sample(NUMBERS, 3))
    return tuple(nums[i] for i in SORT_ORDERS[position])


def join(items):
    return ", ".join(map(str, items))


TASKS = {
    "compare": Task(draw_compare, 2, lambda o: f"Which is larger, {o[0]} or {o[1]}?",
                    re.compile(r"Which is larger, ([0-9]+) or ([0-9]+)\?"), lambda o: str(max(o)),
                    "The larger is {}.", check_number),
    "min": Task(draw_min, 4, lambda o: f"Which is smallest: {join(o)}?",
                re.compile(r"Which is smallest: ([0-9]+), ([0-9]+), ([0-9]+), ([0-9]+)\?"), lambda o: str(min(o)),
                "The smallest is {}.", check_number),
    "sort": Task(draw_sort, len(SORT_ORDERS), lambda o: f"Sort from smallest to largest: {join(o)}",
                 re.compile(r"Sort from smallest to largest: ([0-9]+), ([0-9]+), ([0-9]+)"),
                 lambda o: join(sorted(o)), "Sorted: {}.", check_sequence),
}


def get_task(task):
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    return TASKS[task]


def check(task, completion, answer):
    """Grade one completion of `task` against its answer (True/False)."""
    return bool(get_task(task).check(completion, answer))


def operands(task, question):
    """The operands of a question of `task` (ints), or None if the text is not one of its questions."""
    m = get_task(task).parse.fullmatch(question)
    return tuple(map(int, m.groups())) if m else None


# ---- answer-prior rules: what a model scores without solving anything -----------------------------------------

def prior_rules(task, train_answers):
    """{name: operands -> answer}: always the first operand (the order as given, for sort), always the last, and
    the majority answer of the training problems. A model has learned the task only where it beats the best."""
    t = get_task(task)
    majority = Counter(train_answers).most_common(1)[0][0] if train_answers else None
    if task == "sort":
        return {"as given": lambda o: join(o), "majority answer": lambda o: majority}
    return {"first": lambda o: t.solve((o[0],)), "last": lambda o: t.solve((o[-1],)),
            "majority answer": lambda o: majority}


def guess(task, operands_, rng):
    """An answer made by a prior rule picked at random: a random operand (for sort, a random order). SFT on such
    replies teaches the format and the copying but not the decision, which GRPO's reward then has to teach."""
    if task == "sort":
        return join(rng.sample(operands_, len(operands_)))
    return get_task(task).solve((rng.choice(operands_),))


# ---- splits and problem sets -----------------------------------------------------------------------------------

def split_of(task, ops):
    """'heldout' for HELDOUT_PERCENT % of canonical keys (the task and its sorted operands), chosen by sha1, else
    'train': a property of the problem up to the order of its operands, so no seed, set size or operand order can
    move a problem across the split."""
    key = f"{task}:" + ",".join(sorted(map(str, ops)))
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def problems(task, split, n, seed=0):
    """n distinct (question, answer, operands) of `task` in `split`, the same for the same (task, split, seed); the
    first k of n are the problems for n=k. Problem i has its answer at position i % positions, so the mix of
    positions is the same at every n."""
    t = get_task(task)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    rng = random.Random(f"{task}/{split}/{seed}")
    seen, out = set(), []
    for i in range(n):
        for _ in range(10_000):  # a bound on the draws; every task has tens of thousands of problems per split
            ops = t.draw(rng, i % t.positions)
            if ops not in seen and split_of(task, ops) == split:
                break
        else:
            break
        seen.add(ops)
        out.append((t.ask(ops), t.solve(ops), ops))
    return out


def conversation(question, reply):
    """A problem as a chat: the user asks, the assistant replies."""
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def copy_drill(n, seed=0):
    """n conversations that only copy: "Repeat: 41" -> "Repeated: 41." (NUMBERS in turn, so each is drilled alike).
    Copying a number token of the question is what every task needs and what a briefly pretrained model learns last
    (docs/results.md): a drill that asks for nothing else trains it directly. Not a task: it is never evaluated (a
    rule that repeats the question scores 1.0), and its questions are of no task, so no held-out problem leaks."""
    numbers = [NUMBERS[i % len(NUMBERS)] for i in range(n)]
    random.Random(f"copy/{seed}").shuffle(numbers)
    return [conversation(f"Repeat: {x}", f"Repeated: {x}.") for x in numbers]


def sft_conversations(n_per_task, split="train", seed=0, guess_tasks=(), drills=0):
    """n_per_task problems of every task as conversations, and `drills` copy drills (copy_drill; train split only),
    shuffled by seed. The tasks in guess_tasks are answered by guess() instead of correctly: format and copying, not
    the decision (for a GRPO demonstration)."""
    rng = random.Random(f"guess/{split}/{seed}")
    convs = copy_drill(drills, seed) if split == "train" else []
    for task, t in TASKS.items():
        for q, a, ops in problems(task, split, n_per_task, seed):
            convs.append(conversation(q, t.reply.format(guess(task, ops, rng) if task in guess_tasks else a)))
    random.Random(f"sft/{split}/{seed}").shuffle(convs)
    return convs


def evaluate(greedy_fn, n_per_task, seed=0, tasks=None, sample_fn=None):
    """Held-out scores per task. greedy_fn(prompts) -> one greedy reply text per prompt (prompts: conversations
    ending with the user's question, for data.loader.render_prompt); sample_fn(prompts) -> a list of k sampled
    replies per prompt, or None. Returns {task: {"correct", "n", "accuracy" (greedy exact match), "pass1" (the
    fraction of samples that are right: sampled pass@1, None without sample_fn), "prior" (the best prior rule's
    accuracy on the same problems), "prior_rule" (its name)}}."""
    results = {}
    for task in tasks or TASKS:
        probs = problems(task, "heldout", n_per_task, seed)
        prompts = [[{"role": "user", "content": q}] for q, _, _ in probs]
        completions = list(greedy_fn(prompts))
        if len(completions) != len(probs):
            raise ValueError(f"greedy_fn returned {len(completions)} completions for {len(probs)} prompts")
        correct = sum(check(task, c, a) for c, (_, a, _) in zip(completions, probs))
        pass1 = None
        if sample_fn is not None:
            samples = list(sample_fn(prompts))
            pass1 = sum(sum(check(task, s, a) for s in ss) / max(len(ss), 1)
                        for ss, (_, a, _) in zip(samples, probs)) / max(len(probs), 1)
        rules = prior_rules(task, [a for _, a, _ in problems(task, "train", 1000, seed)])
        scores = {name: sum(rule(o) == a for _, a, o in probs) / max(len(probs), 1) for name, rule in rules.items()}
        best = max(scores, key=scores.get)
        results[task] = {"correct": correct, "n": len(probs), "accuracy": correct / len(probs) if probs else 0.0,
                         "pass1": pass1, "prior": scores[best], "prior_rule": best}
    return results


def format_results(results):
    """One line per task: greedy exact match, sampled pass@1, the best prior rule."""
    lines = []
    for task, r in results.items():
        line = f"{task:8s} greedy {r['correct']:4d} / {r['n']:4d} = {r['accuracy']:.3f}"
        if r.get("pass1") is not None:
            line += f" | sampled pass@1 {r['pass1']:.3f}"
        if r.get("prior") is not None:
            line += f" | best prior rule ({r['prior_rule']}) {r['prior']:.3f}"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    from data.loader import render_conversation
    for name, task in TASKS.items():
        train, heldout = problems(name, "train", 1000), problems(name, "heldout", 100)
        lengths = [len(render_conversation(conversation(q, task.reply.format(a)))[0]) for q, a, _ in train + heldout]
        print(f"{name}: {len(train)} train / {len(heldout)} held-out problems, rendered {min(lengths)}-{max(lengths)} "
              f"tokens, mean {sum(lengths) / len(lengths):.1f}")
        for q, a, _ in train[:3]:
            print(f"    {q}  ->  {task.reply.format(a)}")
