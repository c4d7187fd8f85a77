"""
Forward+backward time of MLA's training attention for each SDPA backend, at a config's shapes: a developer's probe
(not part of the training path), kept for the GPU runs. It chose to pad v to the qk head dim on the CPU, where
SDPA's flash kernel needs equal head dims (measured figures: docs/results.md).

    python dev/sdpa_backends.py config/train_fineweb.py --batch_size=8          # CUDA, bf16
    python dev/sdpa_backends.py config/train_tiny.py --device=cpu --dtype=float32

A backend that cannot take these shapes on this device prints n/a.
"""
import sys
import warnings
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import timed  # noqa: E402
from configurator import configure  # noqa: E402
from model import DTYPES, ModelConfig  # noqa: E402

BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def median_ms(step, device, n=7):
    return 1e3 * sorted(timed(step, 1, device) for _ in range(n))[n // 2]


def main(argv):
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    defaults.update(batch_size=8, device="cuda" if torch.cuda.is_available() else "cpu",
                    dtype="bfloat16" if torch.cuda.is_available() else "float32")
    args = configure(defaults, argv, quiet=True, skip_unknown_file_keys=True)
    cfg = ModelConfig(**{f.name: args[f.name] for f in fields(ModelConfig)})
    device, dtype = torch.device(args["device"]), DTYPES[args["dtype"]]
    B, H, T, dqk, dv = args["batch_size"], cfg.n_heads, cfg.max_seq_len, cfg.qk_head_dim, cfg.v_head_dim
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, H, T, dqk, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g).to(device, dtype).requires_grad_()
    warnings.filterwarnings("ignore", message=".*[Ff]lash attention")  # the backends that refuse say so
    for pad in ([False, True] if dv != dqk else [False]):
        for name, backend in BACKENDS.items():
            def step():
                vv = F.pad(v, (0, dqk - dv)) if pad else v
                o = F.scaled_dot_product_attention(q, k, vv, is_causal=True)
                o[..., :dv].float().square().mean().backward()
            try:
                with sdpa_kernel(backend) if backend is not None else nullcontext():
                    step()
                    ms = f"{median_ms(step, device):.3f} ms"
            except RuntimeError:
                ms = "n/a"
            print(f"{name + (' (v padded)' if pad else ''):22s} {ms}  (B {B}, heads {H}, T {T}, qk {dqk}, v {dv}, "
                  f"{args['dtype']}, {device})")


if __name__ == "__main__":
    main(sys.argv[1:])
