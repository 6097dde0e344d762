"""A training step captured in a CUDA graph: ``fastlm train --cuda-graph`` and the mlp_step benchmark on GPU.

At batch 32 a makemore step is a few dozen small kernels, each launched from Python, so on a GPU the step
costs what its launches cost rather than what its kernels do. Captured once into a CUDA graph, the whole
step (forward, backward and the SGD update p -= lr * grad) replays with one launch. The graph reads its
batch and learning rate from fixed device buffers that each step refills before the replay; the loss it
returns is a fixed buffer too, overwritten by the next replay.

Capture follows PyTorch's recipe: a few warm-up steps on a side stream first (they build autograd's and the
kernels' one-off state: Triton compilation, cuBLAS workspaces), then the recorded step. The warm-up steps
run at learning rate 0, so they leave the parameters alone, but they do move the BatchNorm statistics and
batch count; the model's state is put back afterwards, so the first replay starts from exactly where an
uncaptured run would. The fastlm ops skip their
host-side id and target checks during capture (``fastlm.backends.capturing``); ``fastlm train`` has
checked its data set's ids when it loaded it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CapturedStep:
    """``model.loss_and_grads(x, y)`` then ``p -= lr * grad`` for every parameter of the model, for batches
    shaped like ``x`` and ``y``, recorded once and replayed by each call."""

    WARMUP_STEPS = 3

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor):
        if x.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs CUDA tensors, got a batch on {x.device}")
        self.model, self.params = model, list(model.parameters())
        self.x, self.y = x.clone(), y.clone()
        # lr in the parameters' dtype, as the eager step's alpha is applied
        self.lr = torch.zeros((), dtype=self.params[0].dtype, device=x.device)
        before = {name: value.detach().clone() for name, value in model.state_dict().items()}
        # Capture, its streams and the ops' capturing() test all work on the current device: make it x's.
        with torch.cuda.device(x.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP_STEPS):
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = self._step()
        with torch.no_grad():
            for name, value in model.state_dict().items():
                value.copy_(before[name])

    def _step(self) -> Tensor:
        loss, grads = self.model.loss_and_grads(self.x, self.y)
        with torch.no_grad():
            torch._foreach_add_(self.params, torch._foreach_mul(grads, -self.lr))
        return loss

    def __call__(self, x: Tensor, y: Tensor, lr: float) -> Tensor:
        """One training step on this batch; returns the loss (a buffer the next call overwrites)."""
        self.x.copy_(x)
        self.y.copy_(y)
        self.lr.fill_(lr)
        with torch.cuda.device(self.x.device):
            self.graph.replay()
        return self.loss
