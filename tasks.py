"""Verifiable tasks for the chat stage: seeded generators of short questions with exact answers, the checkers that
grade a model's reply (SFT evaluation now, GRPO's reward functions later), and the bundled chat sample.

    add      What is 17 + 25?                                       -> 42
    sub      What is 83 - 27?                                       -> 56
    reverse  Spell 'cat' backwards.                                 -> tac
    count    How many times does the letter 'r' appear in 'river'?  -> 2
    sort     Sort from smallest to largest: 5, 2, 9                 -> 2, 5, 9
    compare  Which is larger, 31 or 13?                             -> 31

The reply is the bare answer: the shortest format a 7M-parameter model can learn in minutes. A rendered problem
(BOS, <User>, question, <Assistant>, answer, EOS) is 11 to 28 GPT-2 tokens (sort the longest; the answer is 1 or 2
tokens, up to 5 for reverse and 9 for sort), so many fit one 128-token context.

Splits: a problem is held out iff the sha1 of its question text falls in HELDOUT_PERCENT % of the hash range, so
train and held-out never share a question, whatever the seed or the number asked for (split_of()).

Checkers are plain functions of (completion, answer) -> bool, exact but tolerant of harmless text around the
answer: numeric tasks take the LAST number in the completion (ASCII digits only), reverse the last word of ASCII
letters, sort the whole sequence of numbers. Anything else (no answer, a number spelled as a word, other digits)
is wrong.

    python tasks.py        # a few problems of every task, their token lengths and split sizes
"""
import hashlib
import random
import re
from pathlib import Path
from typing import Callable, NamedTuple

from data.loader import DataError

HELDOUT_PERCENT = 10
SPLITS = ("train", "heldout")
CHAT_SAMPLE = Path(__file__).resolve().parent / "data" / "chat_sample.jsonl"  # written by data/make_chat_sample.py

# Common, neutral lowercase English words of 3-7 letters for `reverse` and `count`, written inline: the GPT-2
# vocabulary's ' word' tokens are not all words (' deriv', ' categ') and not all neutral.
WORDS = sorted(set("""
    ant bat bee cat cow dog eel elk emu fox hen owl pig ram yak bear bird crab deer duck fish frog goat lion mole
    seal swan toad wolf camel eagle goose horse koala llama moose mouse otter panda shark sheep snake squid tiger
    whale zebra badger beaver donkey falcon ferret lizard monkey parrot pigeon rabbit salmon spider turtle chicken
    dolphin giraffe hamster leopard lobster ostrich penguin
    egg fig jam oat pie tea bean cake corn kiwi lime meat milk pear plum rice salt soup apple bread grape honey
    lemon mango melon olive onion pasta peach pizza sugar almond banana butter carrot celery cheese cherry cookie
    garlic muffin noodle orange pepper potato tomato walnut biscuit cabbage lettuce pancake
    bag bed box cup fan jar key map mat mug pan pen pot rug bell book coin comb desk door fork lamp sofa brush
    chair clock glass knife ladle plate shelf spoon table towel basket bottle bucket button candle hammer jacket
    kettle ladder mirror pencil pillow ribbon wallet blanket
    fog ice mud sea sky sun hill lake leaf moon moss pond rain rock sand snow star tree wind beach cloud field
    grass ocean plant river stone storm breeze canyon desert forest garden island meadow planet valley
    red tan blue gold gray pink black brown green white purple silver violet yellow
    arm ear eye leg toe face foot hair hand knee neck nose thumb elbow finger
    bus cab car jet van bike boat ship canoe plane train truck wagon rocket
    drum harp horn note poem song word chalk class flute paper piano ruler story eraser guitar lesson letter
    number puzzle school violin
    day dawn dusk hour noon week year month night today spring summer autumn minute season winter evening
    morning
    hop run sit bake cook draw jump play read rest sing swim wait walk build climb dance laugh learn paint sleep
    smile teach think write listen travel
    big hot new old calm cold fast kind loud soft slow tall warm brave clean early fresh happy large quick quiet
    round sharp small sweet bright gentle simple
""".split()))
LETTERS = "abcdefghijklmnopqrstuvwxyz"


class Task(NamedTuple):
    generate: Callable  # rng (random.Random) -> (question, answer)
    check: Callable     # (completion, answer) -> bool


# ---- checkers (also GRPO's reward functions) -------------------------------------------------------------------
# ASCII digits only ([0-9], not \d, which also matches '４' or '٤'); a minus sign counts only right before the
# digits, so "-56" is not 56; "1,042" is read as 1042.
NUMBER = re.compile(r"-?[0-9]+(?:,[0-9]{3})*")
WORD = re.compile(r"[A-Za-z]+")


def last_number(completion):
    """The last number in the text, as a string without thousands commas ('1,042' -> '1042'); None if none."""
    numbers = NUMBER.findall(completion) if isinstance(completion, str) else []
    return numbers[-1].replace(",", "") if numbers else None


def check_number(completion, answer):
    """True iff the last number of the completion is the answer, digit for digit ('042' is not '42')."""
    return last_number(completion) == answer


def check_word(completion, answer):
    """True iff the last word of ASCII letters in the completion is the answer, ignoring case ('Tac' is 'tac')."""
    words = WORD.findall(completion) if isinstance(completion, str) else []
    return bool(words) and words[-1].lower() == answer.lower()


def check_sequence(completion, answer):
    """True iff the numbers in the completion, in order, are exactly the answer's (any separators around them)."""
    got = re.findall(r"[0-9]+", completion) if isinstance(completion, str) else []
    return bool(got) and got == re.findall(r"[0-9]+", answer)


# ---- generators ------------------------------------------------------------------------------------------------

def operand(rng):
    """1 to 3 digits, each length equally likely, so small sums are as common as large ones."""
    return rng.randrange(10 ** rng.randint(1, 3))


def gen_add(rng):
    a, b = operand(rng), operand(rng)
    return f"What is {a} + {b}?", str(a + b)


def gen_sub(rng):
    a, b = sorted((operand(rng), operand(rng)), reverse=True)  # a >= b: the result is never negative
    return f"What is {a} - {b}?", str(a - b)


def gen_reverse(rng):
    word = rng.choice(WORDS)
    return f"Spell '{word}' backwards.", word[::-1]


def gen_count(rng):
    """A letter of the word 80% of the time (answers 1-3), else one it lacks (answer 0)."""
    word = rng.choice(WORDS)
    inside = sorted(set(word))
    letter = rng.choice(inside if rng.random() < 0.8 else [c for c in LETTERS if c not in inside])
    return f"How many times does the letter '{letter}' appear in '{word}'?", str(word.count(letter))


def gen_sort(rng):
    numbers = rng.sample(range(100), rng.randint(3, 5))
    return (f"Sort from smallest to largest: {', '.join(map(str, numbers))}",
            ", ".join(map(str, sorted(numbers))))


def gen_compare(rng):
    a = operand(rng)
    b = operand(rng)
    while b == a:
        b = operand(rng)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


TASKS = {
    "add": Task(gen_add, check_number),
    "sub": Task(gen_sub, check_number),
    "reverse": Task(gen_reverse, check_word),
    "count": Task(gen_count, check_number),
    "sort": Task(gen_sort, check_sequence),
    "compare": Task(gen_compare, check_number),
}


def get_task(task):
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    return TASKS[task]


def check(task, completion, answer):
    """Grade one completion of `task` against its answer (True/False)."""
    return bool(get_task(task).check(completion, answer))


# ---- splits and problem sets -----------------------------------------------------------------------------------

def split_of(question):
    """'heldout' for HELDOUT_PERCENT % of questions, chosen by the sha1 of the text, else 'train': a property of
    the question alone, so no seed or set size can move a problem across the split."""
    h = int.from_bytes(hashlib.sha1(question.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def problems(task, split, n, seed=0):
    """n distinct (question, answer) pairs of `task` in `split`, the same for the same (task, split, seed); the
    first k of n are the problems for n=k. A task with fewer problems in the split than n (reverse: one per word,
    so about len(WORDS) * 0.9 train and len(WORDS) * 0.1 held-out) gives all it has, in practice, and no more.
    Distinct questions drift from the generator's mix once one kind runs out: count has only ~1,500 questions about
    a letter the word holds (135 held out) against ~7,400 about one it lacks, so its first ~100 held-out problems
    are 80/20 as generated, the first 300 are 55% answer 0, 2,000 training problems are 40% answer 0."""
    gen = get_task(task).generate
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    rng = random.Random(f"{task}/{split}/{seed}")
    seen, out = set(), []
    for _ in range(50 * n + 10_000):  # a bound on the draws, for tasks whose split has fewer than n problems
        if len(out) >= n:
            break
        question, answer = gen(rng)
        if question not in seen:
            seen.add(question)
            if split_of(question) == split:
                out.append((question, answer))
    return out


def conversation(question, answer):
    """A problem as a chat: the user asks, the assistant replies with the bare answer."""
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def sft_conversations(n_per_task, split="train", seed=0):
    """n_per_task problems of every task (fewer for reverse, see problems()) as conversations, shuffled by seed."""
    convs = [conversation(q, a) for task in TASKS for q, a in problems(task, split, n_per_task, seed)]
    random.Random(f"sft/{split}/{seed}").shuffle(convs)
    return convs


def evaluate(generate_fn, n_per_task, seed=0, tasks=None):
    """Held-out accuracy per task. generate_fn(prompts) -> completions: prompts is a list of conversations that
    end with the user's question (for data.loader.render_prompt), completions the assistant's reply texts, one per
    prompt. Returns {task: {"correct": int, "n": int, "accuracy": float}}."""
    results = {}
    for task in tasks or TASKS:
        probs = problems(task, "heldout", n_per_task, seed)
        completions = list(generate_fn([[{"role": "user", "content": q}] for q, _ in probs]))
        if len(completions) != len(probs):
            raise ValueError(f"generate_fn returned {len(completions)} completions for {len(probs)} prompts")
        correct = sum(check(task, c, a) for c, (_, a) in zip(completions, probs))
        results[task] = {"correct": correct, "n": len(probs), "accuracy": correct / len(probs) if probs else 0.0}
    return results


if __name__ == "__main__":
    from data.loader import render_conversation
    for name, task in TASKS.items():
        train, heldout = problems(name, "train", 1000), problems(name, "heldout", 100)
        lengths = [len(render_conversation(conversation(q, a))[0]) for q, a in train + heldout]
        print(f"{name}: {len(train)} train / {len(heldout)} held-out problems (of 1000 / 100 asked), rendered "
              f"{min(lengths)}-{max(lengths)} tokens, mean {sum(lengths) / len(lengths):.1f}")
        for q, a in train[:3]:
            print(f"    {q}  ->  {a}")
