"""fastlm's ops under torch.autocast against the torch ops they replace under the same autocast: the same
output and gradient dtypes (linear layers in the autocast dtype, cross-entropy losses in fp32, fp32
parameters with fp32 gradients) and values within the autocast dtype's rounding; on every backend present
(CPU autocast in bf16; on a GPU, the CUDA kernels under fp16 and bf16 autocast)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import skip_unless_runs
from torch import nn

import fastlm
from fastlm import backends

CASES = [(backend, "cpu", torch.bfloat16) for backend in backends.BACKENDS] + [
    (backend, "cuda", dtype) for backend in ("triton", "cuda") for dtype in (torch.float16, torch.bfloat16)]


def run_both(device, dtype, make_inputs, ours, theirs):
    """Each function on its own copy of the leaves, under autocast: (output, grads) twice."""
    results = []
    for fn in (ours, theirs):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in make_inputs()]
        with torch.autocast(device, dtype=dtype):
            out = fn(*leaves)
        out.float().mul(torch.linspace(0.5, 1.5, out.numel(), device=device).view(out.shape)).sum().backward()
        results.append((out, [leaf.grad for leaf in leaves if leaf.is_floating_point()]))
    return results


def assert_same(ours, theirs, tol):
    (out, grads), (ref_out, ref_grads) = ours, theirs
    assert out.dtype == ref_out.dtype
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=tol, atol=tol * ref_out.abs().max().item())
    for grad, ref in zip(grads, ref_grads):
        assert grad.dtype == ref.dtype
        torch.testing.assert_close(grad.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_cross_entropy_loss_in_fp32(backend, device, dtype):
    skip_unless_runs(backend, device)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 29, generator=generator).to(device, dtype)
    target = torch.randint(0, 29, (37,), generator=generator).to(device)
    ours, theirs = run_both(device, dtype, lambda: [logits],
                            lambda x: fastlm.ops.cross_entropy(x, target, label_smoothing=0.1, backend=backend),
                            lambda x: F.cross_entropy(x, target, label_smoothing=0.1))
    assert ours[0].dtype == torch.float32
    assert_same(ours, theirs, 1e-2)


@pytest.mark.parametrize("backend, device, dtype", CASES)
@pytest.mark.parametrize("input_dtype", [torch.float32, "autocast"])
def test_linear_cross_entropy_linear_in_the_autocast_dtype(backend, device, dtype, input_dtype):
    """fp32 weights with fp32 hidden states, or with hidden states already in the autocast dtype (the
    output of an earlier autocast layer), which outside autocast is a dtype mismatch."""
    skip_unless_runs(backend, device)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(41, 24, generator=generator).to(device, dtype if input_dtype == "autocast" else input_dtype)
    weight = (torch.randn(53, 24, generator=generator) / 5).to(device)
    bias = torch.randn(53, generator=generator).to(device)
    target = torch.randint(0, 53, (41,), generator=generator).to(device)
    ours, theirs = run_both(device, dtype, lambda: [hidden, weight, bias],
                            lambda x, w, b: fastlm.ops.linear_cross_entropy(x, w, target, b, chunk_size=16,
                                                                            backend=backend),
                            lambda x, w, b: F.cross_entropy(F.linear(x, w, b), target))
    assert ours[0].dtype == torch.float32 and ours[1][1].dtype == torch.float32
    assert_same(ours, theirs, 2e-2)


@pytest.mark.parametrize("backend, device, dtype", CASES)
@pytest.mark.parametrize("strategy", ["gather", "table"])
def test_embedding_linear_in_the_autocast_dtype(backend, device, dtype, strategy):
    skip_unless_runs(backend, device)
    generator = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 27, (33, 3), generator=generator).to(device)
    table = torch.randn(27, 10, generator=generator).to(device)
    weight = (torch.randn(64, 30, generator=generator) / 5).to(device)
    bias = torch.randn(64, generator=generator).to(device)
    ours, theirs = run_both(device, dtype, lambda: [table, weight, bias],
                            lambda t, w, b: fastlm.ops.embedding_linear(idx, t, w, b, strategy=strategy,
                                                                        backend=backend),
                            lambda t, w, b: F.linear(F.embedding(idx, t).view(33, -1), w, b))
    assert ours[0].dtype == dtype and all(grad.dtype == torch.float32 for grad in ours[1])
    assert_same(ours, theirs, 2e-2)


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_the_other_half_precision_is_cast_too(backend, device, dtype):
    """Autocast casts every floating tensor but fp64: fp16 parameters under bf16 autocast (and bf16 ones under
    fp16) compute in the autocast dtype, as F.linear does, and keep gradients in their own dtype."""
    skip_unless_runs(backend, device)
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    generator = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 27, (33, 3), generator=generator).to(device)
    table, weight, bias = (torch.randn(27, 10, generator=generator).to(device, other),
                           (torch.randn(64, 30, generator=generator) / 5).to(device, other),
                           torch.randn(64, generator=generator).to(device, other))
    target = torch.randint(0, 64, (33,), generator=generator).to(device)
    for ours, theirs in [
            (lambda t, w, b: fastlm.ops.embedding_linear(idx, t, w, b, backend=backend),
             lambda t, w, b: F.linear(F.embedding(idx, t).view(33, -1), w, b)),
            (lambda t, w, b: fastlm.ops.linear_cross_entropy(t[idx].view(33, -1), w, target, b, backend=backend),
             lambda t, w, b: F.cross_entropy(F.linear(t[idx].view(33, -1), w, b), target))]:
        results = run_both(device, dtype, lambda: [table, weight, bias], ours, theirs)
        assert all(grad.dtype == other for grad in results[0][1])
        assert_same(*results, 2e-2)


def test_float64_is_left_as_it_is():
    """Autocast leaves float64 alone: a float64 embedding + linear stays float64, as F.linear does."""
    skip_unless_runs("cpp")
    idx, table, weight = torch.randint(0, 27, (5, 3)), torch.randn(27, 4, dtype=torch.float64), torch.randn(
        8, 12, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fastlm.ops.embedding_linear(idx, table, weight, backend="cpp")
        theirs = F.linear(F.embedding(idx, table).view(5, -1), weight)
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_batch_norm_takes_the_autocast_dtype_with_fp32_parameters(backend, device, dtype):
    skip_unless_runs(backend, device)
    x = torch.randn(32, 20, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    modules = [cls(20, device=device) for cls in (fastlm.nn.BatchNorm1d, nn.BatchNorm1d)]
    modules[0].backend = backend
    ours, theirs = run_both(device, dtype, lambda: [x], *modules)
    assert ours[0].dtype == dtype
    assert_same(ours, theirs, 2e-2)
    torch.testing.assert_close(modules[0].running_var, modules[1].running_var)


def test_compiles_under_autocast_without_graph_breaks():
    skip_unless_runs("cpp")
    generator = torch.Generator().manual_seed(4)
    idx, target = torch.randint(0, 27, (16, 3), generator=generator), torch.randint(0, 27, (16,), generator=generator)
    table, w1, w2 = (torch.randn(shape, generator=generator).requires_grad_()
                     for shape in [(27, 10), (64, 30), (27, 64)])

    def loss(idx, target):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = torch.tanh(fastlm.ops.embedding_linear(idx, table, w1))
            logits = hidden @ w2.t()
            return fastlm.ops.linear_cross_entropy(hidden, w2, target) + fastlm.ops.cross_entropy(logits, target)

    compiled = torch.compile(loss, fullgraph=True)(idx, target)
    assert compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, loss(idx, target))
