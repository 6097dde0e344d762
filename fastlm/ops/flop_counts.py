"""FLOP formulas of the fused ops for ``torch.utils.flop_counter.FlopCounterMode`` (what MFU estimates read).

The mode sees the kernel ops, not the products inside them, and counted nothing for them. Each formula counts
the matrix products of the torch code the op replaces, 2 FLOPs per multiply-add, as the mode counts torch's
(its other ops, softmax and normalisation included, count 0): the embedding's linear, the head of linear +
cross-entropy, and the makemore MLP's two linears. The product-table strategy computes the same output with
fewer multiplies; its count is the linear's all the same, as MFU wants.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula


def _embedding_linear_forward(idx_shape, table_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    rows, (out_features, in_features) = idx_shape[0], weight_shape
    return 2 * rows * in_features * out_features


def _embedding_linear_backward(grad_shape, idx_shape, table_shape, weight_shape, *args, out_shape=None,
                               **kwargs) -> int:
    """The linear's two backward products: the weight's gradient and the gathered rows' (for the table)."""
    return 2 * _embedding_linear_forward(idx_shape, table_shape, weight_shape)


def _linear_cross_entropy_chunks(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """The logits' product, and one product per gradient asked for (``wanted``: input, weight, bias)."""
    wanted = args[-1]
    rows, hidden, vocab = input_shape[0], input_shape[1], weight_shape[0]
    return 2 * rows * hidden * vocab * (1 + int(wanted[0]) + int(wanted[1]))


def _mlp_step(idx_shape, targets_shape, table_shape, w1_shape, b1_shape, w2_shape, *args, out_shape=None,
              **kwargs) -> int:
    """Both linears forward and backward (three products each: the table needs the first one's input gradient)."""
    rows, (hidden, in_features), vocab = idx_shape[0], w1_shape, w2_shape[0]
    return 6 * rows * (in_features * hidden + hidden * vocab)


FORMULAS = {"embedding_linear_forward": _embedding_linear_forward,
            "embedding_linear_backward": _embedding_linear_backward,
            "linear_cross_entropy_chunks": _linear_cross_entropy_chunks,
            "mlp_loss_and_grads": _mlp_step,
            "mlp_sgd_step": _mlp_step}

# The C++ ops (where fastlm._C loaded: the modules of fastlm.ops imported before this one load it) and the
# Triton ones (which those modules register).
for _name, _formula in FORMULAS.items():
    for _op in (_name, f"triton_{_name}"):
        if hasattr(torch.ops.fastlm, _op):
            register_flop_formula(getattr(torch.ops.fastlm, _op))(_formula)
