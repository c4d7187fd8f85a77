"""
Where a chat checkpoint's masked val loss comes from: the held-out replies of each source (each task of tasks.py,
each conversation file) scored on their own, per reply token. A developer's probe, not part of the training path.

    python dev/val_by_source.py out-tiny-sft out-tiny-lora
    python dev/val_by_source.py --seed=1337 out-a out-b     # every checkpoint on seed 1337's held-out problems

The held-out conversations are train.py's for the checkpoint's own chat_data, chat_tasks and seed (chat_tasks // 10
problems per task; every 10th conversation of a file; Hub sources are skipped), but each source is packed into
rows by itself, so the total differs a little from train.py's val loss, whose rows mix the sources. --seed=S scores
every checkpoint on the problems of seed S instead of its own (tasks.py's split does not depend on the seed: no run
trained on another seed's held-out problems), so that runs of different seeds are compared on the same problems.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tasks  # noqa: E402
from checkpoint import load_model  # noqa: E402
from data.loader import ChatReader, read_conversations  # noqa: E402


def held_out(config):
    """{source: held-out conversations} for a checkpoint's training config."""
    sources = {}
    for source in config["chat_data"].split(","):
        if source == "tasks":
            n = max(config["chat_tasks"] // 10, 1)
            for task, t in tasks.TASKS.items():
                sources[task] = [tasks.conversation(q, t.reply.format(a))
                                 for q, a, _ in tasks.problems(task, "heldout", n, config["seed"])]
        elif Path(source).exists():
            sources[Path(source).name] = [c for i, c in enumerate(read_conversations(source)) if i % 10 == 0]
    return sources


@torch.no_grad()
def reply_loss(model, conversations, seq_len, batch_size=32):
    """(summed CE, number) of the reply tokens of `conversations`, packed as train.py packs them."""
    reader = ChatReader(conversations, 1, seq_len, shuffle=False)
    x, y = torch.from_numpy(reader.tokens[:, :-1]), torch.from_numpy(reader.targets[:, 1:])
    total = 0.0
    for i in range(0, len(x), batch_size):
        logits, _ = model(x[i:i + batch_size])
        total += F.cross_entropy(logits.flatten(0, 1).float(), y[i:i + batch_size].flatten(), ignore_index=-1,
                                 reduction="sum").item()
    return total, int((y >= 0).sum())


def main(out_dirs, seed=None):
    for out_dir in out_dirs:
        model, ckpt = load_model(str(Path(out_dir) / "ckpt.pt"))
        config = {**ckpt["config"], **({} if seed is None else {"seed": seed})}
        sums = {}  # source -> (summed CE, reply tokens)
        for source, conversations in held_out(config).items():
            sums[source] = reply_loss(model, conversations, model.cfg.max_seq_len)
        groups = {"all": list(sums), "tasks": [s for s in sums if s in tasks.TASKS], **{s: [s] for s in sums}}
        parts = []
        for name, members in groups.items():
            total, count = (sum(sums[s][i] for s in members) for i in (0, 1))
            parts.append(f"{name} {total / max(count, 1):.4f} ({count:,} tokens)")
        print(f"{out_dir}: " + " | ".join(parts), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    seed = int(args.pop(0).split("=", 1)[1]) if args and args[0].startswith("--seed=") else None
    if not args or any(a.startswith("-") for a in args):
        sys.exit(__doc__)
    main(args, seed)
