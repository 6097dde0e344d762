"""The makemore models of the lecture notes, each as a plain-PyTorch reference and a fused twin.

One class per architecture; ``fused`` picks its layers: ``ReferenceEmbeddingLinear``/``ReferenceBatchNorm1d``
and ``F.cross_entropy`` for the reference, ``fastlm.nn.EmbeddingLinear``/``fastlm.nn.BatchNorm1d`` (with the
activation fused) and ``fastlm.ops.cross_entropy`` for the twin. Both twins register the same parameters
under the same names and draw the same initial values from the same RNG in the same order.

The fused loss is the output nn.Linear and fastlm's cross-entropy, not ``linear_cross_entropy``: with a
27-character vocabulary the (B, vocab) logits are a few KB, and the op that avoids holding them (by
chunking) measured slower here (mlp-bn, batch 32, one CPU thread: 365 us per training step against 327 us).

Learnable tensors are kept in the nn.Embedding/nn.Linear layout. The lectures write ``x @ W + b`` with W of
shape (in, out); here ``linear.weight`` is (out, in), i.e. W.T. For the MLPs:
    C (vocab, embedding)                   first.embedding.weight = C
    W1 (context * embedding, hidden), b1   first.linear.weight = W1.T, first.linear.bias = b1
    bngain, bnbias (1, hidden)             bn.weight, bn.bias (hidden,)
    W2 (hidden, vocab), b2                 output.weight = W2.T, output.bias = b2
The neural bigram's W (vocab, vocab) multiplies a one-hot row, which picks row x of W: it is the weight of
an nn.Embedding as it stands (``embedding.weight`` = W, no transpose).

Every model: ``model(idx)`` -> (B, vocab) logits for idx (B, model.context) of int64 ids, ``model.loss(idx,
targets)`` -> the mean loss, ``model.loss_and_grads(idx, targets)`` -> the mean loss and the gradient of each of
``model.parameters()`` (a training step's forward and backward), ``model.sgd_step(idx, targets, lr)`` -> the
loss of a plain-SGD step taken in place, and ``model.recipe`` (how the lecture trains it; fastlm.train turns it
into a schedule and an optimizer). The fused MLPs' ``loss_and_grads`` and ``sgd_step`` on the CPU are one kernel
call for the whole network (``fastlm.ops.mlp_loss_and_grads``, ``mlp_sgd_step``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlm.models.layers import ReferenceBatchNorm1d, ReferenceEmbeddingLinear
from fastlm.nn import BatchNorm1d, EmbeddingLinear
from fastlm.nn.embedding_linear import has_hooks
from fastlm import backends
from fastlm.ops import cross_entropy, mlp_loss_and_grads, mlp_sgd_step

@dataclass(frozen=True)
class Recipe:
    """How the lecture trains a model: ``optimizer`` ("sgd" is the lectures' ``p.data += -lr * p.grad``,
    "adam", or None for a model fit by counting), learning rate ``lr`` (times ``decay`` from step
    ``decay_at`` on), ``steps``, and ``batch_size`` (None: the whole training set every step)."""

    optimizer: str | None
    lr: float = 0.0
    steps: int = 0
    batch_size: int | None = 32
    decay_at: int | None = None
    decay: float = 1.0


def layers_rng():
    """Where the layers are built: their own default initialisation runs on a forked RNG, so a model takes
    from the caller's RNG exactly the lecture's draws (``reset_parameters``), whatever its layers draw when
    built, and both twins take the same."""
    return torch.random.fork_rng(devices=[])


class MakemoreModel(nn.Module):
    """The shared interface and the choice of layers. Subclasses define ``forward``, or an ``output``
    nn.Linear and ``hidden_state(idx)``, its input."""

    recipe: Recipe

    def __init__(self, fused: bool, backend: str | None, vocab_size: int, context: int):
        super().__init__()
        self.fused = fused
        self.backend = backend
        self.vocab_size = vocab_size
        self.context = context

    def embedding_linear(self, vocab: int, dim: int, context: int, out: int, bias: bool = True) -> nn.Module:
        if self.fused:
            return EmbeddingLinear(vocab, dim, context, out, bias, backend=self.backend)
        return ReferenceEmbeddingLinear(vocab, dim, context, out, bias)

    def batch_norm(self, features: int, **options) -> nn.Module:
        if self.fused:
            return BatchNorm1d(features, backend=self.backend, **options)
        return ReferenceBatchNorm1d(features, **options)

    def forward(self, idx: Tensor) -> Tensor:
        return self.output(self.hidden_state(idx))

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """The mean cross-entropy of the next ids. In the fused twin the gradient is written over the logits,
        which nothing else uses (the output layer's backward needs its input and weight only)."""
        logits = self(idx)
        if self.fused:
            return cross_entropy(logits, targets, inplace_backward=True, backend=self.backend)
        return F.cross_entropy(logits, targets)

    def loss_and_grads(self, idx: Tensor, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The mean loss (detached) and its gradient with respect to each of ``self.parameters()``, in that
        order: the forward and backward of a training step, leaving ``.grad`` untouched (none for the counting
        bigram, which has no parameters)."""
        loss, params = self.loss(idx, targets), list(self.parameters())
        return loss.detach(), list(torch.autograd.grad(loss, params)) if params else []

    def sgd_step(self, idx: Tensor, targets: Tensor, lr: float) -> Tensor:
        """One step of plain SGD, ``p -= lr * grad`` for every parameter (the lectures' update), leaving ``.grad``
        untouched; returns the loss before the step (detached)."""
        loss, grads = self.loss_and_grads(idx, targets)
        if grads:
            with torch.no_grad():
                torch._foreach_add_(list(self.parameters()), grads, alpha=-lr)
        return loss


def check_bigram_context(context: int) -> None:
    if context != 1:
        raise ValueError(f"a bigram model conditions on one character: context must be 1, got {context}")


class BigramCounts(MakemoreModel):
    """The counting bigram of part 1: P[i, j] = (N[i, j] + 1) / sum_k (N[i, k] + 1), N the bigram counts of the
    training data (add-one smoothing). The logits are log P, so the loss is the mean negative log-likelihood.
    Fit by ``fit(X, Y)``, not by gradient steps; the fused twin evaluates the loss with fastlm's
    cross-entropy. The buffer ``counts`` holds N + smoothing."""

    recipe = Recipe(None, batch_size=None)

    def __init__(self, *, fused: bool = False, context: int = 1, vocab_size: int = 27, smoothing: float = 1.0,
                 backend: str | None = None):
        check_bigram_context(context)
        super().__init__(fused, backend, vocab_size, context)
        self.smoothing = smoothing
        self.register_buffer("counts", torch.full((vocab_size, vocab_size), smoothing))

    @torch.no_grad()
    def fit(self, X: Tensor, Y: Tensor) -> "BigramCounts":
        """Counts the pairs (last id of each row of X, Y)."""
        V = self.vocab_size
        counts = torch.bincount((X[:, -1] * V + Y).to(self.counts.device), minlength=V * V).view(V, V)
        self.counts.copy_(counts + self.smoothing)
        return self

    def forward(self, idx: Tensor) -> Tensor:
        return (self.counts / self.counts.sum(1, keepdim=True)).log()[idx[:, -1]]


class Bigram(MakemoreModel):
    """The neural bigram of part 1: logits = one_hot(x) @ W with W ~ randn(vocab, vocab), loss = NLL +
    0.01 * (W**2).mean(), trained full-batch by gradient descent at lr 50 (Karpathy's makemore part 1). The
    penalty is part of the training objective only: in eval mode the loss is the NLL, which the splits report."""

    recipe = Recipe("sgd", lr=50.0, steps=100, batch_size=None)
    regularization = 0.01

    def __init__(self, *, fused: bool = False, context: int = 1, vocab_size: int = 27, backend: str | None = None,
                 generator: torch.Generator | None = None):
        check_bigram_context(context)
        super().__init__(fused, backend, vocab_size, context)
        with layers_rng():
            self.embedding = nn.Embedding(vocab_size, vocab_size)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        self.embedding.weight.copy_(torch.randn(self.vocab_size, self.vocab_size, generator=generator))

    def forward(self, idx: Tensor) -> Tensor:
        return self.embedding(idx[:, -1])

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        nll = super().loss(idx, targets)
        return nll + self.regularization * (self.embedding.weight ** 2).mean() if self.training else nll


class MLP(MakemoreModel):
    """Bengio et al.'s MLP: embedding, linear over the concatenated context, tanh, linear.

    ``batchnorm=False``: part 2, every tensor drawn from randn. ``batchnorm=True``: the part 4 /
    manual-backprop network, linear -> BatchNorm with the Bessel-corrected batch variance -> tanh ->
    linear, initialised as in makemore-manual-backprop (W1 * (5/3) / sqrt(embedding * context), b1 * 0.1,
    W2 * 0.1, b2 * 0.1, bngain = 1.1, bnbias = 0). The notes keep no running statistics and calibrate
    them after training (``calibrate_batchnorm``); the running stats kept here move by ``momentum`` 0.001,
    part 3's ``bnmean_running = 0.999 * bnmean_running + 0.001 * bnmeani`` (with the variance in place of
    its standard deviation). Trained with SGD, batch 32, lr 0.1 for 100k steps then 0.01 for 100k.
    """

    recipe = Recipe("sgd", lr=0.1, steps=200_000, batch_size=32, decay_at=100_000, decay=0.1)

    def __init__(self, *, fused: bool = False, batchnorm: bool = False, context: int = 3, vocab_size: int = 27,
                 embedding: int = 10, hidden: int = 200, momentum: float = 0.001, backend: str | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(fused, backend, vocab_size, context)
        self.batchnorm = batchnorm
        with layers_rng():
            self.first = self.embedding_linear(vocab_size, embedding, context, hidden)
            if batchnorm:
                self.bn = self.batch_norm(hidden, momentum=momentum, unbiased=True, activation="tanh")
            self.output = nn.Linear(hidden, vocab_size)
        self._work_per_row = hidden * (context * embedding + vocab_size)  # multiply-adds of a row's forward
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        embedding = self.first.embedding.embedding_dim
        fan_in, hidden = self.first.linear.in_features, self.output.in_features
        C = torch.randn(self.vocab_size, embedding, generator=generator)
        W1 = torch.randn(fan_in, hidden, generator=generator)
        b1 = torch.randn(hidden, generator=generator)
        W2 = torch.randn(hidden, self.vocab_size, generator=generator)
        b2 = torch.randn(self.vocab_size, generator=generator)
        if self.batchnorm:  # the notes' expressions as written, rounding included
            W1 = W1 * (5 / 3) / fan_in ** 0.5
            b1, W2, b2 = b1 * 0.1, W2 * 0.1, b2 * 0.1
            self.bn.reset_running_stats()
            self.bn.weight.fill_(1.1)
            self.bn.bias.zero_()
        self.first.embedding.weight.copy_(C)
        self.first.linear.weight.copy_(W1.T)
        self.first.linear.bias.copy_(b1)
        self.output.weight.copy_(W2.T)
        self.output.bias.copy_(b2)

    def hidden_state(self, idx: Tensor) -> Tensor:
        h = self.first(idx)
        return self.bn(h) if self.batchnorm else torch.tanh(h)  # the BatchNorm layer applies the tanh

    # The op has two CPU kernels (csrc/cpu/mlp_step.cpp, csrc/cpu/mlp_step_product_tables.cpp). Its gather kernel
    # with its own small matrix products pays up to ONE_CALL_MAX_WORK multiply-adds per forward, batch * hidden *
    # (context * embedding + vocab); above, the layers (BLAS on every core, the product-table first layer) catch up.
    # Measured per SGD step on 2 cores, one call against the layers, in one slow hour (median of 200, three rounds):
    # B=128 embedding 64 hidden 512 (14.4M) 1.2-1.3 ms against 1.9-2.5; embedding 64, B=128 hidden 1024 (28.7M) 2.8
    # against 3.5-4.2, B=64 hidden 2048 (28.7M) 2.7-3.4 against 4.8-6.1, B=224 hidden 1024 (50M) 4.7-5.5 against
    # 3.8-5.7; B=224 embedding 32 hidden 2048 (56M) 6.8-6.9 against 6.7-7.1. Its product-table kernel, which the op
    # runs from PRODUCT_TABLE_MIN_BATCH rows and 8 rows per token of the vocabulary (the same rule as in the C++),
    # runs on every core and beats the layers at any width (measured per SGD step: B=256 hidden 200 0.33 ms against
    # 0.70, B=256 embedding 64 hidden 1024 1.7 against 2.1, B=4096 15.8 against 23.2).
    ONE_CALL_MAX_WORK = 32_000_000
    PRODUCT_TABLE_MIN_BATCH = 256

    def _one_call_pays(self, batch: int) -> bool:
        return batch * self._work_per_row <= self.ONE_CALL_MAX_WORK or (
            batch >= self.PRODUCT_TABLE_MIN_BATCH and 8 * self.vocab_size <= batch)

    def _one_call_args(self, idx: Tensor) -> tuple[list[Tensor], dict] | None:
        """The one-call kernel's tensors (table, W1, b1, W2, b2[, bn weight, bn bias, running mean and var,
        num_batches_tracked]) and BatchNorm arguments, where it pays: the fused twin training on the cpp backend
        (see above), its BatchNorm training too. The op counts the batch in the BatchNorm, as bn(h) would."""
        if not (self.fused and self.training and self._one_call_pays(idx.shape[0])
                and backends.resolve(idx.device, self.backend, mutates=True) == "cpp"
                and not torch.is_autocast_enabled(idx.device.type)):  # the layers follow autocast's policy
            return None
        # Read through the module dicts: nn.Module's attribute lookup costs about 0.5 us per submodule or
        # parameter reached (measured: 18 us per call through attributes and detach(), 6 us so), and this runs
        # once per training step of about 0.04 ms.
        modules = self._modules
        first = modules["first"]._modules
        if any(map(has_hooks, (self, *first.values(), *modules.values()))):
            return None  # hooks expect their layers to be called: the layers run
        if EmbeddingLinear.unsupported_options(first["embedding"]):
            return None  # max_norm, ... set on the embedding: the layers run its own lookup
        embedding, linear = first["embedding"]._parameters, first["linear"]._parameters
        output = modules["output"]._parameters
        layers = [(embedding, "weight"), (linear, "weight"), (linear, "bias"), (output, "weight"), (output, "bias")]
        if self.batchnorm:
            bn = modules["bn"]  # the op counts the batch in num_batches_tracked itself
            if not bn.training:  # a BatchNorm put in eval mode on its own normalises with its running stats
                return None
            layers += [(bn._parameters, "weight"), (bn._parameters, "bias")]
        if not all(name in parameters for parameters, name in layers):
            return None  # a parametrized or pruned weight is computed by its layer: the layers run
        params = [parameters[name] for parameters, name in layers]
        # The kernel's dtypes (fp16/bf16 take the layers), and every parameter trained (with a frozen one the
        # layers' autograd refuses the step, as the reference's does).
        if params[0].dtype not in (torch.float32, torch.float64) or not all(p.requires_grad for p in params):
            return None
        if not self.batchnorm:
            return params, dict(backend="cpp")
        params += [*bn._running_stats(), bn._batch_counter()]
        return params, dict(momentum=bn._momentum(), eps=bn.eps, unbiased=bn.unbiased,
                            backend="cpp")

    def loss_and_grads(self, idx: Tensor, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The fused twin's training step on the cpp backend is one kernel call for the whole network where that
        pays (see ONE_CALL_MAX_WORK); every other case (the reference, eval mode, the other backends, wide
        layers at small batches) runs the layers."""
        one_call = self._one_call_args(idx)
        if one_call is None:
            return super().loss_and_grads(idx, targets)
        result = mlp_loss_and_grads(idx, targets, *one_call[0], **one_call[1])
        # in the order of self.parameters(): first (embedding, linear), bn, output
        bn_grads = [result.bn_weight, result.bn_bias] if self.batchnorm else []
        return result.loss, [result.table, result.w1, result.b1, *bn_grads, result.w2, result.b2]

    def sgd_step(self, idx: Tensor, targets: Tensor, lr: float) -> Tensor:
        """As ``MakemoreModel.sgd_step``; where ``loss_and_grads`` is one kernel call, so is the whole step,
        update included (``fastlm.ops.mlp_sgd_step``)."""
        one_call = self._one_call_args(idx)
        # The op updates in place, so contiguous tensors only ((in, out) weights loaded transposed are not).
        if one_call is None or not all(t is None or t.is_contiguous() for t in one_call[0]):
            return super().sgd_step(idx, targets, lr)
        return mlp_sgd_step(idx, targets, *one_call[0], lr=lr, **one_call[1])


class ResidualMLP(MakemoreModel):
    """The three-layer residual MLP of makemore-batchnorm-residual:
    emb = C[X].view(B, -1); out = relu(BN(emb @ W1 + b1)); logits = tanh(out @ W2 + b2 + emb) @ W3 + b3.

    Parameters: ``first`` (C, W1, b1), ``bn`` (gamma, beta), ``middle`` (W2, b2), ``output`` (W3, b3).
    W1 and W2 are drawn by ``kaiming_uniform_`` in the notes' (in, out) layout, where torch takes the fan-in
    from dim 1 (so W1's bound uses the hidden size, as in the notes); C and W3 from randn, biases zero,
    gamma one, beta zero. The notes normalise with (std + 1e-5), std Bessel-corrected; here it is
    (var + 1e-5)**-0.5 as in the manual-backprop notes and fastlm's BatchNorm, and the running stats (torch's
    momentum 0.1) stand in for the notes' statistics of the training set (``calibrate_batchnorm``).
    Trained with SGD at lr 0.01, batch 32, 10k steps.
    """

    recipe = Recipe("sgd", lr=0.01, steps=10_000, batch_size=32)

    def __init__(self, *, fused: bool = False, context: int = 3, vocab_size: int = 27, embedding: int = 10,
                 hidden: int = 100, momentum: float = 0.1, backend: str | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(fused, backend, vocab_size, context)
        width = context * embedding
        with layers_rng():
            self.first = self.embedding_linear(vocab_size, embedding, context, hidden)
            self.bn = self.batch_norm(hidden, momentum=momentum, unbiased=True, activation="relu")
            self.middle = nn.Linear(hidden, width)
            self.output = nn.Linear(width, vocab_size)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        width, hidden = self.middle.out_features, self.middle.in_features
        self.first.embedding.weight.copy_(torch.randn(self.first.embedding.weight.shape, generator=generator))
        self.first.linear.weight.copy_(nn.init.kaiming_uniform_(torch.empty(width, hidden), generator=generator).T)
        self.middle.weight.copy_(nn.init.kaiming_uniform_(torch.empty(hidden, width), generator=generator).T)
        self.output.weight.copy_(torch.randn(width, self.vocab_size, generator=generator).T)
        for bias in (self.first.linear.bias, self.middle.bias, self.output.bias):
            bias.zero_()
        self.bn.reset_parameters()

    def hidden_state(self, idx: Tensor) -> Tensor:
        emb = self.first.embedding(idx).reshape(idx.shape[0], -1)  # (reshape: under vmap the rows may be strided)
        return torch.tanh(self.middle(self.bn(self.first(idx))) + emb)  # the BatchNorm layer applies the relu


class ResidualBlock(MakemoreModel):
    """The ``ResidualBlock`` module of makemore-batchnorm-residual: per position, emb -> fc1 -> BatchNorm
    -> relu -> fc2 -> BatchNorm, plus emb; fc3 of the last position gives the logits.

    The BatchNorms see (batch, channels, time) input, statistics over batch and time (torch's BatchNorm,
    momentum 0.1). Parameters: ``first`` (emb and fc1, the fused embedding + linear with context 1 applied
    to every position), ``bn1``, ``fc2``, ``bn2``, ``output`` (fc3); initialised as torch initialises the
    notes' layers, fc1 by ``kaiming_uniform_(nonlinearity="relu")``. The notes compute fc3 at every position
    and train on ``logits[:, -1, :]``; only that position is computed here. Trained with Adam at lr 0.01,
    batch 32, 10k steps.
    """

    recipe = Recipe("adam", lr=0.01, steps=10_000, batch_size=32)

    def __init__(self, *, fused: bool = False, context: int = 3, vocab_size: int = 27, embedding: int = 10,
                 hidden: int = 100, momentum: float = 0.1, backend: str | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(fused, backend, vocab_size, context)
        with layers_rng():
            self.first = self.embedding_linear(vocab_size, embedding, 1, hidden, bias=False)
            self.bn1 = self.batch_norm(hidden, momentum=momentum, activation="relu")
            self.fc2 = nn.Linear(hidden, embedding, bias=False)
            self.bn2 = self.batch_norm(embedding, momentum=momentum)
            self.output = nn.Linear(embedding, vocab_size)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.first.embedding.weight, generator=generator)
        nn.init.kaiming_uniform_(self.first.linear.weight, nonlinearity="relu", generator=generator)
        for linear in (self.fc2, self.output):  # nn.Linear's own initialisation
            nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(self.output.in_features)
        nn.init.uniform_(self.output.bias, -bound, bound, generator=generator)
        self.bn1.reset_parameters()
        self.bn2.reset_parameters()

    def hidden_state(self, idx: Tensor) -> Tensor:
        B, T = idx.shape
        emb = self.first.embedding(idx)                                  # (B, T, embedding)
        h = self.first(idx.reshape(B * T, 1)).view(B, T, -1)             # fc1(emb)
        h = self.bn1(h.transpose(1, 2)).transpose(1, 2)                  # BatchNorm over (B, hidden, T), relu
        h = self.bn2(self.fc2(h).transpose(1, 2)).transpose(1, 2) + emb  # the shortcut
        return h[:, -1]
