"""``calibrate_batchnorm``: set BatchNorm running statistics from a whole data set after training.

Makemore part 3 (and the manual-backprop notes, and the residual notes' MLP exercise) replace the statistics
gathered batch by batch with the mean and Bessel-corrected variance of each BatchNorm layer's input over the
entire training set; fastlm train does so for every model (the residual notes' ResidualBlock keeps its running
statistics: calibrated, its val loss measured 2.4914 against 2.4915).
A layer's input depends on the BatchNorm layers before it, so the layers are calibrated one at a time in
the order the forward calls them, each pass running the model in eval mode with the layers before it
already calibrated: every layer ends up with the statistics of the inputs it sees at inference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastlm.ops.sync_batch_norm import merge_pair


class Moments:
    """Per-channel count, mean and sum of squared deviations of (N, C) or (N, C, L) chunks, merged in
    float64 (Chan et al.'s pairwise update), so chunking does not change the result beyond rounding."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x: Tensor) -> None:
        dims = (0, 2) if x.dim() == 3 else (0,)
        x = x.detach().double()
        n = x.numel() // x.shape[1]
        mean = x.mean(dims)
        shape = (1, -1, 1) if x.dim() == 3 else (1, -1)
        m2 = ((x - mean.view(shape)) ** 2).sum(dims)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
        else:
            self.count, self.mean, self.m2 = merge_pair(self.count, self.mean, self.m2, n, mean, m2)

    def variance(self) -> Tensor:
        return self.m2 / (self.count - 1)


def _call_order(model: nn.Module, layers: list[_BatchNorm], sample: Tensor) -> list[_BatchNorm]:
    order = []
    handles = [layer.register_forward_pre_hook(lambda module, args: order.append(module)) for layer in layers]
    try:
        model(sample)
    finally:
        for handle in handles:
            handle.remove()
    return order


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, X: Tensor, batch_size: int = 65536) -> nn.Module:
    """Sets ``running_mean``/``running_var`` of every BatchNorm layer of ``model`` that tracks them to the
    mean and Bessel-corrected variance of its input over all of ``X`` (model inputs, run ``batch_size``
    rows at a time). ``num_batches_tracked`` and the train/eval mode are left as they were. ValueError where a
    layer would see fewer than two values per channel (no variance to set)."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if layers and len(X) == 0:
        raise ValueError("calibrate_batchnorm: X is empty, so there are no statistics to set")
    was_training = model.training
    model.eval()
    try:
        for layer in _call_order(model, layers, X[:2]):
            moments = Moments()
            handle = layer.register_forward_pre_hook(lambda module, args: moments.add(args[0]))
            try:
                for chunk in X.split(batch_size):
                    model(chunk)
            finally:
                handle.remove()
            if moments.count < 2:
                raise ValueError(f"calibrate_batchnorm: {moments.count} value per channel reaches a BatchNorm layer; "
                                 "its variance needs at least 2 (pass more rows)")
            layer.running_mean.copy_(moments.mean)
            layer.running_var.copy_(moments.variance())
    finally:
        model.train(was_training)
    return model
