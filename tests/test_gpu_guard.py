"""model.grouped_mm_path: which GPUs run the MoE's grouped matmuls with PyTorch's fused kernel (checked on the CPU
through stand-in compute capabilities), and that bench.py and train.py say it when they start on CUDA; model.sdpa_path:
which SDPA kernel MLA's training attention gets (PyTorch's own chooser: on the CPU here, on CUDA under
dev/gpu_check.py, which runs the tests named cuda); non_blocking copies only from pinned memory to the device."""
import ast
from dataclasses import fields

import pytest
import torch

import bench
import model
from configurator import configure
from conftest import ROOT, TINY, tiny_cfg
from model import ModelConfig, grouped_mm_path, sdpa_path


@pytest.mark.parametrize("capability, dtype, fast", [
    ((9, 0), torch.bfloat16, True),     # H100, H200
    ((10, 0), torch.bfloat16, True),    # B200
    ((10, 3), torch.bfloat16, True),    # B300: the minor version is not looked at
    ((8, 0), torch.bfloat16, False),    # A100
    ((8, 6), torch.bfloat16, False),    # RTX 3090
    ((8, 9), torch.bfloat16, False),    # RTX 4090, L4 (fp8 _scaled_mm runs there, grouped_mm's kernel does not)
    ((12, 0), torch.bfloat16, False),   # RTX 5090: not major 9 or 10
    ((9, 0), torch.float32, False),     # dtype='float32' on an H100: the kernel is bf16 only
    ((9, 0), torch.float16, False)])
def test_grouped_mm_path_follows_pytorchs_condition(capability, dtype, fast):
    """PyTorch's _grouped_mm_cuda: the fused kernel iff major is 9 or 10 and the operands are bf16; the line names
    the capability and dtype, and for the fallback says what it costs."""
    got, line = grouped_mm_path(capability, dtype)
    assert got is fast and "\n" not in line
    assert f"capability {capability[0]}.{capability[1]}, {str(dtype)[6:]}:" in line
    assert ("no host sync" in line) == fast
    assert fast or ("copies the expert offsets to the host (a sync)" in line and "one matmul per expert" in line
                    and "the MoE will be slow here" in line)


@pytest.mark.skipif(torch.cuda.is_available(), reason="relies on a CPU build failing at the first CUDA tensor")
@pytest.mark.filterwarnings("ignore:CUDA is not available")  # autocast("cuda") on this CPU build
def test_bench_prints_the_grouped_mm_line_on_cuda(tmp_path, capsys, monkeypatch):
    """bench.py on a (stand-in) A100 says the MoE takes the fallback before it builds anything: the first CUDA
    tensor, which this CPU build cannot make, comes after the line."""
    monkeypatch.setattr(bench, "check_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    config = tmp_path / "tiny.py"
    config.write_text("".join(f"{k} = {v!r}\n" for k, v in TINY.items()) + "compile = False\n")
    with pytest.raises((AssertionError, RuntimeError)):  # torch: not compiled with CUDA
        bench.main([str(config), "--device=cuda", "--dtype=bfloat16"])
    assert grouped_mm_path((8, 0), torch.bfloat16)[1] in capsys.readouterr().out.splitlines()


def cuda_branch_calls(path):
    """The names called inside the `if` blocks of a script whose condition mentions cuda."""
    tree = ast.parse((ROOT / path).read_text())
    return {getattr(n.func, "attr", getattr(n.func, "id", None)) for branch in ast.walk(tree)
            if isinstance(branch, ast.If) and "cuda" in ast.unparse(branch.test)
            for stmt in branch.body for n in ast.walk(stmt) if isinstance(n, ast.Call)}


@pytest.mark.parametrize("path, calls", [("bench.py", {"grouped_mm_path", "get_device_capability"}),
                                         ("train.py", {"grouped_mm_path", "get_device_capability", "sdpa_path",
                                                       "memory_estimate", "memory_lines"})])
def test_scripts_call_the_guard_on_cuda(path, calls):
    """train.py (a script run top to bottom, not callable here) and bench.py call grouped_mm_path with the device's
    capability in a CUDA-only branch; train.py prints the memory estimate there too."""
    assert calls <= cuda_branch_calls(path)


def test_sdpa_path_cpu_flash_with_padded_v_math_without_and_never_math_on_cuda(monkeypatch):
    """sdpa_path asks PyTorch's chooser about the operands MLA itself builds. On the CPU (check_head_dim_size_cpp)
    v padded to the qk head dim gets the flash kernel, and unequal head dims the math kernel, which the line calls
    slow. On a CUDA machine every training config's attention (qk 96 / v 64 and the small ones), bf16 or fp32 with
    gradients, gets a fused kernel (cuDNN or memory-efficient: flash needs equal head dims), never math."""
    assert sdpa_path(tiny_cfg(), "cpu", "float32") == (True, "sdpa: cpu float32, MLA training attention (qk head "
                                                            "dim 12, v head dim 8, v padded to 12): FLASH_ATTENTION")
    monkeypatch.setattr(model, "PAD_V_DEVICES", set())
    fast, line = sdpa_path(tiny_cfg(), "cpu", "bfloat16")
    assert not fast and "(qk head dim 12, v head dim 8): MATH, PyTorch's unfused kernel: slow" in line
    assert "flash kernel needs equal qk and v head dims" in line and "\n" not in line
    if torch.cuda.is_available():
        for path in sorted((ROOT / "config").glob("train_*.py")):
            args = configure({f.name: f.default for f in fields(ModelConfig)}, [str(path)], quiet=True,
                             skip_unknown_file_keys=True)
            cfg = ModelConfig(**{f.name: args[f.name] for f in fields(ModelConfig)})
            for dtype in ("bfloat16", "float32"):
                fast, line = sdpa_path(cfg, "cuda", dtype)
                assert fast and "FLASH" not in line, (path.name, line)


def test_non_blocking_copies_only_from_pinned_memory_to_the_device():
    """PyTorch's copy rules (aten/src/ATen/native/cuda/Copy.cu, copy_kernel_cuda): a non_blocking host-to-device
    copy is asynchronous only from pinned memory (from pageable memory the driver stages it synchronously), and it
    records an event on the pinned block, which the caching host allocator does not hand out again before that event
    (ATen/core/CachingHostAllocator.h, free): so a fresh x.pin_memory() per batch, dropped at once, is safe. A
    non_blocking device-to-host copy returns before the data has arrived. In the product code every non_blocking copy
    is therefore <tensor>.pin_memory().to(device, non_blocking=True), and none goes to the CPU."""
    files = sorted(ROOT.glob("*.py")) + sorted((ROOT / "data").glob("*.py"))
    seen = 0
    for path in files:
        for call in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(call, ast.Call) and any(k.arg == "non_blocking" for k in call.keywords)):
                continue
            seen += 1
            src = ast.unparse(call)
            assert isinstance(call.func, ast.Attribute) and call.func.attr == "to", (path.name, src)
            assert isinstance(call.func.value, ast.Call) and getattr(call.func.value.func, "attr", None) == \
                "pin_memory", (path.name, src)
            assert call.args and "cpu" not in ast.unparse(call.args[0]).lower(), (path.name, src)
    assert seen >= 2  # train.py's x and y
