"""The Triton launchers (kernels/<family>.py) run on their tensors' GPU: Triton launches on the current CUDA device,
and a model may live on another one (kernels/launch.py's on_tensor_device)."""

import inspect
import types

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import backends

if backends.why_unavailable("triton") is not None:
    pytest.skip(backends.why_unavailable("triton"), allow_module_level=True)

from fastlm.kernels import batch_norm, cross_entropy, embedding_linear, launch  # noqa: E402

FAMILIES = (batch_norm, cross_entropy, embedding_linear)


def launchers(module):
    """A family's public launchers: the functions named after it (batch_norm_forward, ...)."""
    family = module.__name__.rsplit(".", 1)[1]
    return {name: value for name, value in vars(module).items()
            if name.startswith(family + "_") and inspect.isfunction(value)}


@pytest.mark.parametrize("module", FAMILIES, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_every_launcher_runs_on_its_tensors_gpu(module):
    found = launchers(module)
    assert found, f"no launchers found in {module.__name__}"
    wrapper_code = launch.on_tensor_device(print).__code__
    for name, function in found.items():
        assert function.__code__ is wrapper_code and hasattr(function, "__wrapped__"), name


def test_a_launcher_makes_its_tensors_gpu_current_and_leaves_cpu_tensors_alone(monkeypatch):
    entered = []

    class RecordedDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", RecordedDevice)
    launched = launch.on_tensor_device(lambda tensor, scale: (list(entered), scale))
    second_gpu = types.SimpleNamespace(device=torch.device("cuda", 1))
    assert launched(second_gpu, scale=2) == ([torch.device("cuda", 1)], 2)
    assert entered == [torch.device("cuda", 1), "exit"]
    entered.clear()
    assert launched(torch.zeros(1), 3) == ([], 3)
    assert entered == []


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_ops_on_the_second_gpu_while_the_first_is_current():
    device = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    logits = torch.randn(37, 1001, device=device, requires_grad=True)
    target = torch.randint(0, 1001, (37,), device=device)
    loss = fastlm.ops.cross_entropy(logits, target, backend="triton")
    (grad,) = torch.autograd.grad(loss, logits)
    expected = F.cross_entropy(logits, target)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, logits)[0])
    x = torch.randn(33, 7, device=device)
    stats = [torch.zeros(7, device=device), torch.ones(7, device=device)]
    torch.testing.assert_close(fastlm.ops.batch_norm(x, *stats, training=True, backend="triton"),
                               F.batch_norm(x, None, None, training=True))
    idx = torch.randint(0, 27, (32, 3), device=device)
    table, weight = torch.randn(27, 10, device=device), torch.randn(200, 30, device=device)
    torch.testing.assert_close(fastlm.ops.embedding_linear(idx, table, weight, backend="triton"),
                               F.linear(table[idx].view(32, -1), weight), rtol=1e-3, atol=1e-3)
    torch.cuda.synchronize(device)
