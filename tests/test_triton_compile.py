"""Every kernel launch that the Triton launchers in kernels/ make compiles for a GPU, checked on machines without one.

The rest of the suite runs the Triton kernels through Triton's interpreter (TRITON_INTERPRET=1), which executes
them with numpy and never compiles them, so it misses what only compiling for a GPU catches: tl.dot's shape and
dtype rules, types that only clash once lowered (a loop-carried value that changes type, an int64 offset against
an int32 one, an fp64 libdevice call), ptxas limits. Here a subprocess without TRITON_INTERPRET calls the public
launchers (the functions fastlm.ops calls through the triton backend) on small CPU tensors, with Triton's
JITFunction.run replaced by a recorder (the kernels never run; their outputs are garbage) and the launchers'
device tests answering as on a GPU, so that they take their GPU paths (GPU tile sizes, TF32, the atomic
scatter). Triton's own argument binder then specialises each recorded launch as a real launch would (dtypes, ints
equal to 1 and None as constants, 16-divisibility), and each distinct one is compiled by Triton's compiler and
its bundled ptxas to a cubin for sm_90 and sm_80. Spills are not checked: Triton reports them only once a cubin
is loaded on a GPU.
"""

import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ARCHS = [90, 80]
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# An empty kernel in Triton's IR: compiling it proves that this machine's Triton can compile for NVIDIA GPUs.
PROBE_TTIR = "module {\n  tt.func public @probe(%arg0: !tt.ptr<f32>) {\n    tt.return\n  }\n}\n"


# --- in the subprocess: call the launchers, record their launches, compile each distinct one --------------------


def _math(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cross_entropy_calls():
    from fastlm.kernels import cross_entropy as k

    # (dtypes, classes, weighted, label smoothing, z-loss scale, soft cap, target dtype). 5000 classes are a full
    # block of 4096 at 8 warps and a partial one, 1000 one partial block at 4 warps; C = 1 arrives as a constant.
    cases = [(FLOATS, 5000, False, 0.0, 0.0, 0.0, torch.int64),
             (FLOATS, 5000, True, 0.1, 1e-4, 30.0, torch.int64),
             ((torch.bfloat16, torch.float32), 1000, True, 0.0, 0.0, 0.0, torch.int32),
             ((torch.bfloat16, torch.float32), 1, False, 0.1, 0.0, 0.0, torch.int64)]
    for dtypes, C, weighted, smoothing, z_loss, softcap, target_dtype in cases:
        for dtype in dtypes:
            logits = torch.randn(8, C, dtype=dtype)
            target = torch.zeros(8, dtype=target_dtype)
            weight = torch.rand(C, dtype=dtype) if weighted else None
            options = (-100, smoothing, z_loss, softcap)
            grad_loss = torch.ones(8, dtype=_math(dtype))
            _, lse = k.cross_entropy_forward(logits, target, weight, *options)
            k.cross_entropy_backward_into(logits, target, weight, lse, grad_loss, *options, torch.empty_like(logits))
            k.cross_entropy_backward_into(logits, target, weight, lse, grad_loss, *options, logits)  # in place
            k.cross_entropy_forward_backward(logits, target, weight, grad_loss, *options)


def _batch_norm_calls():
    from fastlm.kernels import batch_norm as k

    # (dtypes, input shape, activation, affine: weight, bias, running stats and the unbiased variance). 2D input has
    # L = 1 (a constant); one channel is read as one row of N*L; 2^17 x 64 has more tiles than programs.
    cases = [(FLOATS, (64, 300), 1, True),
             (FLOATS, (16, 40, 50), 2, True),
             (FLOATS, (64, 1), 0, False),
             ((torch.bfloat16, torch.float32), (8, 1, 100), 2, False),
             ((torch.float32,), (1 << 17, 64), 0, True)]
    for dtypes, shape, activation, affine in cases:
        for dtype in dtypes:
            C = shape[1]
            x = torch.randn(shape, dtype=dtype)
            weight = bias = running_mean = running_var = None
            if affine:
                weight, bias = torch.rand(C, dtype=dtype), torch.rand(C, dtype=dtype)
                running_mean, running_var = torch.zeros(C, dtype=_math(dtype)), torch.ones(C, dtype=_math(dtype))
            k.batch_norm_stats(x)
            y, mean, invstd = k.batch_norm_forward_train(x, weight, bias, running_mean, running_var, 0.1, 1e-5, affine,
                                                         activation)
            k.batch_norm_forward(x, mean, invstd, weight, bias, activation)
            dy = torch.randn_like(x)
            k.batch_norm_backward(dy, x, y, mean, invstd, weight, True, affine, activation)
            sum_dz, sum_dz_xhat = k.batch_norm_backward_reduce(dy, x, y, mean, invstd, activation)
            k.batch_norm_backward_input(dy, x, y, mean, invstd, weight, sum_dz, sum_dz_xhat, 0.5, 0.5, activation)


def _embedding_linear_calls():
    from fastlm.kernels import embedding_linear as k

    for dtype, precision in ((torch.float16, "ieee"), (torch.bfloat16, "ieee"), (torch.float32, "ieee"),
                             (torch.float32, "tf32"), (torch.float64, "ieee")):
        torch.backends.cuda.matmul.fp32_precision = precision
        # (B, T, V, D, out): makemore's sizes, and a batch long enough that the deterministic scatter cuts its
        # segments into pieces (with a narrower output: a 64-wide GEMM tile).
        for B, T, V, D, out in ((32, 3, 27, 10, 200), (4096, 3, 27, 10, 64)):
            idx = torch.randint(0, V, (B, T))
            table, weight = torch.randn(V, D, dtype=dtype), torch.randn(out, T * D, dtype=dtype)
            bias, dy = torch.randn(out, dtype=dtype), torch.randn(B, out, dtype=dtype)
            for strategy in (0, 1):  # gather-GEMM, product table
                k.embedding_linear_forward(idx, table, weight, bias, strategy)
                k.embedding_linear_forward(idx, table, weight, None, strategy)
                for deterministic in (True, False):  # segment sums, atomic scatter
                    k.embedding_linear_backward(dy, idx, table, weight, True, strategy, 0, deterministic)


CALLS = {"cross_entropy": _cross_entropy_calls, "batch_norm": _batch_norm_calls,
         "embedding_linear": _embedding_linear_calls}


class _Pointer:
    """What Triton's binder reads of a tensor argument: its dtype and its address (for 16-byte alignment); kept
    instead of the tensor, whose memory can go."""

    def __init__(self, tensor):
        self.dtype = tensor.dtype
        self.address = tensor.data_ptr()

    def data_ptr(self):
        return self.address


@contextlib.contextmanager
def _recorded_launches():
    """Within, a kernel launch appends (kernel, args, kwargs) to the yielded list instead of running, and the
    launchers see CPU tensors as on a GPU: launch.interpreted says no (the GPU's block sizes), Tensor.is_cuda says
    yes (TF32 in embedding_linear), and embedding_linear's _use_atomics answers as on a GPU."""
    from unittest import mock

    from triton.runtime.jit import JITFunction

    from fastlm.kernels import embedding_linear, launch

    launches = []

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append((kernel, [_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args], kwargs))

    with mock.patch.object(JITFunction, "run", record), \
            mock.patch.object(torch.Tensor, "is_cuda", property(lambda self: True)), \
            mock.patch.object(launch, "interpreted", lambda device: False), \
            mock.patch.object(embedding_linear, "_use_atomics", lambda deterministic, device: not deterministic):
        yield launches


def _describe(signature, constexprs, attrs, launch_options):
    """A specialisation as its kernel arguments (name: type, or name=value for a constant) and launch options."""
    args = []
    for i, (name, ty) in enumerate(signature.items()):
        if ty == "constexpr":
            args.append(f"{name}={constexprs[(i,)]}")
        else:
            args.append(f"{name}: {ty}" + (" (16-divisible)" if attrs.get((i,)) else ""))
    return ", ".join(args + [f"{name}={value}" for name, value in launch_options.items()])


def _specialisations(launches, arch):
    """{(kernel name, description): (ASTSource, options)} for the distinct launches on sm_<arch>."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    jobs = {}
    for kernel, args, kwargs in launches:
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        launch_options = {name: value for name, value in kwargs.items() if name not in signature}
        described = _describe(signature, constexprs, attrs, launch_options)
        jobs[kernel.__name__, described] = ASTSource(kernel, signature, constexprs, attrs), options
    return jobs


def _compile(arch, job):
    """None if the job (ASTSource, options) compiles to a cubin for sm_<arch>, else the compiler's error."""
    import triton
    from triton.backends.compiler import GPUTarget

    source, options = job
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    except Exception as error:  # noqa: BLE001  (whatever the compiler raises is the finding)
        chain = []  # an error inside a called @triton.jit function is the cause of its caller's
        while error is not None:
            chain.append(f"{type(error).__name__}: {error}")
            error = error.__cause__
        return "\n".join(chain)
    return None if kernel.asm.get("cubin") else "the compiler returned no cubin"


def _record_and_compile(family, pool):
    """The kernels of kernels/<family>.py, those its launchers launch, and whether each distinct launch compiles
    for each arch (an "error" instead where the launchers themselves fail)."""
    from triton.runtime.jit import JITFunction

    module = importlib.import_module(f"fastlm.kernels.{family}")
    kernels = sorted(name for name, value in vars(module).items()
                     if isinstance(value, JITFunction) and name.endswith("_kernel"))
    try:
        with _recorded_launches() as launches:
            CALLS[family]()
        jobs = {(arch, *key): job for arch in ARCHS for key, job in _specialisations(launches, arch).items()}
        errors = pool.map(_compile, [arch for arch, _, _ in jobs], jobs.values())
        compiled = [dict(kernel=name, signature=described, arch=arch, error=error)
                    for (arch, name, described), error in zip(jobs, errors, strict=True)]
    except Exception:  # noqa: BLE001  (reported by this family's tests)
        return dict(error=traceback.format_exc())
    return dict(kernels=kernels, launched=sorted({kernel.__name__ for kernel, _, _ in launches}), compiled=compiled)


def _unavailable():
    """None if this machine's Triton compiles for NVIDIA GPUs, else why not."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        with tempfile.TemporaryDirectory() as tmp:
            probe = Path(tmp) / "probe.ttir"
            probe.write_text(PROBE_TTIR)
            for arch in ARCHS:
                triton.compile(str(probe), target=GPUTarget("cuda", arch, 32))
    except Exception as error:  # noqa: BLE001
        return f"Triton cannot compile for NVIDIA GPUs here: {type(error).__name__}: {error}"
    return None


def _main(out_path):
    results = {"unavailable": _unavailable()}
    if results["unavailable"] is None:
        # Threads, as Triton's own AsyncCompileMode uses to compile kernels in parallel (ptxas runs as a process).
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            results.update({family: _record_and_compile(family, pool) for family in CALLS})
    Path(out_path).write_text(json.dumps(results))


# --- the tests ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def results(tmp_path_factory):
    """The subprocess's findings; it runs once, without TRITON_INTERPRET and with a fresh kernel cache."""
    out = tmp_path_factory.mktemp("triton_compile")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "cache")
    run = subprocess.run([sys.executable, __file__, str(out / "results.json")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"the recording and compiling subprocess failed:\n{run.stderr[-8000:]}"
    found = json.loads((out / "results.json").read_text())
    if found["unavailable"]:
        pytest.skip(found["unavailable"])
    return found


def family_findings(results, family):
    found = results[family]
    assert "error" not in found, f"calling the launchers of kernels/{family}.py failed:\n{found.get('error')}"
    return found


@pytest.mark.parametrize("family", list(CALLS))
def test_every_kernel_is_launched(results, family):
    found = family_findings(results, family)
    missing = sorted(set(found["kernels"]) - set(found["launched"]))
    assert not missing, f"no call here launches {missing} of kernels/{family}.py; add one to _{family}_calls"


@pytest.mark.parametrize("arch", ARCHS, ids=lambda arch: f"sm_{arch}")
@pytest.mark.parametrize("family", list(CALLS))
def test_launches_compile(results, family, arch):
    launches = [c for c in family_findings(results, family)["compiled"] if c["arch"] == arch]
    failed = [c for c in launches if c["error"]]
    assert launches, f"no launches of kernels/{family}.py were recorded"
    assert not failed, f"{len(failed)} of {len(launches)} distinct launches of kernels/{family}.py fail to compile " \
                       f"for sm_{arch}:\n\n" + "\n\n".join(f"{c['kernel']}({c['signature']}):\n{c['error']}"
                                                       for c in failed)


if __name__ == "__main__":
    _main(sys.argv[1])
