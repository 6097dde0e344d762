"""FlopCounterMode over fastlm's fused ops counts what it counts over the torch code they replace (it counted
nothing for them: the mode sees the kernel ops, not the products inside)."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_BACKENDS, device_to_test, skip_unless_runs
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fastlm
from test_models import make_twins

VOCAB, DIM, CONTEXT, HIDDEN, ROWS = 27, 10, 3, 200, 32


def flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def idx_and_targets():
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, VOCAB, (ROWS, CONTEXT), generator=generator),
            torch.randint(0, VOCAB, (ROWS,), generator=generator))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_converted_model_counts_as_torch(backend):
    device = device_to_test(backend)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, DIM), nn.Flatten(), nn.Linear(CONTEXT * DIM, HIDDEN),
                          nn.BatchNorm1d(HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, VOCAB)).to(device)
    fused = fastlm.convert(copy.deepcopy(model), backend=backend)  # (convert swaps the layers in place)
    idx, targets = (t.to(device) for t in idx_and_targets())
    expected = flops(lambda: F.cross_entropy(model(idx), targets).backward())
    assert expected > 0
    assert flops(lambda: F.cross_entropy(fused(idx), targets).backward()) == expected


@pytest.mark.parametrize("needs", ["both", "input", "weight"])
def test_linear_cross_entropy_counts_as_torch(needs):
    skip_unless_runs("cpp")
    h = torch.randn(ROWS, HIDDEN, requires_grad=needs != "weight")
    head = torch.randn(VOCAB, HIDDEN, requires_grad=needs != "input")
    _, targets = idx_and_targets()
    expected = flops(lambda: F.cross_entropy(h @ head.T, targets).backward())
    assert flops(lambda: fastlm.ops.linear_cross_entropy(h, head, targets).backward()) == expected
    forward_only = 2 * ROWS * HIDDEN * VOCAB
    assert flops(lambda: fastlm.ops.linear_cross_entropy(h.detach(), head.detach(), targets)) == forward_only


@pytest.mark.parametrize("batch", [32, 256], ids=["gather", "product-tables"])
@pytest.mark.parametrize("name", ["mlp", "mlp-bn"])
def test_one_call_training_step_counts_as_the_reference(name, batch):
    skip_unless_runs("cpp")
    reference, fused = make_twins(name, backend="cpp")
    generator = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, VOCAB, (batch, 3), generator=generator), torch.randint(0, VOCAB, (batch,))
    expected = flops(lambda: reference.loss_and_grads(idx, targets))
    assert expected > 0
    assert flops(lambda: fused.loss_and_grads(idx, targets)) == expected
    assert flops(lambda: fused.sgd_step(idx, targets, 0.0)) == expected


def test_linear_cross_entropy_per_row_forward_counts_its_one_product():
    """reduction="none" defers the gradients to the backward (its rows' upstream gradient is not known yet): the
    forward runs the logits' product alone, 2 * N * H * V, where the count took the gradients' products too."""
    skip_unless_runs("cpp")
    h, head = torch.randn(ROWS, HIDDEN, requires_grad=True), torch.randn(VOCAB, HIDDEN, requires_grad=True)
    _, targets = idx_and_targets()
    assert flops(lambda: fastlm.ops.linear_cross_entropy(h, head, targets, reduction="none")) == (
        2 * ROWS * HIDDEN * VOCAB)


def test_inference_mode_counts_as_torch():
    """Under inference mode the mode sees the ops themselves (no autograd kernel in between), which counted 0."""
    skip_unless_runs("cpp")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, DIM), nn.Flatten(), nn.Linear(CONTEXT * DIM, HIDDEN))
    fused = fastlm.convert(copy.deepcopy(model))
    idx, targets = idx_and_targets()
    head = torch.randn(VOCAB, HIDDEN)
    with torch.inference_mode():
        expected = flops(lambda: F.cross_entropy(model(idx) @ head.T, targets))
        assert flops(lambda: fastlm.ops.linear_cross_entropy(fused(idx), head, targets)) == expected > 0


@pytest.mark.parametrize("before", ["", "importlib.util.find_spec('torch.utils.flop_counter'); ",
                                    "import torch.utils.flop_counter as f; importlib.reload(f); "])
def test_formulas_registered_however_flop_counter_is_imported(before):
    """In a fresh process: the formulas are registered when torch.utils.flop_counter is first imported, also
    after a lookup of its spec (which removed the hook before the real import, leaving the count at 0) and
    across a reload."""
    skip_unless_runs("cpp")
    code = ("import importlib, importlib.util, torch, fastlm; " + before +
            "from torch.utils.flop_counter import FlopCounterMode; "
            "h = torch.randn(8, 16); w = torch.randn(11, 16); t = torch.randint(0, 11, (8,))\n"
            "with FlopCounterMode(display=False) as counter: fastlm.ops.linear_cross_entropy(h, w, t)\n"
            "print(counter.get_total_flops())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == f"{2 * 8 * 16 * 11}\n"


def test_reloading_the_formulas_module_keeps_the_registered_formulas_and_one_import_hook():
    """torch refuses a second registration of an op's formula: a reload of fastlm's module (flop_counter imported
    already) leaves those registered as they are, and its import hook the one there was (it added a second)."""
    import importlib

    import fastlm.ops.flop_counts as flop_counts

    importlib.reload(flop_counts)
    assert [type(finder).__name__ for finder in sys.meta_path].count("_RegisterWhenImported") == 1
    skip_unless_runs("cpp")
    h, w, t = torch.randn(8, 16), torch.randn(11, 16), torch.randint(0, 11, (8,))
    assert flops(lambda: fastlm.ops.linear_cross_entropy(h, w, t)) == 2 * 8 * 16 * 11


def test_formulas_that_fail_to_register_warn_and_torch_still_imports():
    code = ("import warnings, fastlm, fastlm.ops.flop_counts as flop_counts\n"
            "def broken(): raise RuntimeError('broken')\n"
            "flop_counts.register_formulas = broken\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    from torch.utils.flop_counter import FlopCounterMode\n"
            "print([str(w.message) for w in caught if 'fastlm' in str(w.message)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "['fastlm: FLOP formulas not registered (broken)']\n"
