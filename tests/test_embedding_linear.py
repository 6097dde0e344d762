"""fastlm.ops.embedding_linear / fastlm.nn.EmbeddingLinear against the float64 reference
``F.linear(table[idx].view(B, -1), W, b)``, both strategies, every backend present (Triton through the
interpreter on CPU; its kernel-level tests are in test_embedding_linear_kernels.py)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations, prune
from torch.utils._python_dispatch import TorchDispatchMode

import fastlm
from conftest import (DEVICES, KERNEL_BACKENDS, assert_close_to_reference, assert_second_derivative_raises,
                      device_to_test, opcheck_autograd_op, skip_unless_runs)
from fastlm.ops.embedding_linear import choose_strategy, embedding_linear, kernel_ops

BACKENDS = ["cpp", "triton", "cuda", "torch"]
STRATEGIES = ["gather", "table"]


def make_case(B, T, D, out, V, device, dtype=torch.float32, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=generator)
    if B:
        idx[0] = idx[-1]  # repeated indices in every case
    table = torch.randn(V, D, generator=generator, dtype=torch.float64)
    weight = torch.randn(out, T * D, generator=generator, dtype=torch.float64) / (T * D) ** 0.5
    b = torch.randn(out, generator=generator, dtype=torch.float64) if bias else None
    grad = torch.randn(B, out, generator=generator, dtype=torch.float64)
    to = dict(device=device)
    return (idx.to(**to), table.to(**to), weight.to(**to), None if b is None else b.to(**to), grad.to(**to))


def reference(idx, table, weight, bias, grad, padding_idx=None):
    leaves = [t.clone().requires_grad_() for t in (table, weight)] + ([bias.clone().requires_grad_()] if bias is not None
                                                                      else [])
    gathered = F.embedding(idx, leaves[0], padding_idx=padding_idx).view(idx.shape[0], idx.shape[1] * table.shape[1])
    y = F.linear(gathered, leaves[1], leaves[2] if bias is not None else None)
    y.backward(grad)
    return y.detach(), [leaf.grad for leaf in leaves]


def run_fastlm(idx, table, weight, bias, grad, dtype, **options):
    leaves = [t.to(dtype, copy=True).requires_grad_() for t in (table, weight)] + (
        [bias.to(dtype, copy=True).requires_grad_()] if bias is not None else [])
    y = embedding_linear(idx, leaves[0], leaves[1], leaves[2] if bias is not None else None, **options)
    y.backward(grad.to(dtype))
    return y.detach(), [leaf.grad for leaf in leaves]


def term_sizes(idx, table, weight, bias, grad):
    """The reference on the inputs' absolute values: for each element of the output and of each gradient, the sum
    of its terms' magnitudes, which its rounding error is relative to (a result that cancels to near zero is not:
    a lone output of B = 1, out = 1 at -5e-5 is off by 1.5e-7 in fp32)."""
    return reference(idx, table.abs(), weight.abs(), None if bias is None else bias.abs(), grad.abs())


def assert_matches(got, want, dtype, terms=None):
    """``got`` against the reference ``want``; with ``terms`` (term_sizes), each tensor within the tolerance of
    its largest term sum too."""
    sizes = [0.0] * (1 + len(want[1])) if terms is None else [t.abs().max().item() for t in (terms[0], *terms[1])]
    for g, w, size in zip((got[0], *got[1]), (want[0], *want[1]), sizes):
        assert_close_to_reference(g, w, dtype, magnitude=size)


GRID = [  # (B, T, D, out, V): the issue's ranges, crossed sparsely; on the CPU the gather strategy's products run
    # on fastlm's small-matrix kernel up to 512k multiply-adds and, from 64 rows, up to 2M (257 x 30 x 200), and
    # on the BLAS above (257 x 512 x 27)
    (1, 1, 2, 1, 1), (32, 3, 10, 200, 27), (257, 8, 64, 27, 1000), (32, 8, 2, 1, 27), (257, 1, 10, 200, 1),
    (1, 3, 64, 27, 1000), (257, 3, 2, 200, 27), (257, 3, 10, 200, 27),
]


@pytest.mark.parametrize("shape", GRID, ids=lambda s: "B{}T{}D{}out{}V{}".format(*s))
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(backend, device, strategy, shape):
    skip_unless_runs(backend, device)
    case = make_case(*shape, device)
    got = run_fastlm(*case, torch.float32, strategy=strategy, backend=backend)
    assert_matches(got, reference(*case), torch.float32)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cpp_over_several_blocks_of_rows(strategy, bias):
    """The CPU gather-GEMM packs 2^20 / (T*D) rows at a time: 600 rows of T*D = 4096 make two blocks of 256 and a
    last one of 88, each multiplied with its own rows of dY in the backward; D = 512 also splits the scatter into
    the table's gradient between the threads."""
    skip_unless_runs("cpp")
    case = make_case(600, 8, 512, 8, 50, "cpu", bias=bias)
    got = run_fastlm(*case, torch.float32, strategy=strategy, backend="cpp")
    assert_matches(got, reference(*case), torch.float32)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_padding_idx_no_bias_int32(backend, device, strategy):
    skip_unless_runs(backend, device)
    idx, table, weight, _, grad = make_case(33, 3, 10, 27, 27, device, bias=False)
    idx = idx.clone()
    idx[::3, 1] = 5  # the padding row is used
    got = run_fastlm(idx.int(), table, weight, None, grad, torch.float32, strategy=strategy, backend=backend,
                     padding_idx=5)
    want = reference(idx, table, weight, None, grad, padding_idx=5)
    assert_matches(got, want, torch.float32)
    assert torch.all(got[1][0][5] == 0)
    # a negative padding_idx counts from the end, as in F.embedding: -1 is the last row
    idx[::3, 1] = 26
    got = run_fastlm(idx, table, weight, None, grad, torch.float32, strategy=strategy, backend=backend, padding_idx=-1)
    assert_matches(got, reference(idx, table, weight, None, grad, padding_idx=-1), torch.float32)
    assert torch.all(got[1][0][26] == 0)
    # and -V, the first row, as nn.Embedding takes it
    idx[::3, 1] = 0
    got = run_fastlm(idx, table, weight, None, grad, torch.float32, strategy=strategy, backend=backend, padding_idx=-27)
    assert_matches(got, reference(idx, table, weight, None, grad, padding_idx=-27), torch.float32)
    assert torch.all(got[1][0][0] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_half_precision_on_gpu(backend, strategy, dtype):
    skip_unless_runs(backend, "cuda")
    case = make_case(257, 8, 64, 200, 1000, "cuda")
    got = run_fastlm(*case, dtype, strategy=strategy, backend=backend)
    assert_matches(got, reference(*case), dtype)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B, T", [(0, 3), (7, 0)], ids=["empty-batch", "no-context"])
def test_empty_dimensions(B, T, backend, device, strategy):
    """What F.linear(F.embedding(...)) gives: B = 0, a (0, out) output and zero gradients; T = 0, the bias as
    output, its gradient the sum of dY's rows, the table's and weight's zero."""
    skip_unless_runs(backend, device)
    idx, table, weight, bias, grad = make_case(B, T, 4, 5, 27, device)
    got = run_fastlm(idx, table, weight, bias, grad, torch.float32, strategy=strategy, backend=backend)
    assert got[0].shape == (B, 5)
    assert_matches(got, reference(idx, table, weight, bias, grad), torch.float32)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, strategy):
    """Transposed weight and table, every other column of idx."""
    device = device_to_test(backend)
    idx, table, weight, bias, grad = make_case(33, 6, 4, 5, 27, device)
    idx = idx[:, ::2]
    table, weight = table.t().contiguous().t(), weight[:, :12].t().contiguous().t()
    assert not (idx.is_contiguous() or table.is_contiguous() or weight.is_contiguous())
    assert_matches(run_fastlm(idx, table, weight, bias, grad, torch.float64, strategy=strategy, backend=backend),
                   reference(idx, table, weight, bias, grad), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_parameters_get_no_gradient(backend):
    """requires_grad=False on the table and bias: only the weight gets a gradient, the right one."""
    device = device_to_test(backend)
    idx, table, weight, bias, grad = make_case(17, 3, 4, 5, 27, device)
    weight = weight.clone().requires_grad_()
    embedding_linear(idx, table, weight, bias, backend=backend).backward(grad)
    _, (_, want, _) = reference(idx, table, weight.detach(), bias, grad)
    assert table.grad is None and bias.grad is None
    assert_close_to_reference(weight.grad, want, torch.float64)


@pytest.fixture
def deterministic_asked(monkeypatch) -> list[bool]:
    """What the Triton kernels are asked for at each scatter (deterministic or not), recorded; the interpreter's
    atomic path, a GPU's, is forced on whenever it is asked for, as on a GPU."""
    from fastlm.kernels import embedding_linear as kernels

    asked = []
    monkeypatch.setattr(kernels, "_use_atomics", lambda deterministic, device: asked.append(deterministic) or
                        not deterministic)
    return asked


def test_the_layer_asks_for_the_atomic_scatter_as_built(deterministic_asked):
    """EmbeddingLinear(atomic_scatter=True) hands the option to the op (the kernels see it asked for), as the
    functional call does (below)."""
    device = device_to_test("triton")
    asked = deterministic_asked
    for atomic_scatter in (True, False):
        asked.clear()
        layer = fastlm.nn.EmbeddingLinear(27, 4, 3, 5, atomic_scatter=atomic_scatter, backend="triton").to(device)
        layer(torch.randint(0, 27, (40, 3), device=device)).sum().backward()
        assert asked and set(asked) == {not atomic_scatter}


def test_atomic_scatter_is_opt_in_and_off_under_deterministic_algorithms(deterministic_asked):
    """What the public API hands the kernels: the atomic scatter only with atomic_scatter=True, and never while
    torch.use_deterministic_algorithms(True) is on. Run on the Triton kernels (on a GPU, or through the
    interpreter); the gradients stay right either way."""
    device = device_to_test("triton")
    asked = deterministic_asked
    idx, table, weight, bias, grad = make_case(40, 3, 4, 5, 27, device)
    want = reference(idx, table, weight, bias, grad)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        for atomic_scatter, deterministic_algorithms, expected in [(False, False, True), (True, False, False),
                                                                   (True, True, True)]:
            torch.use_deterministic_algorithms(deterministic_algorithms)
            asked.clear()
            got = run_fastlm(idx, table, weight, bias, grad, torch.float64, atomic_scatter=atomic_scatter,
                             backend="triton")
            assert asked and set(asked) == {expected}
            assert_matches(got, want, torch.float64)
        # Deterministic mode switched on between the forward and the backward: the backward obeys it.
        torch.use_deterministic_algorithms(False)
        y = embedding_linear(idx, table.clone().requires_grad_(), weight, bias, atomic_scatter=True, backend="triton")
        torch.use_deterministic_algorithms(True)
        asked.clear()
        y.backward(grad)
        assert asked and set(asked) == {True}
    finally:
        torch.use_deterministic_algorithms(deterministic_before)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(backend, device, strategy):
    skip_unless_runs(backend, device)
    idx, table, weight, bias, grad = make_case(257, 3, 10, 27, 5, device)  # many repeats of each token
    first = run_fastlm(idx, table, weight, bias, grad, torch.float32, strategy=strategy, backend=backend)
    second = run_fastlm(idx, table, weight, bias, grad, torch.float32, strategy=strategy, backend=backend)
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
@pytest.mark.parametrize("device", DEVICES)
def test_one_frequent_token(backend, device, strategy, dtype):
    """Token 0 at nearly every position, as '.' pads the names' contexts: the Triton and CUDA scatters cut its
    long segment into pieces added in order. Exact against the reference, bitwise repeatable, and zero where
    token 0 is the padding_idx."""
    skip_unless_runs(backend, device)
    idx, table, weight, bias, grad = make_case(257, 8, 10, 27, 4, device)
    idx = torch.zeros_like(idx)
    idx[::7, 3] = 2
    case = (idx, table, weight, bias, grad)
    first = run_fastlm(*case, dtype, strategy=strategy, backend=backend)
    assert_matches(first, reference(*case), dtype)
    second = run_fastlm(*case, dtype, strategy=strategy, backend=backend)
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)
    padded = run_fastlm(*case, dtype, strategy=strategy, backend=backend, padding_idx=0)
    assert_matches(padded, reference(*case, padding_idx=0), dtype)
    assert torch.all(padded[1][0][0] == 0)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradcheck(backend, strategy):
    device = device_to_test(backend)
    idx, table, weight, bias, _ = make_case(7, 3, 2, 4, 5, device)
    params = [t.clone().requires_grad_() for t in (table, weight, bias)]
    assert torch.autograd.gradcheck(lambda t, w, b: embedding_linear(idx, t, w, b, strategy=strategy, backend=backend),
                                     params)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_forward_reads_a_strided_bias_at_its_stride(backend):
    """A bias that is every other entry of a buffer gives, on both strategies, what F.linear gives with it."""
    device = device_to_test(backend)
    idx, table, weight, _, _ = make_case(6, 3, 4, 5, 11, device)
    bias = torch.randn(10, dtype=table.dtype, device=device)[::2]
    want = F.linear(F.embedding(idx, table).reshape(6, -1), weight, bias)
    for strategy in (0, 1):
        assert_close_to_reference(kernel_ops(backend).forward(idx, table, weight, bias, strategy), want, table.dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    device = device_to_test(backend)
    ops = kernel_ops(backend)
    idx, table, weight, bias, grad = (t.float() if t.is_floating_point() else t
                                      for t in make_case(9, 3, 4, 5, 6, device))
    for strategy in (0, 1):
        torch.library.opcheck(ops.forward, (idx, table, weight, bias, strategy))
        for has_bias in (True, False):  # without a bias its gradient is an empty tensor
            torch.library.opcheck(ops.backward, (grad, idx, table, weight, has_bias, strategy, 2, True))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_autograd_op_opcheck(backend, with_bias):
    """fastlm::embedding_linear, the C++ autograd op every kernel backend runs: schema, fake, autograd
    registration and AOT tracing (what torch.compile needs)."""
    device = device_to_test(backend)
    idx, table, weight, bias, _ = make_case(9, 3, 4, 5, 6, device, bias=with_bias)
    for strategy in (0, 1):
        table, weight, bias = (None if t is None else t.float().requires_grad_() for t in (table, weight, bias))
        opcheck_autograd_op(torch.ops.fastlm.embedding_linear.default,
                            (idx, table, weight, bias, strategy, 2, True, backend == "triton"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_raises(backend):
    """The backward is not differentiable: a second derivative through it raises instead of coming out zero."""
    device = device_to_test(backend)
    idx, table, weight, bias, _ = make_case(9, 3, 4, 5, 6, device)
    table, weight = table.requires_grad_(), weight.requires_grad_()
    y = embedding_linear(idx, table, weight, bias, backend=backend)
    assert_second_derivative_raises((y ** 2).sum(), weight)
    assert_second_derivative_raises(embedding_linear(idx, table, weight, bias, backend=backend).sum(), weight)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inference_mode(backend):
    device = device_to_test(backend)
    idx, table, weight, bias, _ = (t.float() if t.is_floating_point() else t for t in make_case(9, 3, 4, 5, 6, device))
    with torch.inference_mode():
        got = embedding_linear(idx, table, weight, bias, backend=backend)
    assert_close_to_reference(got, F.linear(table[idx].view(9, -1), weight, bias), torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_has_no_graph_break(backend):
    device = device_to_test(backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    fused = fastlm.nn.EmbeddingLinear(27, 10, 3, 20, device=device, backend=backend)
    model = torch.compile(nn.Sequential(fused, nn.Tanh()), fullgraph=True)
    idx = torch.randint(0, 27, (16, 3), device=device)
    out = model(idx)
    out.sum().backward()
    embedding, linear = fused.to_modules()
    expected = torch.tanh(linear(embedding(idx).view(16, -1)))
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.embedding.weight.grad, embedding.weight.grad, rtol=1e-5, atol=1e-5)


def test_dynamic_batch_traces_without_pinning_its_size():
    """With a symbolic batch, the strategy is chosen without a branch on its size: torch.compile(dynamic=True)
    traces one graph for every batch size and torch.export takes an unbounded batch dimension (each failed on a
    guard on the batch size); the product table where it wins over the whole range the trace allows."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    fused = fastlm.nn.EmbeddingLinear(27, 10, 3, 200)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fused, dynamic=True, fullgraph=True, backend=counter)
    for batch in (5, 32, 4096):
        idx = torch.randint(0, 27, (batch, 3))
        torch.testing.assert_close(compiled(idx), fused(idx))
    assert counter.frame_count == 1

    def strategies(program):
        op = torch.ops.fastlm.embedding_linear.default
        return [node.args[4] for node in program.graph.nodes if node.target == op]

    unbounded = torch.export.export(fused, (torch.randint(0, 27, (4096, 3)),),
                                    dynamic_shapes={"idx": {0: torch.export.Dim("batch")}})
    assert strategies(unbounded) == [0]  # the gather-GEMM: a small batch is possible
    large = torch.export.export(fused, (torch.randint(0, 27, (4096, 3)),),
                                dynamic_shapes={"idx": {0: torch.export.Dim("batch", min=4000)}})
    assert strategies(large) == [1]
    for program, batches in ((unbounded, (5, 4096)), (large, (4000, 5000))):
        for batch in batches:
            idx = torch.randint(0, 27, (batch, 3))
            torch.testing.assert_close(program.module()(idx), fused(idx))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # torch's, for the embedding's integer input
@pytest.mark.parametrize("submodule", ["embedding", "linear"])
@pytest.mark.parametrize("how", ["prune", "weight_norm", "forward_hook", "backward_pre_hook"])
def test_pruned_or_hooked_submodules_like_torch(how, submodule):
    """Pruning computes a submodule's weight in a forward pre-hook, which the fused op never ran: the weight stayed
    the one pruning first made (after an SGD step the loss was 500 against torch's 4583, and the next backward
    failed). With hooks on either submodule the layer calls its submodules, unfused; a parametrization
    (weight_norm) needs no hook and stays fused."""
    torch.manual_seed(15)
    fused = fastlm.nn.EmbeddingLinear(11, 4, 3, 7)
    embedding, linear = fused.to_modules()
    calls = []
    for module in (getattr(fused, submodule), {"embedding": embedding, "linear": linear}[submodule]):
        if how == "prune":
            prune.l1_unstructured(module, "weight", amount=0.4)
        elif how == "weight_norm":
            parametrizations.weight_norm(module, "weight")
        elif how == "forward_hook":
            module.register_forward_hook(lambda module, args, out: calls.append(out.shape) or out * 2)
        else:
            module.register_full_backward_pre_hook(lambda module, grad_out: calls.append(1) or (grad_out[0] * 2,))
    idx = torch.randint(0, 11, (5, 3))
    for _ in range(3):  # SGD steps: each forward must read the weight as updated
        losses = [fused(idx).square().sum(), linear(embedding(idx).flatten(1)).square().sum()]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
        for loss, model in zip(losses, (fused, nn.ModuleList([embedding, linear]))):
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
    assert len(calls) == (6 if how.endswith("hook") else 0)


def test_module_round_trips_torch_modules_exactly():
    embedding = nn.Embedding(27, 10, padding_idx=0)
    linear = nn.Linear(30, 200)
    fused = fastlm.nn.EmbeddingLinear.from_modules(embedding, linear)
    assert fused.context == 3 and fused.embedding.weight is embedding.weight
    assert set(fused.state_dict()) == {"embedding.weight", "linear.weight", "linear.bias"}
    fresh = fastlm.nn.EmbeddingLinear(27, 10, 3, 200, padding_idx=0)
    fresh.load_state_dict(fused.state_dict())
    back_embedding, back_linear = fresh.to_modules()
    assert torch.equal(back_embedding.weight, embedding.weight) and torch.equal(back_linear.weight, linear.weight)
    assert torch.equal(back_linear.bias, linear.bias) and back_embedding.padding_idx == 0
    idx = torch.randint(0, 27, (5, 3))
    idx[1, 2] = 0
    torch.testing.assert_close(fresh(idx), linear(embedding(idx).view(5, -1)))
    fused(idx).sum().backward()  # the padding row gets no gradient, as through nn.Embedding
    assert torch.all(embedding.weight.grad[0] == 0) and embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("option", [dict(max_norm=1.0), dict(scale_grad_by_freq=True), dict(sparse=True)])
def test_from_modules_refuses_embedding_options_it_lacks(option):
    """An embedding whose lookup is not the plain one would give other outputs or gradients: refused."""
    with pytest.raises(ValueError, match=f"no {next(iter(option))}"):
        fastlm.nn.EmbeddingLinear.from_modules(nn.Embedding(27, 10, **option), nn.Linear(30, 7))


@pytest.mark.parametrize("option", ["max_norm", "scale_grad_by_freq", "sparse"])
def test_embedding_options_set_later_run_the_torch_lookup(option):
    """from_modules refuses these options, but one set on the layer's embedding afterwards was ignored: max_norm
    renormalised nothing (outputs off by 1.03), scale_grad_by_freq and sparse changed no gradient."""
    torch.manual_seed(16)
    fused = fastlm.nn.EmbeddingLinear(11, 4, 3, 7)
    embedding, linear = fused.to_modules()
    for module in (fused.embedding, embedding):
        setattr(module, option, 0.5 if option == "max_norm" else True)
    idx = torch.tensor([[1, 1, 2], [1, 5, 5]])
    out, expected = fused(idx), linear(embedding(idx).flatten(1))
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert fused.embedding.weight.grad.is_sparse == (option == "sparse")
    torch.testing.assert_close(fused.embedding.weight.grad.to_dense(), embedding.weight.grad.to_dense())
    torch.testing.assert_close(fused.embedding.weight, embedding.weight)  # max_norm renormalises rows in place


def test_module_options_are_checked_when_built():
    with pytest.raises(ValueError, match="strategy must be"):
        fastlm.nn.EmbeddingLinear(27, 10, 3, 7, strategy="dense")
    with pytest.raises(TypeError, match="unexpected keyword"):
        fastlm.nn.EmbeddingLinear.from_modules(nn.Embedding(27, 10), nn.Linear(30, 7), stratgy="table")
    with pytest.raises(TypeError, match="nn.Embedding and an nn.Linear"):
        fastlm.nn.EmbeddingLinear.from_modules(nn.Embedding(27, 10), nn.Conv1d(30, 7, 1))
    with pytest.raises(ValueError, match=r"in_features \(31\) is not a multiple of the embedding dimension \(10\)"):
        fastlm.nn.EmbeddingLinear.from_modules(nn.Embedding(27, 10), nn.Linear(31, 7))
    layer = fastlm.nn.EmbeddingLinear.from_modules(nn.Embedding(27, 10), nn.Linear(30, 7), strategy="table")
    assert "strategy='table'" in repr(layer) and layer.strategy == "table"


@pytest.mark.parametrize("strategy, runs", [(None, 0), ("gather", 0), ("table", 1)])
def test_module_runs_the_strategy_it_was_given(strategy, runs):
    """A layer built with a strategy runs it where the other would be chosen (at batch 5 the gather-GEMM wins);
    the two give one result, so the op's strategy argument (0 gather, 1 table) tells which ran."""
    skip_unless_runs("cpp")
    seen = []

    class RecordStrategy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.fastlm.embedding_linear.default, torch.ops.fastlm.embedding_linear_forward.default):
                seen.append(args[4])
            return func(*args, **(kwargs or {}))

    layer = fastlm.nn.EmbeddingLinear(27, 10, 3, 200, strategy=strategy, backend="cpp")
    with RecordStrategy():
        layer(torch.randint(0, 27, (5, 3)))
    assert seen and set(seen) == {runs}


def test_strategy_choice_follows_the_multiply_add_count():
    assert choose_strategy(batch=4096, vocab=27, dim=64, context=8, out=1024) == "table"
    assert choose_strategy(batch=4096, vocab=50000, dim=64, context=8, out=1024) == "gather"
    assert choose_strategy(batch=1, vocab=27, dim=10, context=3, out=200) == "gather"
    # the makemore layer: the table's fixed cost outweighs its savings until a few hundred rows (measured: they
    # meet near B=256; TABLE_FIXED_MACS puts the switch between 256 and 320)
    assert [choose_strategy(batch=b, vocab=27, dim=10, context=3, out=200) for b in (32, 64, 128, 256, 320, 512)] == [
        "gather", "gather", "gather", "gather", "table", "table"]


@pytest.mark.parametrize("bad", [-1, 27, 1000])
@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda", "torch"])
@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_index_raises_index_error(backend, device, bad):
    skip_unless_runs(backend, device)
    idx, table, weight, bias, _ = make_case(8, 3, 4, 5, 27, device)
    idx[3, 1] = bad
    for strategy in STRATEGIES:
        with pytest.raises(IndexError, match=str(bad)):
            embedding_linear(idx, table.float(), weight.float(), bias.float(), strategy=strategy, backend=backend)


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda", "torch"])
def test_out_of_range_index_raises_index_error_under_torch_compile(backend):
    device = device_to_test(backend)
    torch._dynamo.reset()
    idx, table, weight, bias, _ = (t.float() if t.is_floating_point() else t for t in make_case(8, 3, 4, 5, 27, device))
    layer = torch.compile(lambda i: embedding_linear(i, table, weight, bias, backend=backend), fullgraph=True)
    torch.testing.assert_close(layer(idx), F.linear(table[idx].view(8, -1), weight, bias))
    idx[2, 2] = 27
    with pytest.raises(IndexError, match="27"):
        layer(idx)


def test_cpp_kernel_op_called_directly_on_tensors_that_require_grad():
    """The kernel op (below fastlm::embedding_linear's autograd) runs its BLAS products below autograd, on the
    large path too, when a user calls it directly on parameters."""
    skip_unless_runs("cpp")
    idx, table, weight, bias, _ = (t.float() if t.is_floating_point() else t
                                   for t in make_case(700, 3, 10, 200, 27, "cpu"))  # past the small-product path
    weight, bias = weight.requires_grad_(), bias.requires_grad_()
    for strategy in (0, 1):
        y = torch.ops.fastlm.embedding_linear_forward(idx, table, weight, bias, strategy)
        torch.testing.assert_close(y, F.linear(table[idx].view(700, -1), weight, bias).detach())


def test_bad_inputs_are_refused_clearly():
    idx, table, weight, bias, _ = (t.float() if t.is_floating_point() else t for t in make_case(8, 3, 4, 5, 27, "cpu"))
    cases = [
        ((idx[:, 0], table, weight, bias), ValueError, "idx must be 2D"),
        ((idx.float(), table, weight, bias), TypeError, "int64 or int32"),
        ((idx, table, weight[:, :-1], bias), ValueError, r"T\*D"),
        ((idx, table, weight.double(), bias), TypeError, "one dtype"),
        ((idx, table, weight, bias[:-1]), ValueError, "bias must have"),
        ((idx, table, weight, bias.double()), TypeError, "bias .* must have one dtype"),
        ((idx, table.to("meta"), weight, bias), ValueError, "is on meta"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            embedding_linear(*args)
    with pytest.raises(ValueError, match="strategy must be one of"):
        embedding_linear(idx, table, weight, bias, strategy="dense")
    for padding_idx in (27, -28):  # nn.Embedding(27, ...) takes [-27, 27)
        with pytest.raises(ValueError, match="padding_idx must be within the table's 27 rows"):
            embedding_linear(idx, table, weight, bias, padding_idx=padding_idx)


def test_shapes_cover_the_issue_ranges():
    """The grid above crosses every value the issue names at least once."""
    for position, values in enumerate([(1, 32, 257), (1, 3, 8), (2, 10, 64), (1, 27, 200), (1, 27, 1000)]):
        assert set(values) <= {shape[position] for shape in GRID}


# --- property test -------------------------------------------------------------------------------------



@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 130), T=st.integers(1, 4), D=st.integers(1, 20), out=st.integers(1, 70),
       V=st.integers(1, 40), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1))
def test_cpp_small_products_match_the_reference_on_random_shapes(B, T, D, out, V, dtype, seed):
    """The gather strategy on the CPU at these sizes runs fastlm's register-tiled products (small_matmul.h):
    random shapes cross its 6-row tiles, its two-vector strips and their zero-padded right edges."""
    skip_unless_runs("cpp")
    case = make_case(B, T, D, out, V, "cpu", seed=seed)
    assert_matches(run_fastlm(*case, dtype, strategy="gather", backend="cpp"), reference(*case), dtype,
                   term_sizes(*case))
