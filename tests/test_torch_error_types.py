"""Bad input that torch's own ops refuse, fastlm's refuse with an error torch's type also catches: a drop-in user's
`except RuntimeError` (or IndexError, ValueError) around F.cross_entropy, F.batch_norm or nn.BatchNorm1d, or around
the embedding + linear and linear + cross-entropy they replace, still catches fastlm's own clearer error. Run on
the CPU backend that users get by default (every backend shares these Python checks).

Where fastlm is deliberately broader or stricter than torch, the case is not here: int32 targets and class weights
of another float dtype are accepted; logits of no classes are refused (ValueError) even when every row is ignored
(torch returns NaN then)."""

import pytest
import torch
import torch.nn.functional as F

import fastlm

GENERATOR = torch.Generator().manual_seed(0)
X, TARGET = torch.randn(5, 7, generator=GENERATOR), torch.tensor([0, 1, 2, 3, 6])
IDX, TABLE = torch.randint(0, 27, (4, 3), generator=GENERATOR), torch.randn(27, 10, generator=GENERATOR)
W1, B1 = torch.randn(20, 30, generator=GENERATOR), torch.randn(20, generator=GENERATOR)
H, W2 = torch.randn(5, 8, generator=GENERATOR), torch.randn(7, 8, generator=GENERATOR)


def embedding_linear_reference(idx, table, weight, bias):
    return F.linear(F.embedding(idx, table).view(idx.shape[0], -1), weight, bias)


def linear_cross_entropy_reference(input, weight, target, bias=None, **options):
    return F.cross_entropy(F.linear(input, weight, bias), target, **options)


def batch_norm_module(module_type, training=True, eps=1e-5, track_running_stats=True):
    def call(x):
        module = module_type(x.shape[1] if x.dim() > 1 else 1, eps=eps, track_running_stats=track_running_stats)
        return module.train(training)(x)
    return call


# name: (torch's call, fastlm's call), each taking the same arguments
CASES = {
    "cross_entropy: class weight of the wrong size": (
        lambda: F.cross_entropy(X, TARGET, weight=torch.ones(6)),
        lambda: fastlm.ops.cross_entropy(X, TARGET, weight=torch.ones(6))),
    "cross_entropy: 2D class weight": (
        lambda: F.cross_entropy(X, TARGET, weight=torch.ones(7, 1)),
        lambda: fastlm.ops.cross_entropy(X, TARGET, weight=torch.ones(7, 1))),
    "cross_entropy: integer class weight": (
        lambda: F.cross_entropy(X, TARGET, weight=torch.ones(7, dtype=torch.long)),
        lambda: fastlm.ops.cross_entropy(X, TARGET, weight=torch.ones(7, dtype=torch.long))),
    "cross_entropy: float class indices": (
        lambda: F.cross_entropy(X, TARGET.float()),
        lambda: fastlm.ops.cross_entropy(X, TARGET.float())),
    "cross_entropy: bool target": (
        lambda: F.cross_entropy(X, TARGET.bool()),
        lambda: fastlm.ops.cross_entropy(X, TARGET.bool())),
    "cross_entropy: 2D target": (
        lambda: F.cross_entropy(X, TARGET[:, None]),
        lambda: fastlm.ops.cross_entropy(X, TARGET[:, None])),
    "cross_entropy: target of another batch size": (
        lambda: F.cross_entropy(X, TARGET[:4]),
        lambda: fastlm.ops.cross_entropy(X, TARGET[:4])),
    "cross_entropy: target past the classes": (
        lambda: F.cross_entropy(X, torch.tensor([0, 1, 2, 3, 7])),
        lambda: fastlm.ops.cross_entropy(X, torch.tensor([0, 1, 2, 3, 7]))),
    "cross_entropy: negative target": (
        lambda: F.cross_entropy(X, torch.tensor([0, 1, -1, 3, 4])),
        lambda: fastlm.ops.cross_entropy(X, torch.tensor([0, 1, -1, 3, 4]))),
    "cross_entropy: integer logits": (
        lambda: F.cross_entropy(X.long(), TARGET),
        lambda: fastlm.ops.cross_entropy(X.long(), TARGET)),
    "cross_entropy: unknown reduction": (
        lambda: F.cross_entropy(X, TARGET, reduction="average"),
        lambda: fastlm.ops.cross_entropy(X, TARGET, reduction="average")),
    "cross_entropy: label smoothing above 1": (
        lambda: F.cross_entropy(X, TARGET, label_smoothing=1.5),
        lambda: fastlm.ops.cross_entropy(X, TARGET, label_smoothing=1.5)),
    "cross_entropy: float ignore_index": (
        lambda: F.cross_entropy(X, TARGET, ignore_index=1.0),
        lambda: fastlm.ops.cross_entropy(X, TARGET, ignore_index=1.0)),
    "cross_entropy: bool ignore_index": (  # an int to Python, not to torch
        lambda: F.cross_entropy(X, TARGET, ignore_index=True),
        lambda: fastlm.ops.cross_entropy(X, TARGET, ignore_index=True)),
    "linear + cross-entropy: float ignore_index": (
        lambda: linear_cross_entropy_reference(H, W2, TARGET, ignore_index=1.0),
        lambda: fastlm.ops.linear_cross_entropy(H, W2, TARGET, ignore_index=1.0)),
    "cross_entropy: ignore_index beyond int64": (
        lambda: F.cross_entropy(X, TARGET, ignore_index=2**63),
        lambda: fastlm.ops.cross_entropy(X, TARGET, ignore_index=2**63)),
    "linear + cross-entropy: ignore_index beyond int64": (
        lambda: linear_cross_entropy_reference(H, W2, TARGET, ignore_index=-2**63 - 1),
        lambda: fastlm.ops.linear_cross_entropy(H, W2, TARGET, ignore_index=-2**63 - 1)),
    "linear + cross-entropy: weight of another hidden size": (
        lambda: linear_cross_entropy_reference(H, W2[:, :5], TARGET),
        lambda: fastlm.ops.linear_cross_entropy(H, W2[:, :5], TARGET)),
    "linear + cross-entropy: bias of the wrong size": (
        lambda: linear_cross_entropy_reference(H, W2, TARGET, torch.zeros(6)),
        lambda: fastlm.ops.linear_cross_entropy(H, W2, TARGET, bias=torch.zeros(6))),
    "linear + cross-entropy: weight of another dtype": (
        lambda: linear_cross_entropy_reference(H, W2.double(), TARGET),
        lambda: fastlm.ops.linear_cross_entropy(H, W2.double(), TARGET)),
    "linear + cross-entropy: target past the classes": (
        lambda: linear_cross_entropy_reference(H, W2, torch.tensor([0, 1, 2, 3, 7])),
        lambda: fastlm.ops.linear_cross_entropy(H, W2, torch.tensor([0, 1, 2, 3, 7]))),
    "embedding + linear: float ids": (
        lambda: embedding_linear_reference(IDX.float(), TABLE, W1, B1),
        lambda: fastlm.ops.embedding_linear(IDX.float(), TABLE, W1, B1)),
    "embedding + linear: id past the table": (
        lambda: embedding_linear_reference(IDX.clamp(max=26) + (IDX == 0) * 27, TABLE, W1, B1),
        lambda: fastlm.ops.embedding_linear(IDX.clamp(max=26) + (IDX == 0) * 27, TABLE, W1, B1)),
    "embedding + linear: weight of another width": (
        lambda: embedding_linear_reference(IDX, TABLE, W1[:, :29], B1),
        lambda: fastlm.ops.embedding_linear(IDX, TABLE, W1[:, :29], B1)),
    "embedding + linear: bias of the wrong size": (
        lambda: embedding_linear_reference(IDX, TABLE, W1, B1[:19]),
        lambda: fastlm.ops.embedding_linear(IDX, TABLE, W1, B1[:19])),
    "embedding + linear: weight of another dtype": (
        lambda: embedding_linear_reference(IDX, TABLE, W1.double(), B1.double()),
        lambda: fastlm.ops.embedding_linear(IDX, TABLE, W1.double(), B1.double())),
    "batch_norm: weight of the wrong size": (
        lambda: F.batch_norm(X, None, None, torch.ones(6), None, training=True),
        lambda: fastlm.ops.batch_norm(X, None, None, torch.ones(6), None, training=True)),
    "batch_norm: integer input": (
        lambda: F.batch_norm(X.long(), None, None, training=True),
        lambda: fastlm.ops.batch_norm(X.long(), None, None, training=True)),
    "batch_norm: evaluation without running statistics": (
        lambda: F.batch_norm(X, None, None, training=False),
        lambda: fastlm.ops.batch_norm(X, None, None, training=False)),
    "batch_norm: negative eps in evaluation": (
        lambda: F.batch_norm(X, torch.zeros(7), torch.ones(7), training=False, eps=-1.0),
        lambda: fastlm.ops.batch_norm(X, torch.zeros(7), torch.ones(7), training=False, eps=-1.0)),
    "BatchNorm1d: one value per channel in training": (
        lambda: batch_norm_module(torch.nn.BatchNorm1d)(X[:1]),
        lambda: batch_norm_module(fastlm.nn.BatchNorm1d)(X[:1])),
    "BatchNorm1d: 4D input": (
        lambda: batch_norm_module(torch.nn.BatchNorm1d)(X[:, :, None, None]),
        lambda: batch_norm_module(fastlm.nn.BatchNorm1d)(X[:, :, None, None])),
}

BUILTIN_TYPES = (IndexError, ValueError, TypeError, RuntimeError)


def builtin_type(error: Exception) -> type:
    """The standard exception type that a handler of torch's error names (NotImplementedError: RuntimeError)."""
    return next(t for t in type(error).__mro__ if t in BUILTIN_TYPES)


@pytest.mark.parametrize("case", list(CASES))
def test_torch_refuses_and_fastlm_refuses_with_an_error_of_its_type(case):
    torch_call, fastlm_call = CASES[case]
    with pytest.raises(Exception) as torch_error:
        torch_call()
    with pytest.raises(Exception) as fastlm_error:
        fastlm_call()
    assert isinstance(fastlm_error.value, builtin_type(torch_error.value)), (torch_error.value, fastlm_error.value)
    assert str(fastlm_error.value)  # a message, not a bare type
