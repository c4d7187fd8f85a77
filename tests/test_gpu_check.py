"""dev/gpu_check.py, the GPU session's one prepared check: --dry_run runs every step on the CPU at tiny size and
writes one report with sane numbers; a failing step is recorded in one line and the next step still runs."""
import importlib.util
import json
import math

import pytest

from conftest import ROOT, ok, run_forked

STEPS = ["tests", "bench", "memory", "train", "sample", "export", "hf_logits"]


def test_dry_run_reports_every_step_ok_with_sane_numbers(tmp_path):
    ok(run_forked("dev/gpu_check.py", "--dry_run", f"--out={tmp_path / 'r.json'}", timeout=300))
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["ok"] and r["dry_run"] and list(r["steps"]) == STEPS and r["environment"]["torch"]
    s = r["steps"]
    for name in STEPS:
        assert s[name]["ok"] and s[name]["seconds"] > 0 and "error" not in s[name], (name, s[name])
    assert s["tests"]["passed"] >= 3 and s["tests"]["failed"] == s["tests"]["errors"] == 0
    b = s["bench"]
    assert b["tok_per_s"] > 0 and b["baseline_tok_per_s"] > 0 and b["ratio"] > 0 and b["mfu"] is None  # CPU: no peak
    assert b["decode_cached_tok_per_s"] > 0 and b["decode_uncached_tok_per_s"] > 0
    assert b["sdpa"].startswith("sdpa: cpu float32,") and b["sdpa"].endswith(": FLASH_ATTENTION")  # v padded
    assert b["json"]["model_config"] == "config/train_tiny.py" and b["json"]["ours"]["flops_per_token"] > 0
    m = s["memory"]
    assert m["estimated_gb"] > m["state_gb"] > 0 and m["activations_gb"] > 0 and m["measured_eager_gb"] is None
    t = s["train"]
    assert t["steps"] == 4 and t["tokens"] == 4 * 512 and t["tok_per_s"] > 0
    assert all(math.isfinite(v) for v in t["losses"].values()) and t["loss_last"] < t["loss_first"] < 20
    assert list(t["val_loss"]) == ["0", "2", "4"] and all(0 < v < 20 for v in t["val_loss"].values())
    sa = s["sample"]
    assert sa["same_text"] and sa["text"].startswith("The mitochondria is") and sa["speculative"]["drafted"] > 0
    assert 0 <= sa["acceptance"] <= 1 and sa["plain"]["decode_tok_per_s"] > 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(s["export"]["files"])
    h = s["hf_logits"]
    assert h["max_abs_diff"] <= 1e-4 and h["top1_agreement"] == 1.0 and h["greedy_equal"] and not h["loading_problems"]
    log = (tmp_path / "r.log").read_text()  # every command's output beside the report
    assert "$ python train.py config/train_tiny.py" in log and "$ python export.py" in log


@pytest.fixture
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "dev" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failed_step_is_one_line_and_the_next_runs(gpu_check, monkeypatch, tmp_path):
    def broken(ctx):
        raise RuntimeError("CUDA error: an illegal memory access\nsecond line")

    def fine(ctx):
        return {"x": 1}

    monkeypatch.setattr(gpu_check, "STEPS", [broken, fine])
    monkeypatch.setattr(gpu_check, "environment", lambda device: {})
    assert gpu_check.main(["--dry_run", f"--out={tmp_path / 'r.json'}"]) == 1
    r = json.loads((tmp_path / "r.json").read_text())
    assert not r["ok"] and r["steps"]["broken"]["error"] == "RuntimeError: CUDA error: an illegal memory access"
    fine_rec = r["steps"]["fine"]
    assert not r["steps"]["broken"]["ok"] and fine_rec == {"ok": True, "seconds": fine_rec["seconds"], "x": 1}
    with pytest.raises(SystemExit, match="unknown step"):
        gpu_check.main(["--dry_run", "--only=nope"])
