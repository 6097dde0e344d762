"""Every functional op refuses a non-tensor where it takes a tensor with a TypeError naming the argument (as torch's
functions do), not an AttributeError from inside a later check (fastlm/ops/tensor_arguments.py)."""

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
    ]


ARGUMENTS = [(call, position, f"{op.__name__}-{name}")
             for call, (op, _, names, _) in enumerate(calls()) for position, name in enumerate(names)]


@pytest.mark.parametrize("call, position", [a[:2] for a in ARGUMENTS], ids=[a[2] for a in ARGUMENTS])
@pytest.mark.parametrize("wrong", [3, "x", [1.0, 2.0]], ids=["int", "str", "list"])
def test_a_non_tensor_argument_is_a_type_error_naming_it(call, position, wrong):
    op, args, names, _ = calls()[call]
    args[position] = wrong
    with pytest.raises(TypeError, match=f"fastlm.{op.__name__}: {names[position]} must be a tensor"):
        op(*args)


def test_optional_tensors_may_be_none():
    for op, args, names, optional in calls():
        if optional is not None:
            assert isinstance(op(*[None if name in optional else arg for name, arg in zip(names, args)]), torch.Tensor)
