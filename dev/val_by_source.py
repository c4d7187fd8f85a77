"""
Where a chat checkpoint's masked val loss comes from: the held-out replies of each source (each task of tasks.py,
each conversation file) scored on their own, per reply token. A developer's probe, not part of the training path.

    python dev/val_by_source.py out-tiny-sft out-tiny-lora

The held-out conversations are train.py's for the checkpoint's own chat_data, chat_tasks and seed (chat_tasks // 10
problems per task; every 10th conversation of a file; Hub sources are skipped), but each source is packed into
rows by itself, so the total differs a little from train.py's val loss, whose rows mix the sources.
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


def main(out_dirs):
    for out_dir in out_dirs:
        model, ckpt = load_model(str(Path(out_dir) / "ckpt.pt"))
        parts, total, count = [], 0.0, 0
        for source, conversations in held_out(ckpt["config"]).items():
            s, n = reply_loss(model, conversations, model.cfg.max_seq_len)
            parts.append(f"{source} {s / n:.4f} ({n:,} tokens)")
            total, count = total + s, count + n
        print(f"{out_dir}: all {total / count:.4f} ({count:,} tokens) | " + " | ".join(parts), flush=True)


if __name__ == "__main__":
    if not sys.argv[1:] or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    main(sys.argv[1:])
