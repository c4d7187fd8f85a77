"""checkpoint.py: safe loading, atomic saving, resume onto another device, wrapper prefixes, clear errors."""
import os
import random
from dataclasses import asdict

import numpy as np
import pytest
import torch

import checkpoint as C
from optim import adamw_groups, build_optimizer
from conftest import loss_of, save_ckpt, tiny_cfg, tiny_model


def trained_state(seed=0):
    """A model and optimizer one AdamW step into training (so the optimizer has moments to save)."""
    m = tiny_model(seed)
    opt = adamw(m)
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    loss_of(m(x[:, :-1], x[:, 1:])[1]).backward()
    opt.step()
    return m, opt


def adamw(m):
    return build_optimizer(m, "adamw", 1e-3, 0.1, (0.9, 0.999))


def write_ckpt(path, m, opt, **extra):
    """What train.py writes, at path; the file is opened with torch.load(weights_only=True) by every reader."""
    C.save_checkpoint(path, {"model": m.state_dict(), "optimizer": opt.state_dict(), "model_config": asdict(m.cfg),
                             "config": {}, "step": 7, "tokens": 7 * 512, "best_val_loss": float("inf"),
                             "rng": C.rng_state(), "data": [{"pos": 3}], **extra})
    return path


@pytest.mark.filterwarnings("ignore:.*meta parameter")  # copying into meta tensors is a no-op, as intended
def test_resume_onto_another_device_restores_cpu_rng_state(tmp_path):
    """On a GPU, a checkpoint loaded with map_location=<device> hands torch a non-CPU RNG state (TypeError). Here
    the model lives on the 'meta' device: the file must still be read to the CPU and the RNG state restored."""
    m, opt = trained_state()
    for seed, value in ((torch.manual_seed, 123), (np.random.seed, 5), (random.seed, 9)):
        seed(value)
    state = C.rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    path = write_ckpt(str(tmp_path / "ckpt.pt"), m, opt, rng=state)
    for seed in (torch.manual_seed, np.random.seed, random.seed):
        seed(0)
    meta_model = tiny_model().to("meta")
    meta_opt = torch.optim.AdamW(adamw_groups(list(meta_model.parameters()), 0.1), lr=1e-3)
    rest = C.resume(path, meta_model, meta_opt, tiny_cfg(), world_size=1)
    assert rest["step"] == 7 and rest["data"] == [{"pos": 3}] and "model" not in rest and "optimizer" not in rest
    moments = [t for s in meta_opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    assert moments and all(t.device.type == "meta" for t in moments)  # optimizer state follows the parameters
    assert torch.equal(torch.rand(3), expected[0])  # the RNG streams continue where the checkpoint left them
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_resume_on_a_machine_with_fewer_gpus(tmp_path, monkeypatch):
    """A checkpoint written on 8 GPUs (an older one held one CUDA RNG state per visible GPU) resumes on a machine
    with 1 GPU. Restoring those states by index raised IndexError; training draws nothing from the CUDA RNG, so the
    CPU streams are restored and the CUDA ones left alone."""
    m, opt = trained_state()
    torch.manual_seed(321)
    path = write_ckpt(str(tmp_path / "ckpt.pt"), m, opt, rng={**C.rng_state(), "cuda": [torch.get_rng_state()] * 8})
    expected = torch.rand(3)
    cuda_calls = []

    def one_gpu(states):  # torch.cuda.set_rng_state_all on a 1-GPU machine
        cuda_calls.append(len(states))
        if len(states) > 1:
            raise IndexError("list index out of range")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", one_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a, **k: cuda_calls.append(1))
    fresh = tiny_model()
    C.resume(path, fresh, adamw(fresh), tiny_cfg(), world_size=1)
    assert torch.equal(torch.rand(3), expected) and cuda_calls == [] and torch.equal(fresh.embed.weight, m.embed.weight)


def test_resume_and_load_model_errors(tmp_path):
    m, opt = trained_state()
    path = write_ckpt(str(tmp_path / "ckpt.pt"), m, opt)
    other = tiny_model(dim=48)
    C.save_checkpoint(str(tmp_path / "bad.pt"), {"model": other.state_dict(), "model_config": asdict(m.cfg)})
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for call, match in [
        (lambda: C.resume(path, other, torch.optim.AdamW(other.parameters()), other.cfg, 1),
         "another model config.*dim: checkpoint 32 vs now 48"),
        (lambda: C.resume(path, m, opt, m.cfg, 2), "written by 1 processes, now there are 2"),
        (lambda: C.resume(str(tmp_path / "none.pt"), m, opt, m.cfg, 1), "init_from='resume' but there is no checkpoint"),
        (lambda: C.load_model(str(tmp_path / "nope")), "no checkpoint"),
        (lambda: C.load_model(str(tmp_path / "bad.pt")), "does not fit this model config"),
        (lambda: C.load_model(str(tmp_path / "junk.pt")), "cannot read checkpoint")]:
        with pytest.raises(ValueError, match=match):
            call()


def test_load_model_keeps_only_the_model_on_the_device(tmp_path, monkeypatch):
    """sample.py / hellaswag.py: read to the CPU, move only the model, drop the optimizer moments."""
    m, opt = trained_state()
    write_ckpt(str(tmp_path / "ckpt.pt"), m, opt)
    seen, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("map_location")) or real_load(*a, **k))
    model, info = C.load_model(str(tmp_path), device="meta")
    assert seen == ["cpu"] and all(p.device.type == "meta" for p in model.parameters()) and not model.training
    assert "optimizer" not in info and "model" not in info and info["step"] == 7
    monkeypatch.undo()
    loaded, _ = C.load_model(str(save_ckpt(tmp_path / "plain", m)))  # values, from save_ckpt's minimal checkpoint
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), m.state_dict().values()))


class _Payload:
    """Unpickling this calls open(<marker>, 'w'): a stand-in for any code a malicious ckpt.pt could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_carrying_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "executed"
    m = tiny_model()
    torch.save({"model": m.state_dict(), "model_config": asdict(m.cfg), "extra": _Payload(str(marker))},
               tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="refusing to load") as e:
        C.load_model(str(tmp_path))
    assert "\n" not in str(e.value) and not marker.exists()


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    C.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        C.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no half-written temp file left behind


def test_checkpoint_with_loss_weights_in_its_model_config_still_loads(tmp_path):
    """Checkpoints written while mtp_lambda and balance_alpha were ModelConfig fields carry them in model_config;
    they are training settings now (train.py), so loading drops them and the weights load as before."""
    m, opt = trained_state()
    cfg = {**asdict(m.cfg), "mtp_lambda": 0.3, "balance_alpha": 1e-4}
    path = write_ckpt(str(tmp_path / "ckpt.pt"), m, opt, model_config=cfg)
    loaded, _ = C.load_model(path)
    assert loaded.cfg == m.cfg and torch.equal(loaded.embed.weight, m.embed.weight)
    fresh = tiny_model(seed=1)
    C.resume(path, fresh, adamw(fresh), tiny_cfg(), world_size=1)
    assert torch.equal(fresh.head.weight, m.head.weight)
