"""``fastlm.convert(model, fuse_linear_cross_entropy=True)``: the final Linear and its cross-entropy, found in the
graphs torch.compile captures, become one ``linear_cross_entropy`` where the logits feed the loss alone. The fused
model gives the torch model's losses, outputs and gradients, over branches and batch sizes; where the pair cannot
be fused (logits also returned, class probabilities, (N, C, L) logits) it runs as written. Fused or not is read off
the loss's autograd node, which is fastlm's linear + cross-entropy only where the logits were never formed."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlm
from conftest import skip_unless_runs
from fastlm.fuse_linear_cross_entropy import FuseLinearCrossEntropy

VOCAB, HIDDEN, CONTEXT = 29, 12, 5


class LanguageModel(nn.Module):
    """A next-token model the way such models are written: (B, T) ids -> (B, T, V) logits, and the loss when given
    targets; ``loss`` picks how the loss is taken."""

    def __init__(self, loss: str):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)
        self.criterion = nn.CrossEntropyLoss(ignore_index=3, label_smoothing=0.1)
        self.class_weight = nn.Parameter(torch.rand(VOCAB) + 0.5, requires_grad=False)
        self.loss = loss

    def forward(self, idx, targets=None):
        hidden = torch.tanh(self.embedding(idx))
        if self.loss == "per-row":  # the last position's (B, H) hidden: logits go to the loss as they are
            return F.cross_entropy(self.head(hidden[:, -1]), targets[:, -1], reduction="none")
        logits = self.head(hidden)
        if targets is None:
            return logits
        if self.loss == "module":  # nn.CrossEntropyLoss, which convert swaps for fastlm's
            return self.criterion(logits.view(-1, logits.size(-1)), targets.view(-1))
        if self.loss == "functional":
            return F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), self.class_weight, reduction="sum")
        if self.loss == "returns-logits":
            return logits, F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))
        if self.loss == "probabilities":
            return F.cross_entropy(logits.view(-1, VOCAB), F.one_hot(targets.view(-1), VOCAB).float())
        if self.loss == "class-dim-1":  # (B, V, T) logits
            return F.cross_entropy(logits.transpose(1, 2), targets)
        raise ValueError(self.loss)


@pytest.fixture(autouse=True)
def fresh_captures():
    """Each test starts without captures: torch.compile keeps a bounded number per forward (its recompile limit),
    after which a forward runs eagerly, unfused; the tests here between them would pass it."""
    torch._dynamo.reset()


def make_pair(loss: str, backend: str | None = None):
    torch.manual_seed(0)
    model = LanguageModel(loss)
    return model, fastlm.convert(copy.deepcopy(model), backend=backend, fuse_linear_cross_entropy=True)


def is_fused(loss: torch.Tensor) -> bool:
    return "LinearCrossEntropy" in loss.grad_fn.name()


def batch(rows: int):
    return torch.randint(0, VOCAB, (rows, CONTEXT)), torch.randint(0, VOCAB, (rows, CONTEXT))


def assert_same_step(model, converted, idx, targets, upstream=None):
    """The two models' outputs on one batch, and their gradients after a backward from ``upstream``."""
    expected, got = model(idx, targets), converted(idx, targets)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    upstream = torch.rand_like(expected) + 0.5 if upstream is None else upstream
    expected.backward(upstream)
    got.backward(upstream)
    for (name, p), q in zip(model.named_parameters(), converted.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
            p.grad = q.grad = None
    return got


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
@pytest.mark.parametrize("loss", ["module", "functional", "per-row"])
def test_final_linear_and_loss_are_fused(loss, backend):
    skip_unless_runs(backend)
    model, converted = make_pair(loss, backend)
    for rows in (4, 7, 1, 10):  # new batch sizes: captured again, then with dynamic shapes
        got = assert_same_step(model, converted, *batch(rows))
        assert is_fused(got) == (backend != "torch"), got.grad_fn  # the torch backend forms the logits itself


def test_a_branch_not_taken_at_capture_still_runs():
    model, converted = make_pair("module")
    idx, targets = batch(6)
    assert is_fused(assert_same_step(model, converted, idx, targets))
    torch.testing.assert_close(converted(idx), model(idx))  # targets=None: the logits, as written


@pytest.mark.parametrize("loss", ["returns-logits", "probabilities", "class-dim-1"])
def test_what_cannot_be_fused_runs_as_written(loss):
    model, converted = make_pair(loss)
    idx, targets = batch(6)
    if loss == "returns-logits":
        (logits, got), (expected_logits, expected) = converted(idx, targets), model(idx, targets)
        torch.testing.assert_close(logits, expected_logits)
        torch.testing.assert_close(got, expected)
        assert not is_fused(got)
    else:
        assert not is_fused(assert_same_step(model, converted, idx, targets))


def test_state_dict_is_the_torch_models():
    model, converted = make_pair("functional")
    assert list(converted.state_dict()) == list(model.state_dict())
    fresh = LanguageModel("functional")
    fresh.load_state_dict(converted.state_dict())
    idx, targets = batch(5)
    torch.testing.assert_close(fresh(idx, targets), converted(idx, targets))


@pytest.mark.parametrize("loss", ["functional", "module"])
def test_autocast_keeps_the_torch_loss_dtype_and_value(loss):
    """F.cross_entropy's form is fused with autocast's semantics; fastlm's op, which runs with autocast off on the
    logits autocast made, is left as it is."""
    model, converted = make_pair(loss)
    idx, targets = batch(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = model(idx, targets), converted(idx, targets)
    assert is_fused(got) == (loss == "functional") and got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=0)


def test_backend_counts_the_fused_losses_of_each_capture():
    model = LanguageModel("module")
    backend = FuseLinearCrossEntropy()
    compiled = torch.compile(model, backend=backend)
    idx, targets = batch(4)
    compiled(idx, targets)
    compiled(idx)  # the logits branch: a second graph, with no loss in it
    assert backend.fused == 1
