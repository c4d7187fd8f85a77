"""plot.py: draws every run's curves into one PNG, and says in one line when matplotlib is missing."""
import json

import pytest

from conftest import exit_message, run


def write_run(d, with_hellaswag):
    """A tiny out_dir in train.py's log format: 5 log records, 3 evals."""
    d.mkdir()
    with open(d / "log.jsonl", "w") as f:
        for s in range(1, 6):
            f.write(json.dumps({"step": s, "tokens": 512 * s, "time": 1.5 * s, "loss": 9 - s / 5, "ce": 8 - s / 5,
                                "mtp": 8.1 - s / 5, "balance": 1e-4, "lr": 1e-3, "load_max": 3 - s / 5,
                                "load_min": s / 10}) + "\n")
    with open(d / "eval.jsonl", "w") as f:
        for s in (0, 2, 5):
            rec = {"step": s, "tokens": 512 * s, "time": 1.5 * s, "val_loss": 8.5 - s / 4, "val_mtp": 8.6 - s / 4}
            if with_hellaswag:
                rec.update(hellaswag_acc=0.25, hellaswag_acc_norm=0.24 + s / 100)
            f.write(json.dumps(rec) + "\n")
    return d


def test_two_runs_are_overlaid(tmp_path):
    pytest.importorskip("matplotlib")
    from plot import plot
    a, b = write_run(tmp_path / "adamw", True), write_run(tmp_path / "muon", False)
    out = tmp_path / "p.png"
    fig = plot([a, b], out, x="time")
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [ax.get_title() for ax in fig.axes] == ["train loss (main head)", "val loss", "HellaSwag acc_norm",
                                                   "expert load max / min (x balanced)"]
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 2, 1, 4]  # a line per run (HellaSwag where logged), max+min
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["adamw", "muon"]
    val = fig.axes[1].get_lines()[1]
    assert list(val.get_xdata()) == [0, 3.0, 7.5] and list(val.get_ydata()) == [8.5, 8.0, 7.25]


def test_clear_errors(tmp_path):
    """Without matplotlib (a real process): one line, exit 1; with it, a folder with no logs: one line, no PNG."""
    code = "import runpy, sys; sys.modules['matplotlib'] = None; sys.argv[:] = sys.argv[1:]; runpy.run_path('plot.py', " \
           "run_name='__main__')"
    p = run("-c", code, "plot.py", write_run(tmp_path / "run", False), "--out", tmp_path / "x.png", timeout=120)
    assert p.returncode == 1 and p.stderr.strip() == (
        "plot.py: error: matplotlib is not installed (pip install matplotlib); nothing else needs it")
    pytest.importorskip("matplotlib")
    import plot
    msg = exit_message(plot.main, [str(tmp_path / "nothing_here"), "--out", str(tmp_path / "x.png")], "plot.py")
    assert "no log.jsonl or eval.jsonl" in msg and not (tmp_path / "x.png").exists()


def test_grpo_run_draws_reward_and_held_out_accuracy(tmp_path):
    """grpo.py's logs (log.jsonl: reward per step; eval.jsonl: task_<name> accuracies): the reward, thin, under its
    running mean over REWARD_SMOOTH steps, and one accuracy line per task."""
    pytest.importorskip("matplotlib")
    from plot import REWARD_SMOOTH, plot
    d = tmp_path / "grpo"
    d.mkdir()
    rewards = [0.1, 0.3, 0.2, 0.6, 0.4, 0.5, 0.9, 0.7, 0.6, 0.8, 1.0, 0.9]
    with open(d / "log.jsonl", "w") as f:
        for s, r in enumerate(rewards, 1):
            f.write(json.dumps({"step": s, "tokens": 30 * s, "time": 2.0 * s, "reward": r, "kl": 0.01}) + "\n")
    with open(d / "eval.jsonl", "w") as f:
        for s, acc in ((0, 0.02), (6, 0.10), (12, 0.30)):
            f.write(json.dumps({"step": s, "tokens": 30 * s, "time": 2.0 * s, "task_count": 0.72,
                                "task_compare": acc}) + "\n")
    fig = plot([d], tmp_path / "g.png", x="step")
    assert [ax.get_title() for ax in fig.axes] == ["GRPO mean reward", "held-out exact match (greedy)"]
    raw, mean = fig.axes[0].get_lines()
    assert list(raw.get_ydata()) == rewards
    want = [sum(rewards[max(0, k - REWARD_SMOOTH + 1):k + 1]) / min(k + 1, REWARD_SMOOTH) for k in range(12)]
    assert list(mean.get_ydata()) == pytest.approx(want) and want[-1] == pytest.approx(sum(rewards[2:]) / 10)
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[1].get_lines()}
    assert lines == {"compare": [0.02, 0.10, 0.30], "count": [0.72, 0.72, 0.72]}
    assert list(fig.axes[1].get_lines()[0].get_xdata()) == [0, 6, 12]


def test_held_out_evals_with_sampled_pass1_and_prior_rules(tmp_path):
    """eval.jsonl as grpo.py and train.py write it now: task_<t> (greedy), task_<t>_pass1 (sampled, null when not
    measured), task_<t>_prior (the best answer-prior rule). Greedy lines with their prior dotted, a pass@1 panel."""
    pytest.importorskip("matplotlib")
    from plot import plot
    d = tmp_path / "grpo"
    d.mkdir()
    with open(d / "eval.jsonl", "w") as f:
        for s, acc in ((0, 0.1), (5, 0.4)):
            f.write(json.dumps({"step": s, "tokens": 30 * s, "time": 2.0 * s, "task_compare": acc,
                                "task_compare_pass1": acc / 2, "task_compare_prior": 0.5, "task_min": 0.2,
                                "task_min_pass1": None, "task_min_prior": 0.25}) + "\n")
    fig = plot([d], tmp_path / "g.png", x="step")
    assert [ax.get_title() for ax in fig.axes] == ["held-out exact match (greedy)", "held-out sampled pass@1"]
    greedy = [(line.get_label(), list(line.get_ydata())) for line in fig.axes[0].get_lines()]
    assert greedy == [("compare", [0.1, 0.4]), ("_compare prior", [0.5, 0.5]), ("min", [0.2, 0.2]),
                      ("_min prior", [0.25, 0.25])]  # the priors: dotted, not in the legend
    assert [line.get_linestyle() for line in fig.axes[0].get_lines()] == ["-", ":", "-", ":"]
    sampled = {line.get_label(): list(line.get_ydata()) for line in fig.axes[1].get_lines()}
    assert sampled == {"compare": [0.05, 0.2]}
