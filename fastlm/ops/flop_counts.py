"""FLOP formulas of the fused ops for ``torch.utils.flop_counter.FlopCounterMode`` (what MFU estimates read).

The mode sees the kernel ops, not the products inside them, and counted nothing for them. Each formula counts
the matrix products the op runs, 2 FLOPs per multiply-add, as the mode counts torch's (its other ops, softmax
and normalisation included, count 0): the embedding's linear, the head of linear + cross-entropy, and the
makemore MLP's two linears. That is torch's count for the code the op replaces, except where the op computes
more: linear + cross-entropy with reduction "none" (or a second backward through a retained graph) recomputes
the logits in its backward, and embedding + linear computes the table's and the weight's gradients even where
one is frozen. The product-table strategy gets the linear's count, though it needs fewer multiplies.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

import torch


def _embedding_linear_forward(idx_shape, table_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    rows, (out_features, in_features) = idx_shape[0], weight_shape
    return 2 * rows * in_features * out_features


def _embedding_linear_backward(grad_shape, idx_shape, table_shape, weight_shape, *args, out_shape=None,
                               **kwargs) -> int:
    """The linear's two backward products: the weight's gradient and the gathered rows' (for the table)."""
    return 2 * _embedding_linear_forward(idx_shape, table_shape, weight_shape)


def _linear_cross_entropy(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """The logits' product (the op itself is seen only under inference mode, where it computes no gradient)."""
    return 2 * input_shape[0] * input_shape[1] * weight_shape[0]


def _linear_cross_entropy_chunks(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """The logits' product, and where the rows' upstream gradient is given (``grad_rows``; without it the op
    computes no gradient), one product per gradient asked for (``wanted``: input, weight, bias)."""
    grad_rows, wanted = args[-2], args[-1]
    gradients = 0 if grad_rows is None else int(wanted[0]) + int(wanted[1])
    return _linear_cross_entropy(input_shape, weight_shape) * (1 + gradients)


def _mlp_step(idx_shape, targets_shape, table_shape, w1_shape, b1_shape, w2_shape, *args, out_shape=None,
              **kwargs) -> int:
    """Both linears forward and backward (three products each: the table needs the first one's input gradient)."""
    rows, (hidden, in_features), vocab = idx_shape[0], w1_shape, w2_shape[0]
    return 6 * rows * (in_features * hidden + hidden * vocab)


FORMULAS = {"embedding_linear": _embedding_linear_forward,  # these two are seen only under inference mode
            "linear_cross_entropy": _linear_cross_entropy,
            "embedding_linear_forward": _embedding_linear_forward,
            "embedding_linear_backward": _embedding_linear_backward,
            "linear_cross_entropy_chunks": _linear_cross_entropy_chunks,
            "mlp_loss_and_grads": _mlp_step,
            "mlp_sgd_step": _mlp_step}

FLOP_COUNTER = "torch.utils.flop_counter"


def register_formulas() -> None:
    """Registers FORMULAS for the C++ ops (where fastlm._C loaded: the modules of fastlm.ops imported before this
    one load it) and the Triton ones (which those modules register); those registered already are left as they
    are (torch refuses a second registration)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    for name, formula in FORMULAS.items():
        for op in (name, f"triton_{name}"):
            if hasattr(torch.ops.fastlm, op) and getattr(torch.ops.fastlm, op) not in flop_registry:
                register_flop_formula(getattr(torch.ops.fastlm, op))(formula)


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Registers the formulas each time torch.utils.flop_counter is executed (its first import, a reload),
    rather than importing it with fastlm: it imports triton, ~0.25 s that `import fastlm` need not pay. It
    stays on sys.meta_path, and finds the module through the finders after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != FLOP_COUNTER or self not in sys.meta_path:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            spec = getattr(finder, "find_spec", lambda *args: None)(fullname, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            try:
                register_formulas()
            except Exception as error:  # never fail torch's import for fastlm's sake
                warnings.warn(f"fastlm: FLOP formulas not registered ({error})", RuntimeWarning, stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


# Once, even on a reload (which makes a new class: the finder already there is found by its class's name; it calls
# this module's register_formulas, whose globals the reload updated in place)
if not any(type(finder).__module__ == __name__ and type(finder).__qualname__ == _RegisterWhenImported.__qualname__
           for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenImported())
if FLOP_COUNTER in sys.modules:
    register_formulas()
