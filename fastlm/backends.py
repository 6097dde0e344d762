"""Which kernel backend runs an op.

Every kernel family has four backends: ``cpp`` (C++ CPU kernels in fastlm._C), ``cuda`` (CUDA kernels in
fastlm._C, in a CUDA build of torch), ``triton`` (Triton kernels; on CPU only under ``TRITON_INTERPRET=1``)
and ``torch`` (the plain-PyTorch reference). By default a CPU tensor runs on ``cpp`` and a CUDA tensor on
``triton`` (then ``cuda``). ``FASTLM_BACKEND=name`` or ``with fastlm.backends.use(name):`` (in its own
thread) forces one; a forced backend that this machine lacks, or that cannot run on the tensor's device, raises
an error saying what is missing. Inside torch.func transforms (grad, vmap, jacrev, ...; functionalize only for the ops
that update tensors in place, which it refuses) an op left to the default runs on ``torch``: the kernel
backends' autograd is a C++ torch::autograd::Function, which torch.func refuses.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
import warnings

import torch
import torch.utils._pytree as pytree

BACKENDS = ("cpp", "cuda", "triton", "torch")
# Preference for each device type when nothing is forced. On CUDA, triton comes first until the
# side-by-side GPU benchmark (bench/) shows the CUDA kernels faster.
DEFAULT_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cuda", "torch")}


class _Forced(threading.local):
    """The backend the innermost ``use()`` block forces, or None: per thread, as torch's modes (no_grad, autocast)
    are, so a block in one thread changes nothing in another. Set in ``__init__`` (run once in each thread), not as
    a class attribute: torch.compile guards on an instance attribute and recompiles when a block changes it, but
    not on a class attribute's default, so a graph would keep the backend it was traced with. The innermost name
    alone, so that the depth of nested blocks is no reason to recompile."""

    def __init__(self):
        self.name: str | None = None


_forced = _Forced()


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream. The ops then skip their host-side checks
    of ids and targets (each a device sync, which capture forbids); the kernels never read or write out of
    bounds regardless (an id or target out of range reads as a zero row or an ignored row)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_extension_loaded = False
_extension_failure: str | None = None


def _extension_error() -> str | None:
    """None once fastlm._C is loaded, else why it is not. Tried once: the first failure warns, because without it
    every op quietly runs its plain-PyTorch reference (the default for CPU tensors falls back to ``torch``)."""
    global _extension_loaded, _extension_failure
    if _extension_loaded or _extension_failure:  # resolve() asks on every op call: the answer cannot change
        return _extension_failure
    try:
        import fastlm._C  # noqa: F401  (loading it registers torch.ops.fastlm.*)
    except ImportError as error:
        _extension_failure = (f"fastlm._C failed to load ({error}); rebuild it against the torch installed now "
                              "(`pip install --no-build-isolation -e .` in a checkout)")
        warnings.warn(f"{_extension_failure}. Until then fastlm's ops run their plain-PyTorch reference.",
                      RuntimeWarning, stacklevel=2)
        return _extension_failure
    _extension_loaded = True
    return None


_triton_installed: bool | None = None


def _has_triton() -> bool:
    """Whether the triton package is installed: looked up once, as the search costs ~40 us and resolve() asks
    on every op call on a GPU (a module global rather than functools.cache, which torch.compile warns about)."""
    global _triton_installed
    if _triton_installed is None:
        _triton_installed = importlib.util.find_spec("triton") is not None
    return _triton_installed


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def why_unavailable(name: str) -> str | None:
    """None if backend ``name`` can run on this machine, else the reason it cannot."""
    if name not in BACKENDS:
        return f"unknown fastlm backend {name!r}; choose one of {', '.join(BACKENDS)}"
    if name == "torch":
        return None
    error = _extension_error()  # every kernel backend's autograd is a C++ op (csrc/*_autograd.cpp)
    if error:
        return error
    if name == "triton":
        if not _has_triton():
            return "the triton backend needs the triton package (pip install triton)"
        if not torch.cuda.is_available() and not _triton_interpreted():
            return "the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 to run its kernels on the CPU"
        return None
    if name == "cuda":
        if not torch.cuda.is_available():
            return "the cuda backend needs a CUDA GPU and a CUDA build of torch"
        if not torch._C._dispatch_has_kernel_for_dispatch_key("fastlm::cross_entropy_forward", "CUDA"):
            return "fastlm._C was built without CUDA kernels (torch or nvcc lacked CUDA at build time); rebuild it"
    return None


def available() -> list[str]:
    """The backends this machine can run, in order of preference."""
    return [name for name in BACKENDS if why_unavailable(name) is None]


def runs_on(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpp":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    return device.type == "cuda" or (device.type == "cpu" and _triton_interpreted())


@contextlib.contextmanager
def use(name: str):
    """Run fastlm ops inside the block on backend ``name`` (checked against this machine first), in this thread.
    Like torch's modes, a block held open across a generator's ``yield`` or a coroutine's ``await`` also applies
    to what the thread runs meanwhile."""
    reason = why_unavailable(name)
    if reason:
        raise RuntimeError(reason)
    outer = _forced.name
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = outer


def in_torch_func_transform(functionalize_too: bool = False) -> bool:
    """Whether a torch.func transform other than functionalize (grad, vmap, jacrev, ...) is active, or with
    ``functionalize_too`` any one: functionalize runs the kernel ops as they are, except those that update
    tensors in place (BatchNorm's running stats), which it refuses. Not asked while torch.compile traces, where
    the answer would be baked into the graph."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return False
    if functionalize_too:
        return True
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    functionalize = torch._C._functorch.TransformType.Functionalize
    return any(interpreter.key() != functionalize for interpreter in retrieve_all_functorch_interpreters())


def resolve(device: torch.device, requested: str | None = None, *, mutates: bool = False) -> str:
    """The backend an op on ``device`` runs on: ``requested``, else ``use()``, else FASTLM_BACKEND, else the default
    (``torch`` inside a torch.func transform; for an op that ``mutates`` a tensor, inside functionalize too)."""
    name = requested or _forced.name or os.environ.get("FASTLM_BACKEND") or None
    if name is None and in_torch_func_transform(functionalize_too=mutates):
        return "torch"
    if name is None:
        for candidate in DEFAULT_ORDER.get(device.type, ("torch",)):
            if why_unavailable(candidate) is None:
                return candidate
        return "torch"
    reason = why_unavailable(name)
    if reason:
        raise RuntimeError(reason)
    if not runs_on(name, device):
        raise RuntimeError(f"fastlm backend {name!r} cannot run on {device.type} tensors")
    return name


_op_tables: dict = {}


def kernel_ops(table_type, family: str, backend: str):
    """The ops of a kernel family on a kernel backend (cpp, cuda or triton), as a ``table_type`` NamedTuple
    whose fields name them: ``fastlm::{family}_{field}``, or ``fastlm::triton_{family}_{field}`` for the
    Triton custom ops. Looked up once per family and backend."""
    key = (family, backend)
    if key not in _op_tables:
        prefix = "triton_" if backend == "triton" else ""
        ops = torch.ops.fastlm
        _op_tables[key] = table_type(*(getattr(ops, f"{prefix}{family}_{name}") for name in table_type._fields))
    return _op_tables[key]


def on_one_device(op: str, fake):
    """``fake``, refusing tensors on different devices as torch's own meta kernels do: the dispatcher sends a
    call mixing meta and CPU tensors to the fake, which would hand back uninitialised CPU memory."""
    @functools.wraps(fake)
    def checked(*args, **kwargs):
        devices = {t.device for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        if len(devices) > 1:
            raise RuntimeError(f"fastlm::{op}: expected every tensor on one device, got {sorted(map(str, devices))}")
        return fake(*args, **kwargs)
    return checked


def register_cpp_fake(op: str, fake) -> None:
    """Registers the fake (meta) implementation of the C++ op ``fastlm::{op}``, where fastlm._C loaded (elsewhere
    the op does not exist), so torch.compile can trace it."""
    if why_unavailable("cpp") is None:
        torch.library.register_fake(f"fastlm::{op}", on_one_device(op, fake))


def register_fakes(table_type, family: str, fakes) -> None:
    """Registers the fake (meta) implementations ``fakes`` (a ``table_type`` of functions) for the family's
    Triton custom ops and, where fastlm._C loaded, its C++ ops, so torch.compile can trace them."""
    for name, fake in zip(table_type._fields, fakes):
        torch.library.register_fake(f"fastlm::triton_{family}_{name}", on_one_device(f"triton_{family}_{name}", fake))
        register_cpp_fake(f"{family}_{name}", fake)
