"""``fastlm.convert(model, fuse_forward_code=True)``: layers that meet only in the forward's code, found in the
graphs torch.compile captures, become fastlm's fused ops where the intermediate result feeds nothing else:
Embedding -> view(B, -1) -> Linear, BatchNorm1d -> tanh/relu, the final Linear -> cross-entropy. The converted
model gives the torch model's losses, outputs, gradients and running stats, over training steps, branches and
batch sizes; what cannot be fused runs as written. Fused or not is read off the autograd graph: fastlm's nodes in
place of torch's."""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlm
from conftest import device_to_test, fastlm_ops_called, free_port, gloo_process_group, skip_unless_runs, spawn_ranks
from fastlm.fuse_graph import FuseGraph, fuse_graph

VOCAB, EMBED, CONTEXT, HIDDEN = 29, 6, 4, 24


@pytest.fixture(autouse=True)
def fresh_captures():
    """Each test starts without captures: torch.compile keeps a bounded number per forward function (its recompile
    limit), after which the forward runs eagerly, unfused; the tests here between them would pass it."""
    torch._dynamo.reset()


def autograd_nodes(output: torch.Tensor) -> set[str]:
    """The names of the autograd nodes ``output`` was computed through."""
    names, stack, seen = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name().split("::")[-1].rstrip(">"))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


class MakemoreMLP(nn.Module):
    """The makemore MLP with BatchNorm, written with torch layers joined in the forward (not an nn.Sequential)."""

    def __init__(self, activation: str):
        super().__init__()
        self.C = nn.Embedding(VOCAB, EMBED, padding_idx=0)  # that row gets no gradient, fused or not
        self.l1 = nn.Linear(CONTEXT * EMBED, HIDDEN, bias=False)
        self.bn = nn.BatchNorm1d(HIDDEN)
        self.l2 = nn.Linear(HIDDEN, VOCAB)
        self.activation = activation

    def forward(self, idx, targets=None):
        h = self.bn(self.l1(self.C(idx).view(idx.shape[0], -1)))
        h = {"tanh": torch.tanh, "relu": F.relu, "relu-method": torch.Tensor.relu}[self.activation](h)
        logits = self.l2(h)
        return logits if targets is None else F.cross_entropy(logits, targets)


class LanguageModel(nn.Module):
    """A next-token model as such models are written: (B, T) ids -> (B, T, V) logits, and the loss when given
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
            return F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), self.class_weight, ignore_index=5,
                                   reduction="sum", label_smoothing=0.05)
        if self.loss == "softcapped":  # Gemma 2's final logit soft-capping, on the (B, T, V) logits
            return F.cross_entropy((torch.tanh(logits / 2.0) * 2.0).view(-1, VOCAB), targets.view(-1))
        if self.loss == "softcapped-rows":  # the same on the (rows, V) logits, x * (1 / k) inside
            return F.cross_entropy(2.0 * (logits.view(-1, VOCAB) * 0.5).tanh(), targets.view(-1), reduction="sum")
        if self.loss == "infinite-cap":  # inf tanh(x / inf) is NaN; fastlm's ops refuse an infinite cap
            return F.cross_entropy((torch.tanh(logits / math.inf) * math.inf).view(-1, VOCAB), targets.view(-1))
        if self.loss == "capped-twice-in-code":  # 3 tanh(2 tanh(x / 2) / 3): one fused cap would drop the other
            capped = (torch.tanh(logits / 2.0) * 2.0).view(-1, VOCAB)
            return F.cross_entropy(torch.tanh(capped / 3.0) * 3.0, targets.view(-1))
        if self.loss == "inverted-cap":  # 2 tanh(2 / x): not a soft cap
            return F.cross_entropy((torch.tanh(2.0 / logits) * 2.0).view(-1, VOCAB), targets.view(-1))
        if self.loss == "negative-cap":  # -2 tanh(x / -2): the soft cap of 2 written oddly; fastlm's takes k > 0
            return F.cross_entropy((torch.tanh(logits / -2.0) * -2.0).view(-1, VOCAB), targets.view(-1))
        if self.loss == "logits-also-used":  # the loss's own input feeds something else too: it stays
            flat = logits.view(-1, VOCAB)
            return F.cross_entropy(flat, targets.view(-1)) + 0.01 * flat.mean()
        if self.loss == "legacy-reduce":  # the deprecated reduce=False: per-row losses
            return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), reduce=False)
        if self.loss == "uneven-cap-product":  # 2 tanh(x * 0.25): not a soft cap
            return F.cross_entropy(2.0 * (logits.view(-1, VOCAB) * 0.25).tanh(), targets.view(-1))
        if self.loss == "cap-source-also-used":  # the uncapped logits feed something else too: they stay
            capped = torch.tanh(logits / 2.0) * 2.0
            return F.cross_entropy(capped.view(-1, VOCAB), targets.view(-1)) + 0.01 * logits.mean()
        if self.loss in ("cap-tanh-also-used", "cap-quotient-also-used"):  # a step of the cap feeds more: it stays
            quotient = logits / 2.0
            tanh = torch.tanh(quotient)
            other = tanh if self.loss == "cap-tanh-also-used" else quotient
            return F.cross_entropy((tanh * 2.0).view(-1, VOCAB), targets.view(-1)) + 0.01 * other.mean()
        if self.loss == "product-also-used":  # x @ W + b whose product feeds something else too: it stays
            product = hidden @ self.head.weight.T
            return F.cross_entropy((product + self.head.bias).view(-1, VOCAB), targets.view(-1)) + 0.01 * product.mean()
        if self.loss == "row-bias-product":  # x @ W + b with a (1, V) bias, which the fused ops do not take
            logits = hidden @ self.head.weight.T + self.head.bias.view(1, -1)
            return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))
        if self.loss == "uneven-cap":  # 3 tanh(x / 2): not a soft cap
            return F.cross_entropy((torch.tanh(logits / 2.0) * 3.0).view(-1, VOCAB), targets.view(-1))
        if self.loss == "capped-twice":  # a soft cap in the code and fastlm's own
            return fastlm.ops.cross_entropy((torch.tanh(logits / 2.0) * 2.0).view(-1, VOCAB), targets.view(-1),
                                            softcap=1.5)
        if self.loss == "fastlm-softcap":  # fastlm's own loss with an option only it has
            return fastlm.ops.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), label_smoothing=0.1, softcap=2.0)
        if self.loss == "raw-op":  # fastlm's op itself, which takes the logits' dtype as it comes (no autocast rule)
            loss, _ = torch.ops.fastlm.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), None, -100, "mean",
                                                     0.0, 0.0, 0.0, False)
            return loss
        if self.loss == "returns-logits":
            return logits, F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))
        if self.loss == "probabilities":
            return F.cross_entropy(logits.view(-1, VOCAB), F.one_hot(targets.view(-1), VOCAB).float())
        if self.loss == "class-dim-1":  # (B, V, T) logits
            return F.cross_entropy(logits.transpose(1, 2), targets)
        raise ValueError(self.loss)


class LectureMLP(nn.Module):
    """The makemore MLP as the lectures write it: parameter tensors, ``C[X]`` and ``x @ W + b``; ``form`` picks how
    the products and sums are spelled."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.C = nn.Parameter(torch.randn(VOCAB, EMBED))
        self.W1 = nn.Parameter(torch.randn(CONTEXT * EMBED, HIDDEN) * 0.2)
        self.W2 = nn.Parameter(torch.randn(HIDDEN, VOCAB) * 0.1)
        with_bias = form != "x @ W"
        self.b1 = nn.Parameter(torch.randn(HIDDEN) * 0.1) if with_bias else None
        self.b2 = nn.Parameter(torch.randn(VOCAB) * 0.1) if with_bias else None

    def linear(self, x, W, b):
        if self.form == "x @ W + b":
            return x @ W + b
        if self.form == "b + x.matmul(W)":
            return b + x.matmul(W)
        if self.form == "torch.add(torch.mm(x, W), b)":
            return torch.add(torch.mm(x, W), b)
        if self.form == "x @ W":
            return x @ W
        raise ValueError(self.form)

    def forward(self, idx, targets):
        emb = self.C[idx]
        h = torch.tanh(self.linear(emb.view(emb.shape[0], -1), self.W1, self.b1))
        return F.cross_entropy(self.linear(h, self.W2, self.b2), targets)


def converted_pair(model: nn.Module, backend: str | None = None):
    return model, fastlm.convert(copy.deepcopy(model), backend=backend, fuse_forward_code=True)


def batch(rows: int, per_position: bool = False, device="cpu"):
    return (torch.randint(0, VOCAB, (rows, CONTEXT), device=device),
            torch.randint(0, VOCAB, (rows, CONTEXT) if per_position else (rows,), device=device))


def assert_same_step(model, converted, idx, targets, upstream=None, lr=0.0):
    """The two models' outputs on one batch, their gradients after a backward from ``upstream``, and their
    parameters and buffers after an SGD step of ``lr``; returns the converted model's output."""
    expected, got = model(idx, targets), converted(idx, targets)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    upstream = torch.rand_like(expected) + 0.5 if upstream is None else upstream
    expected.backward(upstream)
    got.backward(upstream)
    with torch.no_grad():
        for (name, p), q in zip(model.named_parameters(), converted.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)  # or both None
                if p.grad is not None:
                    p -= lr * p.grad
                    q -= lr * q.grad
                p.grad = q.grad = None
    for (name, b), c in zip(model.named_buffers(), converted.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)
    return got


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda", "torch"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "relu-method"])
def test_makemore_mlp_written_out_is_fused(activation, backend):
    device = device_to_test(backend)
    torch.manual_seed(0)
    model, converted = converted_pair(MakemoreMLP(activation).to(device), backend)
    for rows in (32, 17, 32, 9):  # training steps; new batch sizes are captured again
        loss = assert_same_step(model, converted, *batch(rows, device=device), lr=0.1)
    nodes = autograd_nodes(loss)
    if backend != "torch":  # the torch backend is autograd over torch's own ops
        assert {"EmbeddingLinear", "BatchNorm", "LinearCrossEntropy"} <= nodes, nodes
        assert not {"EmbeddingBackward0", "TanhBackward0", "ReluBackward0", "NllLossBackward0"} & nodes, nodes
    model.eval(), converted.eval()
    idx, _ = batch(5, device=device)
    torch.testing.assert_close(converted(idx), model(idx), rtol=1e-5, atol=1e-6)  # the branch without targets


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda", "torch"])
@pytest.mark.parametrize("loss", ["module", "functional", "per-row", "fastlm-softcap", "raw-op", "softcapped",
                                  "softcapped-rows"])
def test_final_linear_and_loss_are_fused(loss, backend):
    device = device_to_test(backend)
    torch.manual_seed(0)
    model, converted = converted_pair(LanguageModel(loss).to(device), backend)
    for rows in (4, 7, 1, 10):  # new batch sizes: captured again, then with dynamic shapes
        got = assert_same_step(model, converted, *batch(rows, per_position=True, device=device))
        fused = "LinearCrossEntropy" in autograd_nodes(got)
        # The torch backend forms the logits itself; fastlm's own loss keeps the backend it was called with (cpp).
        assert fused == (backend != "torch" or loss in ("fastlm-softcap", "raw-op")), got.grad_fn


@pytest.mark.parametrize("form", ["x @ W + b", "b + x.matmul(W)", "torch.add(torch.mm(x, W), b)", "x @ W"])
def test_the_lectures_tensor_code_is_fused(form):
    torch.manual_seed(0)
    model, converted = converted_pair(LectureMLP(form))
    for rows in (32, 17, 32):
        loss = assert_same_step(model, converted, *batch(rows), lr=0.1)
    nodes = autograd_nodes(loss)
    assert {"EmbeddingLinear", "LinearCrossEntropy"} <= nodes, nodes
    assert not {"IndexBackward0", "MmBackward0", "AddBackward0", "NllLossBackward0"} & nodes, nodes  # biases inside


def test_negative_indices_read_the_table_as_indexing_does():
    """table[-1] is the last row: the fused lookup wraps negative indices as eager indexing does."""
    torch.manual_seed(0)
    model, converted = converted_pair(LectureMLP("x @ W + b"))
    idx, targets = batch(6)
    idx[0, 0], idx[3, 2] = -1, -VOCAB
    loss = assert_same_step(model, converted, idx, targets)
    assert "EmbeddingLinear" in autograd_nodes(loss)


def test_a_table_of_a_new_size_at_each_call_is_fused_in_every_capture():
    """A table passed in, of another size at each call: the second capture is dynamic, its row count symbolic,
    and the wrapping of negative ids reads it when the graph runs."""
    def first_layer(table, idx, weight):
        return table[idx].view(idx.shape[0], -1) @ weight

    backend = FuseGraph()
    compiled = torch.compile(first_layer, backend=backend)
    torch.manual_seed(0)
    for rows in (29, 31, 37):
        table, weight = torch.randn(rows, EMBED, requires_grad=True), torch.randn(CONTEXT * EMBED, 5)
        idx = torch.randint(-rows, rows, (8, CONTEXT))
        got, expected = compiled(table, idx, weight), first_layer(table, idx, weight)
        torch.testing.assert_close(got, expected)
        upstream = torch.randn_like(got)
        torch.testing.assert_close(torch.autograd.grad(got, table, upstream),
                                   torch.autograd.grad(expected, table, upstream))
        assert "EmbeddingLinear" in autograd_nodes(got)
    assert backend.fused["embedding_linear"] == 2  # the first size's capture, then the dynamic one


def test_the_lectures_code_under_autocast_runs_as_written():
    """Under autocast ``x @ W`` is bfloat16 and ``+ b`` promotes it back to float32: no fused op gives that."""
    model, converted = converted_pair(LectureMLP("x @ W + b"))
    idx, targets = batch(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = model(idx, targets), converted(idx, targets)
    torch.testing.assert_close(got, expected)
    assert not {"EmbeddingLinear", "LinearCrossEntropy"} & autograd_nodes(got)


@pytest.mark.parametrize("loss", ["module", "raw-op"])
def test_fastlms_loss_after_an_autocast_linear_runs_as_written(loss):
    """Under autocast the head's logits are bfloat16 and nn.CrossEntropyLoss, converted to fastlm's op, takes them
    as they are (as fastlm's raw op does): a fused op over the float32 hidden states would compute another loss."""
    model, converted = converted_pair(LanguageModel(loss))
    idx, targets = batch(6, per_position=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = model(idx, targets), converted(idx, targets)
    torch.testing.assert_close(got, expected)
    assert "LinearCrossEntropy" not in autograd_nodes(got)


def test_fastlms_loss_on_a_named_backend_stays_on_it_when_fused():
    """nn.CrossEntropyLoss converted with backend="triton" traces fastlm's op for Triton: the linear + cross-entropy
    that replaces it runs the Triton kernels too."""
    skip_unless_runs("triton")
    model, converted = converted_pair(LanguageModel("module"), "triton")
    idx, targets = batch(6, per_position=True)
    called = fastlm_ops_called(lambda: assert_same_step(model, converted, idx, targets))
    assert "fastlm::linear_cross_entropy" in called and "fastlm::triton_cross_entropy_forward" in called, called


def test_a_branch_not_taken_at_capture_still_runs():
    model, converted = converted_pair(LanguageModel("module"))
    idx, targets = batch(6, per_position=True)
    assert "LinearCrossEntropy" in autograd_nodes(assert_same_step(model, converted, idx, targets))
    torch.testing.assert_close(converted(idx), model(idx))  # targets=None: the logits, as written


@pytest.mark.parametrize("loss", ["returns-logits", "probabilities", "class-dim-1", "uneven-cap", "inverted-cap",
                                  "negative-cap", "uneven-cap-product", "cap-source-also-used", "cap-tanh-also-used",
                                  "cap-quotient-also-used", "product-also-used", "row-bias-product", "logits-also-used",
                                  "legacy-reduce", "capped-twice", "capped-twice-in-code", "infinite-cap"])
def test_a_loss_that_cannot_be_fused_runs_as_written(loss):
    model, converted = converted_pair(LanguageModel(loss))
    idx, targets = batch(6, per_position=True)
    if loss == "returns-logits":
        (logits, got), (expected_logits, expected) = converted(idx, targets), model(idx, targets)
        torch.testing.assert_close(logits, expected_logits)
        torch.testing.assert_close(got, expected)
    elif loss == "infinite-cap":
        got = converted(idx, targets)
        assert got.isnan() and model(idx, targets).isnan()
    else:
        got = assert_same_step(model, converted, idx, targets)
    assert "LinearCrossEntropy" not in autograd_nodes(got)


def test_int32_targets_are_refused_as_the_code_refuses_them():
    """F.cross_entropy refuses int32 targets (fastlm's loss takes them): the fused graph must not accept them."""
    model, converted = converted_pair(LanguageModel("functional"))
    idx, targets = batch(6, per_position=True)
    for runs in (model, converted):
        with pytest.raises(RuntimeError, match="Long"):
            runs(idx, targets.int())


class FirstLayer(nn.Module):
    """An embedding and a linear layer joined in the forward in ways the fused op does not compute."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.embedding = nn.Embedding(VOCAB, EMBED, max_norm=1.0 if how == "max_norm" else None)
        self.linear = nn.Linear(EMBED if how == "per-token" else CONTEXT * EMBED, HIDDEN)

    def forward(self, idx):
        emb = self.embedding(idx)
        if self.how == "per-token":  # (B*T, D) rows, each through the linear
            return self.linear(emb.view(-1, EMBED))
        if self.how == "emb-also-returned":
            return self.linear(emb.view(idx.shape[0], -1)), emb
        if self.how == "flat-also-used":  # the flattened embeddings feed something else too: they stay
            flat = emb.view(idx.shape[0], -1)
            return self.linear(flat) + flat.sum(1, keepdim=True)
        if self.how == "vector-matmul":  # x @ w with a 1D w: one output per row
            return emb.view(idx.shape[0], -1) @ self.linear.weight[0]
        if self.how in ("windows", "windows-indexed"):  # (2, B/2, T) ids, each window's embeddings a row
            windows = idx.view(2, -1, CONTEXT)
            emb = self.embedding(windows) if self.how == "windows" else self.embedding.weight[windows]
            return self.linear(emb.view(idx.shape[0], -1))
        if self.how == "integer-table":  # a lookup of integers and an integer product
            table = torch.arange(VOCAB * EMBED).view(VOCAB, EMBED)
            return table[idx].view(idx.shape[0], -1) @ torch.ones(CONTEXT * EMBED, 3, dtype=torch.int64)
        if self.how == "vector-weight":  # F.linear with a 1D weight: one output per row
            return F.linear(emb.view(idx.shape[0], -1), self.linear.weight[0])
        if self.how == "three-dims":  # (B, 1, T*D): the fused op's output would lack the middle dim
            return self.linear(emb.view(idx.shape[0], 1, -1))
        return self.linear(emb.view(idx.shape[0], -1))


@pytest.mark.parametrize("how", ["per-token", "emb-also-returned", "max_norm", "three-dims", "flat-also-used",
                                 "vector-weight", "vector-matmul", "windows", "windows-indexed", "integer-table"])
def test_an_embedding_that_cannot_be_fused_runs_as_written(how):
    torch.manual_seed(0)
    model, converted = converted_pair(FirstLayer(how))
    idx = batch(8)[0]
    expected, got = model(idx), converted(idx)
    torch.testing.assert_close(got, expected)
    nodes = autograd_nodes(got[0] if how == "emb-also-returned" else got)
    assert "EmbeddingLinear" not in nodes
    lookup = {"windows-indexed": "IndexBackward0", "integer-table": None}.get(how, "EmbeddingBackward0")
    assert lookup is None or lookup in nodes, nodes  # the lookup ran as written


class ModeBoundary(nn.Module):
    """The makemore MLP with one part run under another grad mode or autocast than the next, or with a linear
    layer in a form the fused ops do not take."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.embedding = nn.Embedding(VOCAB, EMBED)
        self.l1 = nn.Linear(CONTEXT * EMBED, HIDDEN)
        self.bn = nn.BatchNorm1d(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)
        self.row_bias = nn.Parameter(torch.randn(1, VOCAB) * 0.1)

    def forward(self, idx, targets):
        with torch.set_grad_enabled(self.how != "frozen-lookup"):
            emb = self.embedding(idx)
        h = self.bn(self.l1(emb.view(idx.shape[0], -1)))
        with torch.set_grad_enabled(self.how != "no-grad-tanh"):
            h = torch.tanh(h)
        if self.how == "frozen-head":
            with torch.no_grad():
                logits = self.head(h)
        elif self.how == "head-in-inference-mode":
            with torch.inference_mode():
                logits = self.head(h)
        elif self.how == "head-under-autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = self.head(h)
        elif self.how == "broadcast-bias":  # a (1, V) bias
            logits = F.linear(h, self.head.weight, self.row_bias)
        else:
            logits = self.head(h)
        return F.cross_entropy(logits, targets)


@pytest.mark.parametrize("how", ["frozen-lookup", "no-grad-tanh", "frozen-head", "head-in-inference-mode",
                                 "head-under-autocast", "broadcast-bias"])
def test_parts_under_other_modes_and_other_linears_run_as_written(how):
    """A fusion across a change of grad mode put the fused op where the later part ran: a lookup or a tanh the
    forward ran under no_grad got gradients (the frozen embedding trained); across autocast the loss changed
    dtype. F.linear with a (1, V) bias was taken as a linear and the fused op refused the bias."""
    torch.manual_seed(3)
    model, converted = converted_pair(ModeBoundary(how))
    idx, targets = batch(8)
    if how in ("frozen-head", "head-in-inference-mode"):  # nothing in the loss needs a gradient, in either model
        expected, got = model(idx, targets), converted(idx, targets)
        torch.testing.assert_close(got, expected)
        assert not got.requires_grad and not expected.requires_grad
        return
    assert_same_step(model, converted, idx, targets, lr=0.1)
    assert_same_step(model, converted, idx, targets)


class NormThenActivation(nn.Module):
    """A BatchNorm and an activation after it, joined in ways the fused op does not compute."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.embedding = nn.Embedding(VOCAB, EMBED)
        own = how == "norm-with-its-own-activation"  # fastlm's BatchNorm with a fused tanh, then a relu
        self.bn = fastlm.nn.BatchNorm1d(CONTEXT * EMBED, activation="tanh") if own else nn.BatchNorm1d(CONTEXT * EMBED)

    def forward(self, idx, targets):
        h = self.bn(self.embedding(idx).view(idx.shape[0], -1))
        if self.how == "inplace-relu":
            return F.relu(h, inplace=True).square().mean()
        if self.how == "norm-also-used":  # the normalised values feed something else too
            return (torch.tanh(h) + h).square().mean()
        return torch.relu(h).square().mean()


class RawBatchNormThenTanh(nn.Module):
    """fastlm's BatchNorm op called as the packet, options by keyword, then torch.tanh: fused."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(HIDDEN)

    def forward(self, x):
        bn = self.bn
        return torch.tanh(torch.ops.fastlm.batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                      training=True, momentum=0.1, eps=1e-5, unbiased=False,
                                                      activation=0))


def test_fastlms_raw_batch_norm_op_is_fused_with_its_activation():
    torch.manual_seed(5)
    model = RawBatchNormThenTanh()
    backend = FuseGraph()
    compiled = torch.compile(copy.deepcopy(model), backend=backend)
    x = torch.randn(9, HIDDEN, requires_grad=True)
    got, expected = compiled(x), model(x)
    torch.testing.assert_close(got, expected)
    assert backend.fused["batch_norm_activation"] == 1 and "TanhBackward0" not in autograd_nodes(got)
    torch.testing.assert_close(torch.autograd.grad(got.square().sum(), x),
                               torch.autograd.grad(expected.square().sum(), x))
    for stat in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(compiled.bn, stat), getattr(model.bn, stat))


@pytest.mark.parametrize("how", ["inplace-relu", "norm-also-used", "norm-with-its-own-activation"])
def test_a_batch_norm_and_activation_that_cannot_be_fused_run_as_written(how):
    torch.manual_seed(4)
    model, converted = converted_pair(NormThenActivation(how))
    got = assert_same_step(model, converted, *batch(8), lr=0.1)
    assert {"TanhBackward0", "ReluBackward0"} & autograd_nodes(got), autograd_nodes(got)


def test_state_dict_is_the_torch_models():
    model, converted = converted_pair(MakemoreMLP("tanh"))
    assert list(converted.state_dict()) == list(model.state_dict())
    fresh = MakemoreMLP("tanh")
    fresh.load_state_dict(converted.state_dict())
    idx, targets = batch(5)
    torch.testing.assert_close(fresh(idx, targets), converted(idx, targets))


@pytest.mark.parametrize("loss", ["functional", "module"])
def test_autocast_keeps_the_torch_loss_dtype_and_value(loss):
    """F.cross_entropy's form is fused with autocast's semantics; fastlm's op, which runs with autocast off on the
    logits autocast made, is left as it is."""
    model, converted = converted_pair(LanguageModel(loss))
    idx, targets = batch(8, per_position=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = model(idx, targets), converted(idx, targets)
    assert ("LinearCrossEntropy" in autograd_nodes(got)) == (loss == "functional")
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=0)


def test_backend_counts_the_fusions_of_each_capture():
    model = fastlm.convert(MakemoreMLP("tanh"))
    backend = FuseGraph()
    compiled = torch.compile(model, backend=backend)
    idx, targets = batch(4)
    compiled(idx, targets)
    compiled(idx)  # the logits branch: a second graph, with no loss in it
    assert backend.fused == {"embedding_linear": 2, "batch_norm_activation": 2, "linear_cross_entropy": 1}


class TwoProducts(nn.Module):
    """Embeddings through two products, the second one's sum fed to the loss: x @ W1 @ W2 + b2."""

    def __init__(self):
        super().__init__()
        self.C = nn.Parameter(torch.randn(VOCAB, EMBED))
        self.W1 = nn.Parameter(torch.randn(CONTEXT * EMBED, HIDDEN) * 0.2)
        self.W2 = nn.Parameter(torch.randn(HIDDEN, VOCAB) * 0.2)
        self.b2 = nn.Parameter(torch.randn(VOCAB) * 0.1)

    def forward(self, idx, targets):
        return F.cross_entropy(self.C[idx].view(idx.shape[0], -1) @ self.W1 @ self.W2 + self.b2, targets)


def test_a_fused_op_keeps_the_value_of_the_node_it_replaced_for_the_fusions_after_it():
    """The embedding + linear, fused first, is the second product's input, which the loss's fusion then reads the
    example value of."""
    torch.manual_seed(0)
    model, converted = converted_pair(TwoProducts())
    loss = assert_same_step(model, converted, *batch(8))
    assert {"EmbeddingLinear", "LinearCrossEntropy"} <= autograd_nodes(loss)


def test_a_graph_that_already_ran_runs_rewritten():
    """fuse_graph on a captured graph module after its first call, which generated its code: the rewrite
    generates it again."""
    captured = []

    def keep(graph_module, example_inputs):
        captured.append((graph_module, example_inputs))
        return graph_module.forward

    torch.compile(LectureMLP("x @ W + b"), backend=keep)(*batch(8))
    (graph_module, inputs), = captured
    (expected,) = graph_module(*inputs)
    assert fuse_graph(graph_module) == {"embedding_linear": 1, "batch_norm_activation": 0, "linear_cross_entropy": 1}
    (got,) = graph_module(*inputs)
    torch.testing.assert_close(got, expected)
    assert {"EmbeddingLinear", "LinearCrossEntropy"} <= autograd_nodes(got)


def test_graphs_can_go_on_to_inductor():
    torch.manual_seed(0)
    model = MakemoreMLP("tanh")
    backend = FuseGraph(compiler="inductor")
    compiled = torch.compile(fastlm.convert(copy.deepcopy(model)), backend=backend)
    idx, targets = batch(16)
    expected, got = model(idx, targets), compiled(idx, targets)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert backend.fused == {"embedding_linear": 1, "batch_norm_activation": 1, "linear_cross_entropy": 1}
    assert autograd_nodes(got) == {"CompiledFunctionBackward", "AccumulateGrad"}  # Inductor's graph
    expected.backward(), got.backward()
    for (name, p), q in zip(model.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_converted_sequential_runs_through_its_fused_layers():
    """convert's own nn.Sequential fusion and the graph's meet: the forward of its FusedSequential is captured."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, EMBED), nn.Flatten(), nn.Linear(CONTEXT * EMBED, HIDDEN),
                          nn.BatchNorm1d(HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, VOCAB))
    model, converted = converted_pair(model)
    for rows in (16, 9):
        idx, _ = batch(rows)
        expected, got = model(idx), converted(idx)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        upstream = torch.randn_like(expected)
        expected.backward(upstream), got.backward(upstream)
        for (name, p), q in zip(model.named_parameters(), converted.parameters()):
            # atol for the bias before BatchNorm, whose gradient is zero up to rounding (~1e-6 either way)
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
            p.grad = q.grad = None
    assert {"EmbeddingLinear", "BatchNorm"} <= autograd_nodes(got)


def ddp_rank(rank: int, port: int, out_dir: str) -> None:
    with gloo_process_group(rank, 2, port):
        saved = ddp_gradients(rank)  # its DistributedDataParallel models gone before the group (see the helper)
    torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))


def ddp_gradients(rank: int) -> dict:
    """Two backward passes (their gradients accumulating) of the torch model and its converted twin, each inside
    DistributedDataParallel, on this rank's own batches: both models' all-reduced gradients and the converted
    model's autograd nodes."""
    torch.manual_seed(0)
    model, converted = converted_pair(MakemoreMLP("tanh"))
    parallel = [nn.parallel.DistributedDataParallel(m) for m in (model, converted)]
    torch.manual_seed(1 + rank)
    for rows in (16, 11):
        idx, targets = batch(rows)
        losses = [m(idx, targets) for m in parallel]
        for loss in losses:
            loss.backward()
    return {"torch": [p.grad for p in model.parameters()], "fused": [p.grad for p in converted.parameters()],
            "nodes": autograd_nodes(losses[1])}


def test_converted_model_trains_under_ddp(tmp_path):
    spawn_ranks(ddp_rank, (free_port(), str(tmp_path)), 2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for saved in ranks:
        assert {"EmbeddingLinear", "BatchNorm", "LinearCrossEntropy"} <= saved["nodes"]
        for fused, expected in zip(saved["fused"], saved["torch"]):
            torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-6)
    for fused, other_rank in zip(ranks[0]["fused"], ranks[1]["fused"]):  # all-reduced: one gradient on every rank
        torch.testing.assert_close(fused, other_rank, rtol=0, atol=0)


def test_every_converted_model_of_a_class_is_fused():
    """Twelve converted models of one class, six of them deleted along the way: each runs fused. One compile
    backend per fastlm backend lets the instances share their captures; with a new one per model, dynamo's
    recompile limit (8 per forward code) was reached by the ninth model, dead ones counted, which ran unfused."""
    torch._dynamo.reset()
    kept = []
    for i in range(12):
        torch.manual_seed(i)
        model, converted = converted_pair(LanguageModel("functional"), "cpp")
        got = assert_same_step(model, converted, *batch(6, per_position=True))
        assert "LinearCrossEntropy" in autograd_nodes(got), i
        if i % 2:
            kept.append(converted)
