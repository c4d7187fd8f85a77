"""
Plot training runs from their out_dir logs (log.jsonl, eval.jsonl written by train.py or grpo.py), several runs
overlaid:

    python plot.py out-small out-small-muon                      # -> plot.png
    python plot.py out-abl/* --out=assets/ablation.png --x=time  # against training seconds instead of tokens
    python plot.py out-tiny-grpo --x=step --out=assets/grpo_tiny.png

Panels, each when the logs have it: train loss (main head's cross-entropy), val loss, HellaSwag acc_norm, the expert
load (max and min, as multiples of the balanced load), GRPO's mean reward per step (and its running mean over
REWARD_SMOOTH steps), held-out greedy exact match per task with its best answer-prior rule dotted, and sampled
pass@1 per task (train.py's chat evals, grpo.py's evals). Each run is named by its folder (or --names).
Needs matplotlib, which nothing else here uses: pip install matplotlib.
"""
import argparse
import json
import os
import sys

from configurator import UserError

REWARD_SMOOTH = 10  # steps in the running mean drawn over GRPO's per-step reward


def read_jsonl(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(run_dirs, out, names=None, x="tokens", title=None):
    """Draw the runs into one figure, save it to `out` and return it (tests count its lines)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("matplotlib is not installed (pip install matplotlib); nothing else needs it") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    runs = []
    for i, d in enumerate(run_dirs):
        log, ev = read_jsonl(os.path.join(d, "log.jsonl")), read_jsonl(os.path.join(d, "eval.jsonl"))
        if not log and not ev:
            raise UserError(f"{d}: no log.jsonl or eval.jsonl (is it a train.py or grpo.py out_dir?)")
        if any(x not in r for r in log + ev):
            raise UserError(f"{d}: the logs have no {x!r} field (logs of an older train.py?); try --x=tokens")
        runs.append((names[i] if names else os.path.basename(os.path.normpath(d)), log, ev))

    has = lambda source, key: any(r.get(key) is not None for run in runs for r in run[1 if source == "log" else 2])
    panels = [p for p in [("train loss (main head)", "log", ["ce"]), ("val loss", "eval", ["val_loss"]),
                          ("HellaSwag acc_norm", "eval", ["hellaswag_acc_norm"]),
                          ("expert load max / min (x balanced)", "log", ["load_max", "load_min"]),
                          ("GRPO mean reward", "log", ["reward"])] if has(p[1], p[2][0])]
    # task_<t>: greedy accuracy, drawn with task_<t>_prior (the best answer-prior rule) dotted; task_<t>_pass1: sampled
    task_keys = sorted({k for _, _, ev in runs for r in ev for k in r if k.startswith("task_")
                        and not k.endswith(("_pass1", "_prior"))})
    pass1_keys = sorted({k for _, _, ev in runs for r in ev for k, v in r.items() if k.startswith("task_")
                         and k.endswith("_pass1") and v is not None})
    if task_keys:
        panels.append(("held-out exact match (greedy)", "eval", task_keys))
    if pass1_keys:
        panels.append(("held-out sampled pass@1", "eval", pass1_keys))
    if not panels:
        raise UserError(f"nothing to plot in {', '.join(map(str, run_dirs))}: no losses, rewards or evals in the logs")

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (label, source, keys) in zip(axes[0], panels):
        for i, (name, log, ev) in enumerate(runs):
            rows = log if source == "log" else ev
            color = colors[i % len(colors)]
            if keys is task_keys or keys is pass1_keys:  # one colour per task, one line style per run
                for j, key in enumerate(keys):
                    pts = [(r[x], r[key]) for r in rows if r.get(key) is not None]
                    task = key[5:].removesuffix("_pass1")
                    if pts:
                        ax.plot(*zip(*pts), ["-", "--", "-.", (0, (5, 1))][i % 4], color=colors[j % len(colors)],
                                marker="o", markersize=3, label=task + (f" ({name})" if len(runs) > 1 else ""))
                    prior = [(r[x], r[f"task_{task}_prior"]) for r in rows if r.get(f"task_{task}_prior") is not None]
                    if prior and keys is task_keys:
                        ax.plot(*zip(*prior), ":", color=colors[j % len(colors)], linewidth=1, label=f"_{task} prior")
                continue
            for key, style in zip(keys, ["-", "--"]):
                pts = [(r[x], r[key]) for r in rows if r.get(key) is not None]
                if not pts:
                    continue
                if key == "reward":  # noisy per step: thin, with its running mean on top
                    ax.plot(*zip(*pts), "-", color=color, alpha=0.3, linewidth=0.8)
                    ys = [p[1] for p in pts]
                    pts = [(p[0], sum(ys[max(0, k - REWARD_SMOOTH + 1):k + 1]) / min(k + 1, REWARD_SMOOTH))
                           for k, p in enumerate(pts)]
                ax.plot(*zip(*pts), style, color=color, label=name if style == "-" else None,
                        marker="o" if source == "eval" else None, markersize=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("training seconds" if x == "time" else x)
        ax.grid(alpha=0.3)
        if keys is task_keys or keys is pass1_keys:
            ax.set_ylim(-0.03, 1.03)
            ax.legend(fontsize=7)
    axes[0][0].legend(fontsize=8)
    late = [r["val_loss"] for _, _, ev in runs for r in ev if r["step"] > 0 and r.get("val_loss") is not None]
    if late:  # zoom the val panel past the first (untrained) eval so the runs can be told apart
        val_ax = axes[0][[p[0] for p in panels].index("val loss")]
        val_ax.set_ylim(min(late) - 0.05 * (max(late) - min(late) + 0.1), max(late) + 0.1)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="train.py or grpo.py out_dirs")
    p.add_argument("--out", default="plot.png", help="the PNG to write")
    p.add_argument("--names", default="", help="comma-separated run names (default: the folder names)")
    p.add_argument("--x", choices=["tokens", "time", "step"], default="tokens", help="x axis")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    names = args.names.split(",") if args.names else None
    if names and len(names) != len(args.run_dirs):
        sys.exit(f"plot.py: error: {len(names)} --names for {len(args.run_dirs)} runs")
    try:
        plot(args.run_dirs, args.out, names, args.x, args.title or None)
    except UserError as e:
        sys.exit(f"plot.py: error: {e}")
    print(f"plot.py: wrote {args.out} ({len(args.run_dirs)} runs)")


if __name__ == "__main__":
    main()
