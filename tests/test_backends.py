"""Backend choice: defaults per device, the FASTLM_BACKEND variable, the use() context, clear refusals."""

import subprocess
import sys
import threading

import pytest
import torch
from conftest import skip_unless_runs

import fastlm
from fastlm import backends

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_cpu_defaults_to_cpp_and_torch_is_always_there():
    assert "torch" in backends.available()
    assert "cpp" in backends.available(), backends.why_unavailable("cpp")
    assert backends.resolve(CPU) == "cpp"


def test_use_and_environment_variable_force_a_backend(monkeypatch):
    x, target = torch.randn(4, 5, requires_grad=True), torch.tensor([0, 1, 2, 3])
    with fastlm.backends.use("torch"):
        assert backends.resolve(CPU) == "torch"
        assert fastlm.ops.cross_entropy(x, target).grad_fn.name() == "NllLossBackward0"
    assert "fastlm::" in fastlm.ops.cross_entropy(x, target).grad_fn.name()  # the cpp backend's C++ autograd op
    monkeypatch.setenv("FASTLM_BACKEND", "torch")
    assert backends.resolve(CPU) == "torch"
    with fastlm.backends.use("cpp"):  # the context wins over the variable
        assert backends.resolve(CPU) == "cpp"
    assert backends.resolve(CPU, "cpp") == "cpp"  # and an explicit backend= wins over both
    monkeypatch.delenv("FASTLM_BACKEND")
    with fastlm.backends.use("torch"):
        with fastlm.backends.use("cpp"):
            assert backends.resolve(CPU) == "cpp"
        assert backends.resolve(CPU) == "torch"  # the outer block's choice again
    assert backends.resolve(CPU) == "cpp"


def test_use_is_per_thread():
    """A use() block forces the backend of its own thread, as torch's modes are per thread: another thread
    inside or outside a block of its own is untouched, and blocks in two threads ending out of order leave
    each thread its own choice."""
    skip_unless_runs("cpp")
    steps = [threading.Event() for _ in range(3)]
    seen = {}

    def first():  # enters use("torch") first, leaves it while the other thread is still in its block
        with backends.use("torch"):
            steps[0].set()
            steps[1].wait(30)
            seen["first, in its block"] = backends.resolve(CPU)
        steps[2].set()

    def second():
        steps[0].wait(30)
        seen["second, outside any block"] = backends.resolve(CPU)
        with backends.use("cpp"):
            steps[1].set()
            steps[2].wait(30)
            seen["second, in its block after the first left"] = backends.resolve(CPU)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert seen == {"second, outside any block": "cpp", "first, in its block": "torch",
                    "second, in its block after the first left": "cpp"}
    assert backends.resolve(CPU) == "cpp"


def test_use_under_torch_compile_recompiles_for_the_forced_backend():
    """The forced backend is read while dynamo traces: a graph per choice (not per depth of nested blocks), no
    graph break."""
    skip_unless_runs("cpp")
    x, target = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    recorder = torch._dynamo.testing.EagerAndRecordGraphs()
    loss = torch.compile(lambda x, target: fastlm.ops.cross_entropy(x, target), backend=recorder, fullgraph=True)
    torch._dynamo.reset()
    expected = torch.nn.functional.cross_entropy(x, target)
    torch.testing.assert_close(loss(x, target), expected)
    with backends.use("torch"):
        torch.testing.assert_close(loss(x, target), expected)
    with backends.use("torch"), backends.use("torch"):  # the depth of nested blocks is no reason to recompile
        torch.testing.assert_close(loss(x, target), expected)
    cpp, torch_reference = ([str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
                            for graph in recorder.graphs)
    assert any("fastlm." in op for op in cpp) and not any("fastlm." in op for op in torch_reference), recorder.graphs


def test_unknown_or_missing_backends_are_refused_with_the_reason(monkeypatch):
    with pytest.raises(RuntimeError, match="unknown fastlm backend 'cudnn'"):
        with fastlm.backends.use("cudnn"):
            pass
    monkeypatch.setenv("FASTLM_BACKEND", "nope")
    with pytest.raises(RuntimeError, match="unknown fastlm backend 'nope'"):
        backends.resolve(CPU)
    monkeypatch.delenv("FASTLM_BACKEND")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            with fastlm.backends.use("cuda"):
                pass
    with pytest.raises(RuntimeError, match="cannot run on cuda tensors"):
        backends.resolve(CUDA, "cpp")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("with a GPU, triton is available without the interpreter")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in backends.why_unavailable("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.why_unavailable("triton") is None
    assert backends.runs_on("triton", CPU)


def test_fake_kernels_refuse_tensors_on_different_devices():
    """A call mixing CPU and meta tensors reaches the ops' fake kernels, which would return uninitialised CPU
    memory: they refuse it, as torch's own meta kernels do."""
    skip_unless_runs("cpp")
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.fastlm.cross_entropy_forward(torch.randn(5, 7), torch.zeros(5, dtype=torch.long),
                                               torch.ones(7, device="meta"), -100, 0.0, 0.0, 0.0)


def test_ops_on_meta_tensors_give_torch_s_shapes():
    """A model on the meta device (built for its shapes, before any memory) runs fastlm's ops as it runs torch's:
    autocast, which knows no meta device, is not asked about it (it raised)."""
    import torch.nn.functional as F

    x, target, idx = (torch.randn(4, 5, device="meta"), torch.zeros(4, dtype=torch.long, device="meta"),
                      torch.zeros(4, 3, dtype=torch.long, device="meta"))
    table, weight, head = (torch.randn(9, 2, device="meta"), torch.randn(7, 6, device="meta"),
                           torch.randn(11, 5, device="meta"))
    pairs = [(fastlm.ops.cross_entropy(x, target), F.cross_entropy(x, target)),
             (fastlm.ops.linear_cross_entropy(x, head, target), F.cross_entropy(F.linear(x, head), target)),
             (fastlm.ops.batch_norm(x, None, None, training=True), F.batch_norm(x, None, None, training=True)),
             (fastlm.ops.embedding_linear(idx, table, weight), F.linear(F.embedding(idx, table).view(4, 6), weight))]
    for ours, torchs in pairs:
        assert ours.device.type == "meta" and ours.shape == torchs.shape and ours.dtype == torchs.dtype


def test_an_extension_that_fails_to_load_is_said_aloud():
    """Without fastlm._C (a wheel built for another torch, a failed build) the ops run their plain-PyTorch
    reference: a RuntimeWarning says so once, and `fastlm check`, which would then check the reference alone,
    fails."""
    script = (
        "import sys, warnings; sys.modules['fastlm._C'] = None  # its import now fails, as a broken build's does\n"
        "import torch, torch.nn.functional as F\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastlm\n"
        "    x, target = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])\n"
        "    loss = fastlm.ops.cross_entropy(x, target)\n"
        "    fastlm.ops.cross_entropy(x, target)\n"
        "assert torch.equal(loss, F.cross_entropy(x, target))\n"
        "assert [str(w.message).split(' (')[0] for w in caught] == ['fastlm._C failed to load'], caught\n"
        "assert fastlm.backends.available() == ['torch']\n"
        "import fastlm.check\n"
        "sys.exit(fastlm.check.main(['--device', 'cpu', '--quick', '--op', 'cross_entropy']))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "FAILED: no fastlm kernel backend runs on cpu here" in run.stdout


def test_import_stays_light():
    """`import fastlm` leaves out torch._dynamo (~1 s) and triton (~0.25 s): the modules that need them import
    them when used (torch.compiler.disable under compile, the FLOP formulas with torch.utils.flop_counter)."""
    code = ("import sys, fastlm; "
            "print(sorted({'torch._dynamo', 'triton', 'torch.utils.flop_counter'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
