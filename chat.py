"""
Talk to a chat-tuned checkpoint (python train.py config/sft_tiny.py makes one).

    python chat.py --out_dir=out-tiny-sft                                  # a multi-turn chat in the terminal
    python chat.py --out_dir=out-tiny-sft --prompt="Which is larger, 41 or 17?"   # one reply, for scripts
    python chat.py --out_dir=out-tiny-sft --eval_tasks=300                 # score held-out tasks

In the chat, /clear starts a new conversation and /quit (or Ctrl-D) leaves; Ctrl-C stops the reply being written,
not the program. Replies stream as they are decoded. The latent MLA cache is kept across turns: a new turn runs
the model on its own tokens only (the end of the last reply, the user's text, <Assistant>), never on the whole
conversation again. --speculative=True drafts with the MTP module(s). The conversation is DeepSeek-V3's template
(data/loader.py); when it no longer fits max_seq_len, the oldest turns are dropped.

--eval_tasks=N: N held-out problems of each of tasks.py's tasks (never seen in SFT, in any operand order); one line
per task: greedy exact match, sampled pass@1 (eval_samples replies per problem at temperature 1, the policy GRPO
trains) and the best answer-prior rule (always the first operand, always the last, the majority answer), which an
accuracy must beat to mean anything; the results in <out_dir>/chat_eval.json. --eval_gsm8k=N: the first N problems of GSM8K's test split (the GPU
recipe's; downloaded with datasets), right when the reply's last number has the answer's value.
"""
import os
import sys
from types import SimpleNamespace

import torch

from checkpoint import load_model
from configurator import UserError, configure, config_keys, one_line_errors
from data.loader import ASSISTANT, BOS, EOS, USER, get_tokenizer, hub_conversations, render_prompt, write_json
from model import autocast_context, check_device
from sample import generate_tokens, text_stream
import tasks

# -----------------------------------------------------------------------------------------------------------------
out_dir = 'out-tiny-sft'      # a train.py out_dir (holding ckpt.pt) or the path of a checkpoint file
prompt = ''                   # one reply to this message on stdout, then exit
system = ''                   # an optional system prompt
eval_tasks = 0                # score N held-out problems per task, then exit
eval_samples = 8              # with eval_tasks: sampled pass@1 over this many replies per problem at eval_temperature
eval_temperature = 1.0        # the policy's temperature: a GRPO run's own (grpo.py's temperature)
eval_gsm8k = 0                # score the first N problems of GSM8K's test split (greedy; needs datasets), then exit
temperature = 0.7             # 0: greedy
top_k = 50                    # 0: off
top_p = 1.0                   # 1: off
max_new_tokens = 256          # per reply (less if the context is shorter)
speculative = False           # MTP self-speculative decoding
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
# -----------------------------------------------------------------------------------------------------------------


TASK_REPLY_TOKENS = 16  # a task reply is at most 10 tokens with its EOS ("Sorted: 7, 41, 63."); longer is wrong


class Chat:
    """One conversation: its ids so far and the decoding state (latent cache) that holds them."""

    def __init__(self, model, enc, system="", **sampling):
        self.model, self.enc, self.system, self.sampling = model, enc, system, sampling
        self.clear()

    def clear(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.ids, self.state = [], {}

    def reply(self, text, max_new_tokens):
        """Stream the reply to `text` as token ids (EOS, which ends it, is not yielded). The conversation keeps
        what was generated, even if the caller stops early (Ctrl-C): the next turn closes it with EOS."""
        if self.ids and self.ids[-1] != EOS:
            self.ids.append(EOS)  # the last reply was cut short: close the turn as the template does
        self.messages.append({"role": "user", "content": text})
        # the ids render_prompt(self.messages) gives, built on the ids already in the cache
        ids = self.ids + [USER] + self.enc.encode_ordinary(text) + [ASSISTANT] if self.ids else \
            render_prompt(self.messages, self.enc)
        head = 1 if self.system else 0  # the system prompt always stays
        while self.model.cfg.max_seq_len - len(ids) < min(max_new_tokens, 16) and len(self.messages) > head + 1:
            del self.messages[head:head + 2]  # the context is full: drop the oldest exchange (user + reply)
            ids = render_prompt(self.messages, self.enc)  # the cache keeps what still starts the same way
        if self.model.cfg.max_seq_len - len(ids) < 1:
            raise UserError(f"this message alone fills the model's context ({self.model.cfg.max_seq_len} tokens)")
        room = self.model.cfg.max_seq_len - len(ids)
        self.ids = ids
        out = []
        try:
            for tok in generate_tokens(self.model, ids, min(max_new_tokens, room), eot=EOS, n_vocab=EOS + 1,
                                       state=self.state, **self.sampling):
                self.ids.append(tok)
                if tok in (EOS, BOS):
                    break
                out.append(tok)
                yield tok
        finally:
            self.messages.append({"role": "assistant", "content": self.enc.decode(out)})


def complete(model, enc, conversations, max_new_tokens=32, ended=None):
    """Greedy replies (text) to conversations that end with a user turn: what tasks.evaluate scores. `ended` (a
    list) receives, per reply, whether the model closed it with EOS within max_new_tokens."""
    replies = []
    for messages in conversations:
        ids = render_prompt(messages, enc)
        n = min(max_new_tokens, model.cfg.max_seq_len - len(ids))
        toks = list(generate_tokens(model, ids, n, temperature=0.0, eot=EOS, n_vocab=EOS + 1)) if n > 0 else []
        replies.append(enc.decode([t for t in toks if t < BOS]))
        if ended is not None:
            ended.append(bool(toks) and toks[-1] == EOS)
    return replies


def evaluate_gsm8k(model, enc, n):
    """{correct, n, accuracy}: greedy replies to the first n GSM8K test problems, right when their last number is
    the reference's final answer (tasks.check_gsm8k, GRPO's reward too)."""
    convs = hub_conversations("gsm8k", "val")[:n]
    replies = complete(model, enc, [c[:1] for c in convs], max_new_tokens=256)
    correct = sum(tasks.check_gsm8k(r, tasks.last_number(c[1]["content"])) for r, c in zip(replies, convs))
    return {"correct": correct, "n": len(convs), "accuracy": correct / max(len(convs), 1)}


def sample_replies(model, enc, conversations, k, temperature=1.0, max_new_tokens=16, seed=0):
    """k sampled replies (text) per conversation, at `temperature` over the chat vocabulary: the distribution GRPO
    optimises (grpo.rollout: the k rows of a prompt decode together through the latent cache). A reply that has
    not ended within max_new_tokens is kept as it stands."""
    from grpo import rollout
    device = model.head.weight.device
    by_length = {}  # the conversations batched by prompt length (rollout's batches); conversation i's generator
    for i, messages in enumerate(conversations):  # is seeded by i, so its replies do not depend on the batching
        ids = render_prompt(messages, enc)
        by_length.setdefault(len(ids), []).append((i, ids))
    out = [[""] * k for _ in conversations]  # no room left to reply: k empty replies
    batches = [(T, b[j:j + 64]) for T, b in by_length.items() for j in range(0, len(b), 64)]  # <= 64 x k rows
    for T, batch in batches:
        n = min(max_new_tokens, model.cfg.max_seq_len - T)
        if n <= 0:
            continue
        gens = [torch.Generator(device=device).manual_seed(seed * 1_000_003 + i) for i, _ in batch]
        toks = rollout(model, [ids for _, ids in batch], k, n, temperature, generators=gens).tolist()
        for j, (i, _) in enumerate(batch):
            out[i] = [enc.decode([t for t in row[:row.index(EOS) if EOS in row else len(row)] if t < BOS])
                      for row in toks[j * k:(j + 1) * k]]
    return out


def evaluate(model, enc, n, seed=0, samples=0, temperature=1.0):
    """{task: tasks.evaluate's scores + ended} on n held-out problems per task: greedy exact match, sampled pass@1
    over `samples` replies per problem at `temperature` (0: not measured), the best prior rule; ended is the
    fraction of greedy replies the model closed with EOS within TASK_REPLY_TOKENS."""
    res = {}
    for task in tasks.TASKS:
        ended = []
        greedy = lambda convs: complete(model, enc, convs, TASK_REPLY_TOKENS, ended)  # noqa: E731
        sampled = lambda convs: sample_replies(model, enc, convs, samples, temperature, TASK_REPLY_TOKENS, seed)  # noqa: E731
        res[task] = tasks.evaluate(greedy, n, seed, [task], sampled if samples else None)[task]
        res[task]["ended"] = sum(ended) / max(len(ended), 1)
    return res


@one_line_errors("chat.py")
def main(argv=None):
    c = SimpleNamespace(**configure(config_keys(globals()), argv, description=__doc__.strip().split("\n\n")[0],
                                    quiet=True))
    ctx = autocast_context(check_device(c.device).type, c.dtype)
    if c.temperature < 0 or c.top_k < 0 or not 0 < c.top_p <= 1 or c.max_new_tokens < 1 or min(c.eval_tasks, c.eval_gsm8k, c.eval_samples) < 0 or not c.eval_temperature > 0:
        raise UserError("need temperature >= 0, top_k >= 0, 0 < top_p <= 1, max_new_tokens >= 1, eval_tasks, eval_gsm8k, "
                        "eval_samples >= 0, eval_temperature > 0")
    model, ckpt = load_model(c.out_dir, c.device)
    if model.cfg.vocab_size <= ASSISTANT:
        raise UserError(f"vocab_size {model.cfg.vocab_size} has no rows for the chat tokens (ids {BOS}-"
                        f"{ASSISTANT}): chat needs a model with the padded GPT-2 vocabulary (50304)")
    if c.speculative and not model.cfg.n_mtp:
        raise UserError("--speculative drafts with the MTP modules, but this model has none (n_mtp=0)")
    if not ckpt.get("config", {}).get("chat_data"):
        print(f"chat.py: note: {c.out_dir} was not chat-tuned (no chat_data in its run): expect noise; "
              "python train.py config/sft_tiny.py makes a chat model", file=sys.stderr)
    enc = get_tokenizer()
    torch.manual_seed(c.seed)
    chat = Chat(model, enc, c.system, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                generator=torch.Generator(device=c.device).manual_seed(c.seed), speculative=c.speculative)

    if c.eval_tasks or c.eval_gsm8k:
        with ctx:
            res = evaluate(model, enc, c.eval_tasks, c.seed, c.eval_samples, c.eval_temperature) if c.eval_tasks else {}
            if c.eval_gsm8k:
                res["gsm8k"] = {**evaluate_gsm8k(model, enc, c.eval_gsm8k), "ended": None}
        for task, r in res.items():
            print(tasks.format_results({task: r})
                  + (f" | {r['ended']:.0%} of replies ended with EOS" if r["ended"] is not None else ""))
        path = os.path.join(c.out_dir if os.path.isdir(c.out_dir) else os.path.dirname(c.out_dir), "chat_eval.json")
        write_json(path, {"checkpoint": c.out_dir, "step": ckpt.get("step"), "n_per_task": c.eval_tasks,
                          "n_gsm8k": c.eval_gsm8k, "eval_temperature": c.eval_temperature, "tasks": res})
        print(f"wrote {path}", file=sys.stderr)
        return res
    if c.prompt:  # one reply, nothing else on stdout
        text = text_stream(enc)
        with ctx:
            for tok in chat.reply(c.prompt, c.max_new_tokens):
                print(text(tok), end="", flush=True)
        print(text())
        return

    print(f"chat.py: {c.out_dir} (step {ckpt.get('step', '?')}). /clear starts over, /quit leaves, Ctrl-C stops "
          "a reply.", file=sys.stderr)
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/clear":
            chat.clear()
            print("(new conversation)")
            continue
        if not line:
            continue
        print("bot> ", end="", flush=True)
        text = text_stream(enc)
        try:
            with ctx:
                for tok in chat.reply(line, c.max_new_tokens):
                    print(text(tok), end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        except UserError as e:
            print(f"(chat.py: {e}; /clear to start over)", end="")
        print(text(), flush=True)


if __name__ == "__main__":
    main()
