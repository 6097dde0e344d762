"""Shared test helpers: which backends can run here, comparisons with float64 references, and checks several
op families share (double backward, one graph for every batch size, which fastlm ops ran).

Without a GPU the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1, set here before
any kernel module is imported), so every backend's code is exercised on CPU.
"""

import faulthandler
import inspect
import os
import socket
import time
from contextlib import contextmanager
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every gloo rank the tests start (spawned, or under torchrun) talks over this machine's loopback: by default
# gloo takes the address the host name resolves to, which a sandboxed machine may not let a process reach
# itself on (a connection that waits out gloo's timeout instead of failing). A machine without "lo" is left
# to gloo's own choice.
try:
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
except OSError:  # a sandbox that lists no interfaces
    pass

import torch._dynamo.testing  # noqa: E402  (it imports triton, which reads TRITON_INTERPRET once)
from fastlm import backends  # noqa: E402
from fastlm.check import TOLERANCE  # noqa: E402  (the tolerances fastlm check holds every backend to)

DEVICES = ["cpu", "cuda"]


def skip_unless_runs(backend: str, device: str = "cpu") -> None:
    """Skip (with the reason) unless ``backend`` can run on ``device`` on this machine."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = backends.why_unavailable(backend)
    if reason:
        pytest.skip(reason)
    if not backends.runs_on(backend, torch.device(device)):
        pytest.skip(f"the {backend} backend does not run on {device} tensors")


KERNEL_BACKENDS = ["cpp", "cuda", "triton"]

# For the tests of BatchNorm's bias=False, a keyword torch's BatchNorm gained after 2.11 (the GPU machines' torch).
needs_batch_norm_bias_keyword = pytest.mark.skipif(
    "bias" not in inspect.signature(torch.nn.BatchNorm1d).parameters,
    reason="this torch's BatchNorm has no bias keyword (torch 2.11 has none)")


def assert_second_derivative_raises(loss: torch.Tensor, wrt: torch.Tensor) -> None:
    """A fused op's backward is once-differentiable: differentiating the gradient it gave must raise instead of
    coming out zero (or dropping the second-order term), whether or not the upstream gradient ``loss`` gives the
    op itself needs a gradient."""
    (grad,) = torch.autograd.grad(loss, wrt, create_graph=True)
    penalty = (grad * torch.rand_like(grad)).sum()
    with pytest.raises(RuntimeError, match="cannot be differentiated"):  # asked for wrt's gradient alone
        torch.autograd.grad(penalty + wrt.sum(), wrt, retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated"):
        penalty.backward()


def device_of(backend: str) -> str:
    """Where a kernel backend's tests run: the GPU for cuda and (where there is one) triton, else the CPU."""
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def device_to_test(backend: str) -> str:
    """device_of(backend), skipping (with the reason) where the backend cannot run there: the first line of a test
    that runs on every backend, each on its own device."""
    device = device_of(backend)
    skip_unless_runs(backend, device)
    return device


def fastlm_ops_called(fn) -> list[str]:
    """The fastlm:: ops that fn() runs, nested ones included (an op's kernel may call others), in order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return [event.name for event in profile.events() if event.name.startswith("fastlm::")]


def assert_one_graph_for_every_batch_size(model: torch.nn.Module, reduction: str, op: str) -> None:
    """``model(x, target)``: a loss over the logits of its linear ``model.head`` (8 -> 11 classes) through the fastlm
    op ``op``. With dynamic shapes, torch.compile traces it once for batches of 3 to 10 rows, backward included,
    the input's and the head's gradients those of F.cross_entropy; torch.export keeps the rows dynamic. The inputs
    are made on the head's device."""
    device = model.head.weight.device
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")  # AOT traces the backward too
    compiled = torch.compile(lambda x, target: model(x, target).sum(), dynamic=True, fullgraph=True, backend=counter)
    for rows in (3, 4, 7, 10):
        x = torch.randn(rows, 8, device=device, requires_grad=True)
        target = torch.randint(0, 11, (rows,), device=device)
        compiled(x, target).backward()
        got = [t.grad for t in (x, *model.head.parameters())]
        x.grad = None
        model.head.zero_grad(set_to_none=True)
        F.cross_entropy(model.head(x), target, reduction=reduction).sum().backward()
        for grad, expected in zip(got, (x.grad, *(p.grad for p in model.head.parameters()))):
            torch.testing.assert_close(grad, expected)
        model.head.zero_grad(set_to_none=True)
    assert len([graph for graph in counter.graphs if f"fastlm.{op}.default" in graph.code]) == 1
    rows = torch.export.Dim("rows", min=2, max=1024)
    program = torch.export.export(model, (torch.randn(4, 8, device=device), torch.randint(0, 11, (4,), device=device)),
                                  dynamic_shapes=({0: rows}, {0: rows}))
    x, target = torch.randn(9, 8, device=device), torch.randint(0, 11, (9,), device=device)
    torch.testing.assert_close(program.module()(x, target), model(x, target))


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                              magnitude: float = 0.0) -> None:
    """Element-wise comparison with a float64 reference: each element within ``tol`` relative to itself
    or to the largest reference magnitude (so tiny gradients are not compared against a loose constant).
    ``magnitude``, where given, is the size of the terms that cancel to make the result, for results that
    are exactly zero in exact arithmetic but not in floating point."""
    tol = TOLERANCE[dtype]
    expected = expected.detach().double()
    finite = expected[torch.isfinite(expected)]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    torch.testing.assert_close(actual.detach().double(), expected, rtol=tol, atol=tol * max(scale, magnitude, 1e-30),
                               equal_nan=True)


def free_port() -> int:
    """A TCP port nothing listens on now, for the rendezvous of multi-process tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Multi-process tests (gloo ranks, torchrun) get deadlines: a rank that hangs fails its test in minutes
# instead of stalling the whole run on gloo's 30-minute default.
GLOO_TIMEOUT = timedelta(seconds=120)
RANKS_TIMEOUT_S = 300


@contextmanager
def gloo_process_group(rank: int, world_size: int, port: int):
    """This process as ``rank`` of a gloo process group on this machine's loopback (rendezvous at ``port``) for
    the block, the group destroyed after it whatever happens.

    A DistributedDataParallel model must die inside the block, not after it: torch 2.13 keeps a Python object in
    the state of each collective launched from a backward pass, which a gloo thread frees under the GIL. A group
    whose last reference is the model's dies when the model does, holding the GIL while it joins that thread: a
    deadlock (1 run in ~20 of the DDP test; every time in 200 rounds of a small script). The group's own Python
    object lets the GIL go as it dies."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=GLOO_TIMEOUT)  # (not MASTER_ADDR/PORT: they would stay in the test process)
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn_ranks(rank_function, args: tuple, nprocs: int) -> None:
    """``torch.multiprocessing.spawn`` with a deadline: runs ``rank_function(rank, *args)`` in ``nprocs``
    processes, raises a rank's exception, and fails the test if they are not done in ``RANKS_TIMEOUT_S`` (a rank
    still running near the deadline prints its stack first). Ranks still running when it returns are killed."""
    ranks = mp.start_processes(_rank_that_dumps_its_stack_if_late, args=(rank_function, *args), nprocs=nprocs,
                               join=False, start_method="spawn")
    deadline = time.monotonic() + RANKS_TIMEOUT_S
    try:
        while not ranks.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                pytest.fail(f"the {nprocs} ranks did not finish in {RANKS_TIMEOUT_S} s (their stacks are in the "
                            "captured stderr)")
    finally:  # also when the wait is cut short (a failure, pytest-timeout, Ctrl-C): no rank outlives its test
        for process in ranks.processes:
            if process.is_alive():
                process.kill()


def _rank_that_dumps_its_stack_if_late(rank: int, rank_function, *args) -> None:
    faulthandler.dump_traceback_later(RANKS_TIMEOUT_S - 20)
    rank_function(rank, *args)


def opcheck_autograd_op(op, args: tuple) -> None:
    """torch.library.opcheck of a C++ autograd op (fastlm::cross_entropy, ...), then its fake under inference_mode:
    with autograd's keys on, FakeTensorMode runs the op's autograd kernel, whose inner ops' fakes shape the
    outputs; with them off, it runs the op's own fake implementation, which only the second pass checks."""
    torch.library.opcheck(op, args)
    with torch.inference_mode():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
