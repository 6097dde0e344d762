"""The C++ CPU ops (torch.ops.fastlm.*), called directly with malformed arguments, raise and never crash or hang.

fastlm's Python layers check their input before any kernel runs, but the ops are public (torch.compile's graphs
and users call them), so each op checks what it relies on itself. Here each op's valid call is mutated at random
(shapes off by one or empty, other dtypes, strided, stride-0 and offset views, NaN/inf, ids out of range, other
integer and float options, the same tensor passed twice) and run: it must return or raise a Python error. A
crash ends the test run and a hang its test (pytest-timeout). This found a read past the end (batch_norm_stats
on rows of length 0) and an endless loop (linear_cross_entropy_chunks with chunk_size 0), both fixed.
"""

import random

import pytest
import torch
from conftest import skip_unless_runs

CALLS_PER_SEED = 1500
C, N, L, B, T, D, V, OUT, H = 5, 6, 3, 4, 3, 2, 7, 9, 4


def tensor(*shape, dtype=torch.float32):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape).bool()
    return torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.randint(0, 3, shape, dtype=dtype)


def valid_calls(rng: random.Random) -> dict:
    """For each op, by name, a function giving the arguments of a valid call of fastlm::{name} (2D or 3D BatchNorm
    input, any activation)."""
    x = tensor(N, C, L) if rng.random() < 0.3 else tensor(N, C)
    per_channel = [tensor(C), tensor(C).abs() + 0.1]
    target, idx = torch.randint(0, C, (N,)), torch.randint(0, V, (B, T))
    activation = rng.randint(0, 2)
    calls = {
        "cross_entropy_forward": lambda: [tensor(N, C), target, tensor(C).abs(), -100, 0.1, 0.01, 0.0],
        "cross_entropy_backward": lambda: [tensor(N, C), target, None, tensor(N), torch.randn(()), -100, 0.0, 0.0,
                                           5.0],
        "cross_entropy_backward_": lambda: [tensor(N, C), target, None, tensor(N), tensor(N), -100, 0.0, 0.0, 0.0],
        "cross_entropy_forward_backward": lambda: [tensor(N, C), target, None, torch.randn(()), -100, 0.0, 0.0,
                                                   5.0],
        "cross_entropy": lambda: [tensor(N, C), target, None, -100, "mean", 0.0, 0.0, 5.0, False],
        "cross_entropy_predictions": lambda: [tensor(N, C)],
        "batch_norm_stats": lambda: [x],
        "batch_norm_forward": lambda: [x, *per_channel, tensor(C), tensor(C), activation],
        "batch_norm_forward_train": lambda: [x, tensor(C), tensor(C), *per_channel, 0.1, 1e-5, False, activation],
        "batch_norm_backward_reduce": lambda: [torch.randn_like(x), x, None, *per_channel, 0],
        "batch_norm_backward_input": lambda: [torch.randn_like(x), x, None, *per_channel, tensor(C), tensor(C),
                                              tensor(C), 0.1, 0.1, 0],
        "batch_norm_backward": lambda: [torch.randn_like(x), x, torch.randn_like(x), *per_channel, tensor(C), True,
                                        False, activation],
        "batch_norm": lambda: [x, tensor(C), tensor(C), *per_channel, True, 0.1, 1e-5, False, activation],
        "embedding_linear_forward": lambda: [idx, tensor(V, D), tensor(OUT, T * D), tensor(OUT), rng.randint(0, 2)],
        "embedding_linear_backward": lambda: [tensor(B, OUT), idx, tensor(V, D), tensor(OUT, T * D), True,
                                              rng.randint(0, 2), -1, True],
        "embedding_linear": lambda: [idx, tensor(V, D), tensor(OUT, T * D), tensor(OUT), rng.randint(0, 2), -1, True],
        "linear_cross_entropy": lambda: [tensor(N, H), tensor(C, H), tensor(C), target, None, -100, "mean", 0.0, 0.0,
                                         0.0, 2, False, rng.random() < 0.5],
        "linear_cross_entropy_chunks": lambda: [tensor(N, H), tensor(C, H), tensor(C), target, None, -100, 0.0, 0.0,
                                                5.0, False, 2, None, [True, True, True], rng.random() < 0.5],
        "checked_token_ids": lambda: [idx, V],
        "mlp_loss_and_grads": lambda: mlp_call(idx, rng, sgd=False),
        "mlp_sgd_step": lambda: mlp_call(idx, rng, sgd=True),
    }
    return calls


def mlp_call(idx, rng, sgd):
    batch_norm = [tensor(H), tensor(H), tensor(H), tensor(H).abs() + 0.1, torch.zeros((), dtype=torch.long)]
    args = [idx, torch.randint(0, V, (B,)), tensor(V, D), tensor(H, T * D), tensor(H), tensor(V, H), tensor(V)]
    args += batch_norm if rng.random() < 0.5 else [None] * 5
    return args + [0.1, 1e-5, False] + ([0.1] if sgd else [])


def mutated_tensor(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    shape = list(t.shape)
    choices = [
        lambda: torch.empty(0),
        lambda: tensor(*shape, 2, dtype=t.dtype),
        lambda: t.to(rng.choice([torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64,
                                 torch.bool, torch.uint8])),
        lambda: torch.cat([t.flatten(), t.flatten()])[t.numel():].view(t.shape),  # at a storage offset
    ]
    if shape:
        i = rng.randrange(len(shape))
        resized = shape[:i] + [max(0, shape[i] + rng.choice([-1, 1, 5, -shape[i]]))] + shape[i + 1:]
        choices += [
            lambda: tensor(*resized, dtype=t.dtype),
            lambda: tensor(*shape[:-1], dtype=t.dtype),
            lambda: torch.zeros(*shape[:-1], shape[-1] * 2, dtype=t.dtype)[..., ::2],  # strided
            lambda: tensor(0, *shape[1:], dtype=t.dtype),
            lambda: t.unsqueeze(-1).expand(*shape, 3)[..., 1],  # strided, not dense
        ]
        if shape[0] > 0:
            choices.append(lambda: t[:1].expand_as(t))  # stride 0
    if len(shape) >= 2:
        choices.append(lambda: t.transpose(0, 1))
    if t.is_floating_point():
        choices.append(lambda: t * float(rng.choice(["nan", "inf", "-inf"])))
    else:
        choices.append(lambda: t + rng.choice([100, -200, 2**31, -1]))  # ids and targets out of range
    return rng.choice(choices)()


def mutated(args: list, rng: random.Random) -> list:
    args = list(args)
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(len(args))
        a = args[i]
        if isinstance(a, torch.Tensor):
            args[i] = mutated_tensor(a, rng)
        elif a is None:
            args[i] = tensor(rng.randint(0, 8))
        elif isinstance(a, bool):
            args[i] = not a
        elif isinstance(a, int):
            args[i] = rng.choice([-1, 0, 1, 2, 3, 7, -100, 100, 2**40, -2**40])
        elif isinstance(a, float):
            args[i] = rng.choice([0.0, -1.0, 1.0, 2.0, float("nan"), float("inf"), 1e30])
        elif isinstance(a, str):
            args[i] = rng.choice(["mean", "sum", "none", "bogus"])
        else:
            args[i] = [rng.random() < 0.5 for _ in a]
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    if len(tensors) >= 2 and rng.random() < 0.1:  # one tensor passed for two arguments
        i, j = rng.sample(tensors, 2)
        args[j] = args[i]
    return args


@pytest.mark.parametrize("seed", range(4))
def test_malformed_calls_raise_and_never_crash(seed):
    skip_unless_runs("cpp")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    outcomes = {"returned": 0, "raised": 0}
    for _ in range(CALLS_PER_SEED):
        calls = valid_calls(rng)
        name = rng.choice(list(calls))
        args = mutated(calls[name](), rng)
        try:
            getattr(torch.ops.fastlm, name)(*args)
            outcomes["returned"] += 1
        except (RuntimeError, IndexError, ValueError, TypeError, NotImplementedError):
            outcomes["raised"] += 1
    # Both kinds happen: a mutation may leave a call valid (another float option) or make it invalid.
    assert outcomes["returned"] > CALLS_PER_SEED // 10 and outcomes["raised"] > CALLS_PER_SEED // 10, outcomes


IDX = torch.randint(0, V, (B, T))


def raw(name, *args):
    return lambda: getattr(torch.ops.fastlm, name)(*args)


@pytest.mark.parametrize("call, message", [
    (raw("batch_norm", tensor(N, C), None, None, tensor(C), None, False, 0.1, 1e-5, False, 0),
     "running_mean and running_var are needed"),
    (raw("batch_norm", tensor(N, C), None, None, None, tensor(C), False, 0.1, 1e-5, False, 0),
     "running_mean and running_var are needed"),
    (raw("batch_norm", tensor(N, C), None, None, tensor(C), tensor(C), False, 0.1, 1e-5, False, 3),
     "activation must be 0"),
    (raw("batch_norm_forward", tensor(N, C), tensor(C), tensor(C), None, None, 3), "activation must be 0"),
    (raw("embedding_linear_forward", IDX, tensor(V, D), tensor(OUT, T * D), tensor(OUT - 1), 0),
     "bias must have out = 9 entries"),  # read past its end otherwise
    (raw("embedding_linear", IDX, tensor(V, D), tensor(OUT, T * D), tensor(OUT + 1), 0, -1, True),
     "bias must have out = 9 entries"),
    (raw("embedding_linear_backward", tensor(B, OUT), IDX, tensor(V, D), tensor(OUT, T * D), True, 0, V, True),
     r"padding_idx must be -1 or in \[0, 7\)"),
    (raw("linear_cross_entropy", tensor(N, H), tensor(C, H), tensor(C), torch.zeros(2, 3, dtype=torch.long), None,
         -100, "mean", 0.0, 0.0, 0.0, 2, False, False), "expected a 1D target"),
    (raw("embedding_linear_forward", IDX, tensor(V, D), tensor(OUT, T * D), None, 2), "strategy must be 0"),
    (raw("embedding_linear_forward", IDX, tensor(V, D), tensor(OUT, T * D), None, -1), "strategy must be 0"),
    *[(raw("mlp_loss_and_grads", IDX, torch.randint(0, V, (B,)), tensor(V, D), tensor(H, T * D), tensor(H),
           tensor(V, H), tensor(V), *batch_norm, torch.zeros((), dtype=torch.int32), 0.1, 1e-5, False),
       "num_batches_tracked must be one int64")  # refused before the step moves the running statistics
      for batch_norm in ([tensor(H), tensor(H), tensor(H), tensor(H).abs() + 0.1], [None] * 4)],
], ids=["eval without running_var", "eval without running_mean", "activation 3", "forward activation 3",
        "short bias", "long bias", "padding_idx V", "2D target", "strategy 2", "strategy -1",
        "int32 batch counter with BatchNorm", "int32 batch counter without BatchNorm"])
def test_each_op_refuses_what_it_relies_on(call, message):
    """Arguments a kernel would misread (or read past) are refused by the op itself with its own message (strided
    running statistics: test_batch_norm_ops.py, and the in-place backward's layouts: test_cross_entropy.py, on every
    kernel backend)."""
    skip_unless_runs("cpp")
    with pytest.raises(RuntimeError, match=message):
        call()
