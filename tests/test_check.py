"""fastlm.check, the `fastlm check` command: it passes on this machine's backends, a backend that is
wrong (off by 1e-2, or accepting out-of-range ids) registered in fastlm.check.BACKENDS makes it fail, and an
op a backend lacks is reported as not checked there; a kernel that raises fails its rows, printed as each
check ends."""

import math
import re
import subprocess
import sys
from functools import partial

import pytest
import torch

from conftest import skip_unless_runs
from fastlm import check


def test_quick_check_passes_on_every_backend_here(capsys):
    assert check.main(["--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    for op in check.OPS:
        assert re.search(rf"^{op}\s+cpp\s+float32 .* PASS", out, re.MULTILINE)
    for dtype in ("float32", "float64"):
        assert re.search(rf"^determinism\s+cpp\s+{dtype}\s+4 .* PASS", out, re.MULTILINE)
    assert "FAIL" not in out
    # determinism and refusals are the kernels' promises: the reference, plain PyTorch, has no such rows
    assert not re.search(r"^(determinism|refuses bad input)\s+torch", out, re.MULTILINE)


@pytest.fixture
def cpp():
    skip_unless_runs("cpp")
    return check.fastlm_backend("cpp")


def test_relative_error_counts_a_nan_where_one_is_expected_as_exact():
    nan, one = torch.tensor([float("nan")]), torch.tensor([1.0])
    assert check.relative_error(nan, nan, 1.0) == 0
    assert check.relative_error(nan, one, 1.0) == math.inf and check.relative_error(one, nan, 1.0) == math.inf


def test_relative_error_counts_an_infinity_where_one_is_expected_as_exact_and_scales_by_the_finite_values():
    inf = float("inf")
    assert check.relative_error(torch.tensor([inf, -inf]), torch.tensor([inf, -inf]), 0.0) == 0
    assert check.relative_error(torch.tensor([inf, 1.0]), torch.tensor([-inf, 1.0]), 0.0) == math.inf
    assert check.relative_error(torch.tensor([inf, 1.0]), torch.tensor([inf, 2.0]), 0.0) == 0.25  # 1 / (2 + 2)


def test_a_backend_off_by_1e_2_fails(monkeypatch, capsys, cpp):
    def off(*args, **kwargs):
        return cpp.ops["batch_norm"](*args, **kwargs) + 1e-2

    monkeypatch.setitem(check.BACKENDS, "broken", check.Backend({**cpp.ops, "batch_norm": off}, cpp.runs_on))
    assert check.main(["--device", "cpu", "--quick", "--backend", "broken", "--op", "batch_norm", "--dtype",
                       "float32"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^batch_norm\s+broken\s+float32 .* FAIL  first failure: .*: output", out, re.MULTILINE)
    assert re.search(r"^determinism\s+broken .* PASS", out, re.MULTILINE)


def test_an_output_in_the_wrong_dtype_fails(monkeypatch, capsys, cpp):
    """A loss returned in float64 for float32 logits, its values right: a dtype regression the value comparison
    alone let through."""
    def widened(*args, **kwargs):
        return cpp.ops["cross_entropy"](*args, **kwargs).double()

    monkeypatch.setitem(check.BACKENDS, "wide", check.Backend({**cpp.ops, "cross_entropy": widened}, cpp.runs_on))
    assert check.main(["--device", "cpu", "--quick", "--backend", "wide", "--op", "cross_entropy", "--dtype",
                       "float32"]) == 1
    assert re.search(r"^cross_entropy\s+wide\s+float32 .* FAIL  first failure: .*: output is float64, not float32",
                     capsys.readouterr().out, re.MULTILINE)


def test_a_nan_in_the_determinism_check_shows_and_fails(monkeypatch, capsys, cpp):
    calls = []

    def nan_once(*args, **kwargs):
        out = cpp.ops["batch_norm"](*args, **kwargs)
        calls.append(1)
        return out * float("nan") if len(calls) == 1 else out

    monkeypatch.setitem(check.BACKENDS, "nan", check.Backend({**cpp.ops, "batch_norm": nan_once}, cpp.runs_on))
    result = check.check_determinism("nan", "cpu")
    assert not result.passed and result.error == float("inf")  # it showed 0.00e+00 next to FAIL


def test_nothing_to_check_fails(monkeypatch, capsys, cpp):
    """A backend asked for that does not run on the device (--backend cuda --device cpu on a GPU machine): no
    check ran, which printed "0 of 0 checks passed" and passed."""
    monkeypatch.setitem(check.BACKENDS, "elsewhere", check.Backend(cpp.ops, lambda device: False))
    assert check.main(["--device", "cpu", "--quick", "--backend", "elsewhere"]) == 1
    assert "FAILED: nothing to check: none of the backends asked for runs on cpu" in capsys.readouterr().out


def test_a_backend_without_the_op_asked_for_is_nothing_to_check(monkeypatch, capsys, cpp):
    """--op of an op the backend lacks: no row, a failure that says why (not that the backend cannot run here)."""
    ops = {op: fn for op, fn in cpp.ops.items() if op != "mlp_sgd_step"}
    monkeypatch.setitem(check.BACKENDS, "partial", check.Backend(ops, cpp.runs_on))
    assert check.main(["--device", "cpu", "--quick", "--backend", "partial", "--op", "mlp_sgd_step"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: nothing to check: the backends asked for have none of the ops asked for" in out, out


def test_a_backend_ignoring_an_option_fails(monkeypatch, capsys, cpp):
    """Class weights, the z-loss and padding_idx dropped: each is in a case, so each fails (all passed before)."""
    def unweighted(input, target, weight=None, **options):
        return cpp.ops["cross_entropy"](input, target, **options)

    def no_z_loss(*args, lse_square_scale=0.0, **options):
        return cpp.ops["linear_cross_entropy"](*args, **options)

    def unpadded(*args, padding_idx=None, **options):
        return cpp.ops["embedding_linear"](*args, **options)

    monkeypatch.setitem(check.BACKENDS, "lax", check.Backend({**cpp.ops, "cross_entropy": unweighted,
                                                              "linear_cross_entropy": no_z_loss,
                                                              "embedding_linear": unpadded}, cpp.runs_on))
    assert check.main(["--device", "cpu", "--quick", "--backend", "lax", "--op", "cross_entropy",
                       "linear_cross_entropy", "embedding_linear", "--dtype", "float64"]) == 1
    out = capsys.readouterr().out
    for op, case in [("cross_entropy", "weight"), ("linear_cross_entropy", "lse_square_scale"),
                     ("embedding_linear", "padding_idx")]:
        assert re.search(rf"^{op}\s+lax\s+float64 .* FAIL  first failure: .*{case}", out, re.MULTILINE), out


def test_a_failing_reference_fails_its_row(monkeypatch, capsys, cpp):
    """After a kernel's illegal memory access every later CUDA call fails, the reference's too: a FAIL row, not a
    traceback that ends the command (the reference ran outside the case's try)."""
    def lost(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(check.REFERENCE, "batch_norm", lost)
    assert check.main(["--device", "cpu", "--quick", "--backend", "cpp", "--op", "batch_norm", "--dtype",
                       "float32"]) == 1
    assert re.search(r"^batch_norm\s+cpp\s+float32 .* FAIL  first failure: .*RuntimeError: CUDA error",
                     capsys.readouterr().out, re.MULTILINE)


@pytest.mark.parametrize("overwrite", [lambda t: t.fill_(float("nan")), lambda t: t.mul_(2)], ids=["nan", "doubled"])
def test_a_backend_that_writes_over_its_input_fails(monkeypatch, capsys, cpp, overwrite):
    """Logits overwritten after the loss is computed: the values compared were right, the caller's were not."""
    def overwriting(input, *args, **kwargs):
        loss = cpp.ops["cross_entropy"](input, *args, **kwargs)
        overwrite(input.data)
        return loss

    monkeypatch.setitem(check.BACKENDS, "overwriting",
                        check.Backend({**cpp.ops, "cross_entropy": overwriting}, cpp.runs_on))
    assert check.main(["--device", "cpu", "--quick", "--backend", "overwriting", "--op", "cross_entropy", "--dtype",
                       "float32"]) == 1
    assert re.search(r"^cross_entropy\s+overwriting\s+float32 .* FAIL  first failure: .*InputOverwritten: input was "
                     r"overwritten", capsys.readouterr().out, re.MULTILINE)


def test_a_backend_nondeterministic_in_one_dtype_fails_that_dtype_s_row(monkeypatch, capsys, cpp):
    """Run to run noise of 1e-12 in float64 alone: within the accuracy tolerance, not bit for bit."""
    def jittery(input, *args, **kwargs):
        output = cpp.ops["batch_norm"](input, *args, **kwargs)
        return output + torch.rand(()) * 1e-12 if input.dtype == torch.float64 else output
    monkeypatch.setitem(check.BACKENDS, "jittery", check.Backend({**cpp.ops, "batch_norm": jittery}, cpp.runs_on))
    assert check.main(["--device", "cpu", "--quick", "--backend", "jittery", "--op", "batch_norm"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^batch_norm\s+jittery\s+float64 .* PASS", out, re.MULTILINE)
    assert re.search(r"^determinism\s+jittery\s+float32\s+1 .* PASS", out, re.MULTILINE)
    assert re.search(r"^determinism\s+jittery\s+float64\s+1 .* FAIL  first failure: batch_norm", out, re.MULTILINE)


def test_a_missing_gradient_fails_the_determinism_row(monkeypatch, capsys, cpp):
    """A BatchNorm that returns no gradient for its bias: a FAIL row (it was an AttributeError traceback that
    ended the command)."""
    class NoBiasGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, bias):
            return bias.detach().clone()

        @staticmethod
        def backward(ctx, grad):
            return None

    def batch_norm(input, running_mean, running_var, weight, bias, **kwargs):
        return cpp.ops["batch_norm"](input, running_mean, running_var, weight, NoBiasGrad.apply(bias), **kwargs)

    monkeypatch.setitem(check.BACKENDS, "gradless", check.Backend({**cpp.ops, "batch_norm": batch_norm}, cpp.runs_on))
    assert check.main(["--device", "cpu", "--quick", "--backend", "gradless", "--op", "batch_norm", "--dtype",
                       "float32"]) == 1
    assert re.search(r"^determinism\s+gradless .* FAIL  first failure: .*: grad bias missing", capsys.readouterr().out,
                     re.MULTILINE)


def test_a_backend_of_the_other_device_is_named_as_not_checked(monkeypatch, capsys, cpp):
    """On a GPU machine the default device is cuda, where cpp does not run: the command says so (it said nothing
    and passed)."""
    monkeypatch.setitem(check.BACKENDS, "gpu-only", check.Backend(cpp.ops, lambda device: device.type == "cuda"))
    monkeypatch.setitem(check.BACKENDS, "nowhere", check.Backend(cpp.ops, lambda device: False))
    assert check.main(["--device", "cpu", "--quick", "--op", "batch_norm", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "  not checked: gpu-only: runs on cuda, not cpu (fastlm check --device cuda)" in out
    assert "  not checked: nowhere: does not run on cpu" in out


def test_refusals_alone_are_nothing_to_check(capsys, cpp):
    """--dtype float16 of the one-call step on cpp alone: no value is compared (its kernels take fp32 and fp64),
    so the refusal row alone does not pass the command."""
    assert check.main(["--device", "cpu", "--quick", "--backend", "cpp", "--op", "mlp_sgd_step", "--dtype",
                       "float16"]) == 1
    assert "FAILED: nothing to check" in capsys.readouterr().out


def test_a_backend_accepting_bad_ids_fails(monkeypatch, capsys, cpp):
    def lenient(idx, table, *args, **kwargs):
        return cpp.ops["embedding_linear"](idx.clamp(0, table.shape[0] - 1), table, *args, **kwargs)

    monkeypatch.setitem(check.BACKENDS, "lenient",
                        check.Backend({**cpp.ops, "embedding_linear": lenient}, cpp.runs_on))
    assert check.main(["--device", "cpu", "--quick", "--backend", "lenient", "--op", "embedding_linear", "--dtype",
                       "float64"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^embedding_linear\s+lenient\s+float64 .* PASS", out, re.MULTILINE)
    assert re.search(r"^refuses bad input\s+lenient .* FAIL  first failure: embedding_linear index 5 of 5 rows: "
                     r"accepted", out, re.MULTILINE)


def test_mlp_step_checks_pass_on_cpu(capsys, cpp):
    assert check.main(["--op", "mlp_loss_and_grads", "mlp_sgd_step", "--device", "cpu", "--backend", "cpp",
                       "torch"]) == 0
    out = capsys.readouterr().out
    for op in ("mlp_loss_and_grads", "mlp_sgd_step"):
        for backend in ("cpp", "torch"):
            for dtype in ("float32", "float64"):
                assert re.search(rf"^{op}\s+{backend}\s+{dtype}\s+23 .* PASS", out, re.MULTILINE)
    assert re.search(r"^refuses bad input\s+cpp .* PASS", out, re.MULTILINE)


# mlp_loss_and_grads gone wrong: ``op`` is cpp's, the rest the arguments fastlm check passes.
def loss_off(op, *args, **kwargs):
    result = op(*args, **kwargs)
    return result._replace(loss=result.loss * (1 + 1e-4))


def grad_w1_off(op, *args, **kwargs):
    result = op(*args, **kwargs)
    return result._replace(w1=result.w1 + 1e-3 * result.w1.abs().max())


def running_stats_left(op, *args, running_mean=None, running_var=None, **kwargs):
    return op(*args, **kwargs)


def lenient_targets(op, idx, targets, table, w1, b1, w2, *args, **kwargs):
    return op(idx, targets.clamp(0, w2.shape[0] - 1), table, w1, b1, w2, *args, **kwargs)


@pytest.mark.parametrize("wrong, row, failure", [
    (loss_off, "mlp_loss_and_grads", "output"),
    (grad_w1_off, "mlp_loss_and_grads", "grad w1"),
    (running_stats_left, "mlp_loss_and_grads", "running_(mean|var)"),
    (lenient_targets, "refuses bad input", "mlp_loss_and_grads target 4 of 4 classes: accepted"),
], ids=lambda value: getattr(value, "__name__", None))
def test_a_wrong_mlp_step_fails(monkeypatch, capsys, cpp, wrong, row, failure):
    step = partial(wrong, cpp.ops["mlp_loss_and_grads"])
    monkeypatch.setitem(check.BACKENDS, "broken", check.Backend({**cpp.ops, "mlp_loss_and_grads": step}, cpp.runs_on))
    assert check.main(["--device", "cpu", "--quick", "--backend", "broken", "--op", "mlp_loss_and_grads", "--dtype",
                       "float32"]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"^{row}\s+broken .* FAIL  first failure: .*{failure}", out, re.MULTILINE)


# mlp_sgd_step gone wrong, in the same way.
def step_too_long(op, *args, lr, **kwargs):
    return op(*args, lr=lr * 1.01, **kwargs)


def no_step(op, *args, lr, **kwargs):
    return op(*args, lr=0.0, **kwargs)


def table_step_off_by_1e_3(op, *args, table, **kwargs):
    """The table's step 0.1% too long: within 1e-5 of the table's own size, so found only by comparing steps."""
    before = table.clone()
    loss = op(*args, table=table, **kwargs)
    table += 1e-3 * (table - before)
    return loss


@pytest.mark.parametrize("wrong", [step_too_long, no_step, table_step_off_by_1e_3], ids=lambda wrong: wrong.__name__)
def test_a_wrong_sgd_step_fails(monkeypatch, capsys, cpp, wrong):
    step = partial(wrong, cpp.ops["mlp_sgd_step"])
    monkeypatch.setitem(check.BACKENDS, "broken", check.Backend({**cpp.ops, "mlp_sgd_step": step}, cpp.runs_on))
    assert check.main(["--device", "cpu", "--quick", "--backend", "broken", "--op", "mlp_sgd_step", "--dtype",
                       "float32"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^mlp_sgd_step\s+broken .* FAIL  first failure: .*: step of (table|w1|b1|w2|b2)", out,
                     re.MULTILINE)


def test_an_op_a_backend_lacks_is_not_checked_there(monkeypatch, capsys, cpp):
    assert "mlp_loss_and_grads" in check.fastlm_backend("cpp").ops
    assert not any("mlp_loss_and_grads" in check.fastlm_backend(name).ops for name in ("cuda", "triton"))
    ops = {op: fn for op, fn in cpp.ops.items() if op not in ("mlp_loss_and_grads", "mlp_sgd_step")}
    monkeypatch.setitem(check.BACKENDS, "partial", check.Backend(ops, cpp.runs_on))
    assert check.main(["--device", "cpu", "--quick", "--backend", "partial", "cpp", "--op", "mlp_loss_and_grads",
                       "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "  not checked: mlp_loss_and_grads on partial: no such op there" in out
    assert re.search(r"^mlp_loss_and_grads\s+cpp\s+float64 .* PASS", out, re.MULTILINE)
    assert not re.search(r"^mlp_loss_and_grads\s+partial", out, re.MULTILINE)
    # The determinism (in the dtype asked for) and refusal checks of the op asked for alone, where the backend has it.
    assert re.search(r"^determinism\s+cpp\s+float64\s+1 .* PASS$", out, re.MULTILINE)
    assert re.search(r"^refuses bad input\s+cpp\s+-\s+4 .* PASS$", out, re.MULTILINE)
    assert not re.search(r"^(determinism|refuses bad input)\s+partial", out, re.MULTILINE)


def test_op_limits_every_check_and_exact_rows_name_no_worst_case(capsys, cpp):
    """--op cross_entropy: its accuracy rows and its two refusals; no determinism row (its backward reduces
    nothing over the batch). A row whose every case is exact names no "worst" case."""
    assert check.main(["--device", "cpu", "--quick", "--backend", "cpp", "--op", "cross_entropy", "--dtype",
                       "float64"]) == 0
    rows = capsys.readouterr().out.split("-\n")[-1].splitlines()[:-1]  # the table, between header and summary
    assert [row.split()[0] for row in rows] == ["cross_entropy", "refuses"], rows
    assert re.fullmatch(r"refuses bad input\s+cpp\s+-\s+2\s+0\.00e\+00\s+0e\+00\s+PASS", rows[1]), rows[1]
    assert re.search(r"PASS  worst: \S", rows[0]), rows[0]  # float64 rounding: a nonzero worst case, named


def test_a_dtype_the_step_kernel_does_not_take_is_not_checked_there(capsys, cpp):
    """The one-call MLP kernels take float32 and float64 (half-precision models run their layers): float16 is
    checked on the torch backend and reported as not checked on cpp; with float32 too the command passes, with
    float16 alone it checked none of cpp's values, which is nothing to check (the torch row alone passed it)."""
    assert check.main(["--device", "cpu", "--quick", "--backend", "cpp", "torch", "--op", "mlp_sgd_step", "--dtype",
                       "float16", "float32"]) == 0
    out = capsys.readouterr().out
    assert "  not checked: mlp_sgd_step in float16 on the kernel backends" in out
    assert re.search(r"^mlp_sgd_step\s+torch\s+float16 .* PASS", out, re.MULTILINE)
    assert not re.search(r"^mlp_sgd_step\s+cpp\s+float16", out, re.MULTILINE)
    assert check.main(["--device", "cpu", "--quick", "--backend", "cpp", "torch", "--op", "mlp_sgd_step", "--dtype",
                       "float16"]) == 1
    assert "FAILED: nothing to check" in capsys.readouterr().out
    # the reference alone, asked for: it takes float16, and no kernel backend asked for lacks it
    assert check.main(["--device", "cpu", "--quick", "--backend", "torch", "--op", "mlp_sgd_step", "--dtype",
                       "float16"]) == 0
    assert "not checked: mlp_sgd_step" not in capsys.readouterr().out


def test_unknown_backend_is_refused():
    with pytest.raises(SystemExit):
        check.main(["--backend", "nope"])


def test_a_crashing_backend_fails_each_check_and_rows_print_as_they_finish(monkeypatch, capsys, cpp):
    """A kernel that raises is a FAIL row naming the error (the first line of its message: the rest broke the
    table), in the accuracy and the determinism checks alike, and the check goes on; each row is printed when
    its check ends, not all at the end."""
    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                           "asynchronously reported at some other API call")

    monkeypatch.setitem(check.BACKENDS, "crashing", check.Backend({**cpp.ops, "batch_norm": crash}, cpp.runs_on))
    printed_before = []
    determinism = check.check_determinism
    monkeypatch.setattr(check, "check_determinism",
                        lambda *args: printed_before.append(capsys.readouterr().out) or determinism(*args))
    assert check.main(["--device", "cpu", "--quick", "--backend", "crashing", "--op", "batch_norm", "--dtype",
                       "float32"]) == 1
    out = printed_before[0] + capsys.readouterr().out
    assert re.search(r"^batch_norm\s+crashing\s+float32 .* FAIL  first failure: .*RuntimeError: CUDA error",
                     printed_before[0], re.MULTILINE)
    assert re.search(r"^determinism\s+crashing .* FAIL  first failure: batch_norm \S+ train tanh: RuntimeError",
                     out, re.MULTILINE)
    assert re.search(r"^refuses bad input\s+crashing .* FAIL", out, re.MULTILINE)  # the crash is not a refusal
    assert "asynchronously" not in out


@pytest.mark.parametrize("command", ["bench", "check"])
def test_ctrl_c_is_a_message_and_status_130(monkeypatch, capsys, command):
    """Ctrl-C ends `fastlm bench` and `fastlm check` as it ends `fastlm train`: exit status 130 and one line, no
    traceback."""
    from fastlm import benchmark, cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark if command == "bench" else check, "main", interrupted)
    assert cli.main([command, "--quick"]) == 130
    assert capsys.readouterr().err == f"fastlm {command}: interrupted\n"


def test_a_reader_that_stops_reading_ends_the_command_quietly():
    """`fastlm check | head -1`: the command ends as a tool killed by SIGPIPE does (status 141), without the
    BrokenPipeError traceback it printed (with status 1, a failed check's)."""
    command = subprocess.Popen([sys.executable, "-m", "fastlm", "check", "--quick", "--backend", "torch"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert command.stdout.readline().startswith("fastlm check on cpu")
    command.stdout.close()
    assert command.wait(timeout=300) == 141
    assert "Traceback" not in command.stderr.read()


def test_names_given_twice_are_checked_once(cpp):
    """`--backend cpp cpp --op batch_norm batch_norm` printed every row two or four times."""
    args = check.parse_args(["--backend", "cpp", "cpp", "--op", "batch_norm", "batch_norm", "--dtype", "float32",
                             "float32"])
    assert (args.backend, args.op, args.dtype) == (["cpp"], ["batch_norm"], ["float32"])


def test_an_error_at_the_tolerance_passes_and_one_above_it_fails():
    result = check.Result("batch_norm", "cpp", "float32", tolerance=2e-5)
    result.record("at", 2e-5)
    assert result.passed
    result.record("above", 2.2e-5)
    assert result.failures == ["above"] and result.worst == "above"


def test_a_loss_of_the_wrong_shape_fails(monkeypatch, capsys, cpp):
    """A loss of shape (1,) where torch gives a 0-dim one: equal values once broadcast, a wrong result all the same
    (the forward-only case, where backward does not trip over the shape first)."""
    def kept_dim(*args, **kwargs):
        loss = cpp.ops["cross_entropy"](*args, **kwargs)
        return loss if loss.requires_grad else loss.reshape(1)

    monkeypatch.setitem(check.BACKENDS, "kept", check.Backend({**cpp.ops, "cross_entropy": kept_dim}, cpp.runs_on))
    assert check.main(["--device", "cpu", "--quick", "--backend", "kept", "--op", "cross_entropy", "--dtype",
                       "float32"]) == 1
    assert re.search(r"^cross_entropy\s+kept\s+float32 .* FAIL  first failure: N=7 C=27 weight, forward only: output",
                     capsys.readouterr().out, re.MULTILINE)


def test_the_inputs_a_case_marks_strided_reach_the_backend_non_contiguous(monkeypatch, cpp):
    """Every op has a case whose input comes column-major, as a transposed or sliced tensor would."""
    strided_ops = set()

    def recording(op):
        def call(*args, **kwargs):
            if any(isinstance(value, torch.Tensor) and not value.is_contiguous()
                   for value in (*args, *kwargs.values())):
                strided_ops.add(op)
            return cpp.ops[op](*args, **kwargs)
        return call

    monkeypatch.setitem(check.BACKENDS, "recording", check.Backend({op: recording(op) for op in cpp.ops},
                                                                   cpp.runs_on))
    assert check.main(["--device", "cpu", "--quick", "--backend", "recording", "--dtype", "float32"]) == 0
    assert strided_ops == set(check.OPS)


def test_half_precision_checks_pass_on_cpu_with_batch_norm_parameters_kept_in_fp32(capsys, cpp):
    """The GPU's dtypes run on the cpp kernels too: BatchNorm's weight, bias and running statistics stay fp32 (as
    under autocast), so their gradients and steps are fp32 while the input's are half."""
    assert check.main(["--device", "cpu", "--quick", "--backend", "cpp", "--op", "batch_norm", "cross_entropy",
                       "--dtype", "bfloat16", "float16"]) == 0
    out = capsys.readouterr().out
    for op in ("batch_norm", "cross_entropy"):
        for dtype in ("bfloat16", "float16"):
            assert re.search(rf"^{op}\s+cpp\s+{dtype} .* PASS", out, re.MULTILINE)


def test_a_backend_exact_on_its_half_precision_inputs_is_off_by_its_output_rounding_alone(monkeypatch, cpp):
    """The reference runs on the inputs and upstream gradient rounded as the backend under test got them: a
    backend computing the exact loss of its bfloat16 logits is within bfloat16's rounding of its results (2^-8
    relative, at most 2^-9 on the check's scale), where against the unrounded values it was not."""
    def exact(input, target, weight=None, **options):
        loss = check.REFERENCE["cross_entropy"](input.double(), target,
                                                 weight=None if weight is None else weight.double(), **options)
        return loss.to(input.dtype)

    monkeypatch.setitem(check.BACKENDS, "exact", check.Backend({**cpp.ops, "cross_entropy": exact}, cpp.runs_on))
    result = check.check_op("cross_entropy", check.cross_entropy_cases(quick=True), "exact", torch.bfloat16, "cpu")
    assert result.passed and 0 < result.error <= 2**-9, (result.error, result.worst)


def test_no_kernel_backend_running_on_the_device_fails(monkeypatch, capsys, cpp):
    """On a machine where only the reference runs on the device, checking it against itself would pass while
    checking nothing of fastlm's."""
    for name in check.BACKENDS:
        if name != "torch":
            monkeypatch.setitem(check.BACKENDS, name, check.Backend(check.BACKENDS[name].ops, lambda device: False))
    assert check.main(["--device", "cpu", "--quick", "--op", "batch_norm", "--dtype", "float32"]) == 1
    out = capsys.readouterr().out
    assert "  not checked: cpp: does not run on cpu" in out
    assert out.rstrip().endswith("FAILED: no fastlm kernel backend runs on cpu here")


def test_a_backend_counting_ignored_rows_as_class_0_fails(monkeypatch, capsys, cpp):
    def counting_ignored(input, weight, target, *args, **kwargs):
        return cpp.ops["linear_cross_entropy"](input, weight, torch.where(target == -100, 0, target), *args, **kwargs)

    monkeypatch.setitem(check.BACKENDS, "counting",
                        check.Backend({**cpp.ops, "linear_cross_entropy": counting_ignored}, cpp.runs_on))
    assert check.main(["--device", "cpu", "--quick", "--backend", "counting", "--op", "linear_cross_entropy",
                       "--dtype", "float64"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^linear_cross_entropy\s+counting\s+float64 .* FAIL", out, re.MULTILINE)
    assert re.search(r"^refuses bad input\s+counting .* PASS", out, re.MULTILINE)
