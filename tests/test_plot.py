"""plot.py: draws every run's curves into one PNG, and says in one line when matplotlib is missing."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


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
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["train loss (main head)", "val loss", "HellaSwag acc_norm", "expert load max / min (x balanced)"]
    lines = [len(ax.get_lines()) for ax in fig.axes]
    assert lines == [2, 2, 1, 4]  # one line per run, HellaSwag only where logged, load max and min per run
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["adamw", "muon"]
    val = fig.axes[1].get_lines()[1]
    assert list(val.get_xdata()) == [0, 3.0, 7.5] and list(val.get_ydata()) == [8.5, 8.0, 7.25]


def run_plot(*args, block_matplotlib=False):
    pre = "import sys; sys.modules['matplotlib'] = None; " if block_matplotlib else "import sys; "
    code = pre + f"sys.argv = ['plot.py', *{list(map(str, args))!r}]; import runpy; runpy.run_path('plot.py', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_clear_errors(tmp_path):
    run = write_run(tmp_path / "run", False)
    p = run_plot(run, "--out", tmp_path / "x.png", block_matplotlib=True)
    assert p.returncode == 1 and p.stderr.strip() == (
        "plot.py: error: matplotlib is not installed (pip install matplotlib); nothing else needs it")
    pytest.importorskip("matplotlib")
    p = run_plot(tmp_path / "nothing_here", "--out", tmp_path / "x.png")
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "no log.jsonl or eval.jsonl" in p.stderr
    assert not (tmp_path / "x.png").exists()
