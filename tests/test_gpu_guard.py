"""model.grouped_mm_path: which GPUs run the MoE's grouped matmuls with PyTorch's fused kernel (checked on the CPU
through stand-in compute capabilities), and that bench.py and train.py say it when they start on CUDA."""
import ast

import pytest
import torch

import bench
from conftest import ROOT, TINY
from model import grouped_mm_path


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
                                         ("train.py", {"grouped_mm_path", "get_device_capability",
                                                       "memory_estimate", "memory_lines"})])
def test_scripts_call_the_guard_on_cuda(path, calls):
    """train.py (a script run top to bottom, not callable here) and bench.py call grouped_mm_path with the device's
    capability in a CUDA-only branch; train.py prints the memory estimate there too."""
    assert calls <= cuda_branch_calls(path)
