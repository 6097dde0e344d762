"""Every functional op refuses a non-tensor where it takes a tensor with a TypeError naming the argument (as torch's
functions do), not an AttributeError from inside a later check (fastlm/ops/tensor_arguments.py)."""

from functools import partial

import pytest
import torch

import fastlm


def calls():
    """Each functional with valid arguments: (op, positional arguments, their names, those that may be None)."""
    x, target, idx = torch.randn(6, 5), torch.randint(0, 5, (6,)), torch.randint(0, 7, (4, 3))
    stats = [torch.zeros(5), torch.ones(5)]
    return [
        (fastlm.ops.cross_entropy, [x, target, torch.rand(5)], ["input", "target", "weight"], {"weight"}),
        (fastlm.ops.linear_cross_entropy, [torch.randn(6, 4), torch.randn(5, 4), target, torch.randn(5),
                                           torch.rand(5)], ["input", "weight", "target", "bias", "ce_weight"],
         {"bias", "ce_weight"}),
        (fastlm.ops.batch_norm, [x, *stats, torch.ones(5), torch.zeros(5)],
         ["input", "running_mean", "running_var", "weight", "bias"], {"weight", "bias"}),
        (fastlm.ops.sync_batch_norm, [x, *stats, torch.ones(5), torch.zeros(5)],
         ["input", "running_mean", "running_var", "weight", "bias"], None),  # runs only with a process group
        (fastlm.ops.embedding_linear, [idx, torch.randn(7, 2), torch.randn(9, 6), torch.randn(9)],
         ["idx", "table", "weight", "bias"], {"bias"}),
        *[(step, [idx, torch.randint(0, 7, (4,)), torch.randn(7, 2), torch.randn(9, 6), torch.randn(9),
                  torch.randn(7, 9), torch.randn(7), torch.ones(9), torch.zeros(9), torch.zeros(9), torch.ones(9),
                  torch.tensor(0)],
           ["idx", "targets", "table", "w1", "b1", "w2", "b2", "bn_weight", "bn_bias", "running_mean", "running_var",
            "num_batches_tracked"], {"bn_weight", "bn_bias", "running_mean", "running_var", "num_batches_tracked"})
          for backend in ("cpp", "torch") if backend in fastlm.backends.available()
          for step in (partial(fastlm.ops.mlp_loss_and_grads, backend=backend),
                       partial(fastlm.ops.mlp_sgd_step, lr=0.1, backend=backend))],
    ]


def name_of(op) -> str:
    return getattr(op, "__name__", None) or op.func.__name__


def label(op) -> str:
    return name_of(op) + (f"[{op.keywords['backend']}]" if isinstance(op, partial) else "")


ARGUMENTS = [(call, position, f"{label(op)}-{name}")
             for call, (op, _, names, _) in enumerate(calls()) for position, name in enumerate(names)]


@pytest.mark.parametrize("call, position", [a[:2] for a in ARGUMENTS], ids=[a[2] for a in ARGUMENTS])
@pytest.mark.parametrize("wrong", [3, "x", [1.0, 2.0]], ids=["int", "str", "list"])
def test_a_non_tensor_argument_is_a_type_error_naming_it(call, position, wrong):
    op, args, names, _ = calls()[call]
    args[position] = wrong
    with pytest.raises(TypeError, match=f"fastlm.{name_of(op)}: {names[position]} must be a tensor"):
        op(*args)


def test_optional_tensors_may_be_none():
    for op, args, names, optional in calls():
        if optional is not None:
            result = op(*[None if name in optional else arg for name, arg in zip(names, args)])
            assert isinstance(getattr(result, "loss", result), torch.Tensor)  # (mlp_loss_and_grads: an MLPGrads)
