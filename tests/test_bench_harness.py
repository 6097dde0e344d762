"""fastlm.bench_harness's measurements on their own: what each timer counts (on a fake clock, so the counts are
exact), which calls the backward mode times, a provider that fails or whose output is not eager's (a failed row,
the others still timed), the quartiles, the copy bandwidth's bytes, the peak memory of steps whose memory comes
back from the heap or from a fastlm op's kept buffer, the commit and changes a result records, the table's
numbers, and a save interrupted midway."""

import json
import os
import subprocess

import pytest
import torch

from conftest import skip_unless_runs
from fastlm import backends
from fastlm import bench_harness as harness
from fastlm.ops import cross_entropy


class FakeClock:
    """harness.time with a perf_counter that only the calls under test move."""

    def __init__(self):
        self.now_s = 0.0

    def perf_counter(self) -> float:
        return self.now_s

    def costing(self, *seconds: float):
        """A call that takes seconds[i] at its i-th call (the last of them from then on) and counts its calls."""
        def call(*_):
            call.count += 1
            self.now_s += seconds[min(call.count, len(seconds)) - 1]
        call.count = 0
        return call


@pytest.fixture
def clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(harness, "time", clock)
    return clock


def test_gpu_blocks_hold_a_millisecond_of_calls_and_give_the_time_per_call(clock):
    call = clock.costing(1e-4)  # 0.1 ms a call: 10 calls to a 1 ms block, 100 calls in 10 blocks
    samples = harness.gpu_blocks_ms(call, reps=100, device="cpu")
    assert samples == pytest.approx([0.1] * 10)
    assert call.count == 1 + 100  # the first call sizes the blocks
    few = harness.gpu_blocks_ms(clock.costing(1e-3), reps=10_000, block_ms=2.0, budget_ms=4.0, device="cpu")
    assert few == pytest.approx([1.0] * 5)  # two calls a block; a budget under five blocks still gets five


def test_warm_up_reports_the_first_call_s_extra_time(clock):
    assert harness.warm_up(clock.costing(5e-3, 1e-3), "cpu", None) == pytest.approx(4e-3)
    assert harness.warm_up(clock.costing(1e-3, 2e-3), "cpu", None) == 0  # a slower second call: no one-off cost


def test_a_call_as_long_as_the_budget_is_timed_once(clock):
    call = clock.costing(3.0)  # longer than TIMING_BUDGET_S: the probe call is the sample, not one of many
    assert harness.time_ms(call, "cpu", reps=10) == [3000.0]
    assert call.count == 1


def test_each_timed_call_after_a_setup_is_one_sample_and_at_least_five_are_taken(clock):
    call = clock.costing(1.0)  # 1 s a call: the budget is spent after two, five are taken all the same
    assert harness.time_ms(call, "cpu", reps=20, setup=lambda: None) == [1000.0] * 5
    assert harness.time_ms(clock.costing(1e-3), "cpu", reps=3, setup=lambda: None) == pytest.approx([1.0] * 3)


def test_backward_mode_times_the_backward_alone():
    calls = []
    problem = harness.Problem("tiny", {"p": lambda: calls.append("forward") or "output"},
                              backward=lambda output: calls.append(f"backward of {output}"), reps=1)
    setup, run = harness.step(problem, "p", "bwd")
    state = setup()
    assert calls == ["forward"]
    run(state)  # what is timed
    assert calls == ["forward", "backward of output"]
    setup, run = harness.step(problem, "p", "full")
    assert setup is None
    run(None)
    assert calls[2:] == ["forward", "backward of output"]


def test_backward_frees_the_leaves_gradients():
    x = torch.randn(3, requires_grad=True)
    harness.backward_for([x])((x * 2).sum())
    assert x.grad is None


def test_quartiles_are_the_nearest_ranks():
    assert harness._percentile([4.0, 1.0, 3.0, 2.0], 0.25) == 2.0
    assert harness._percentile([4.0, 1.0, 3.0, 2.0], 0.75) == 3.0
    assert harness._percentile([7.0], 0.25) == 7.0


def test_copy_bandwidth_counts_the_bytes_read_and_written(monkeypatch):
    monkeypatch.setattr(harness, "time_ms", lambda *args, **kwargs: [2.0, 1.0, 9.0])  # median 2 ms
    assert harness.copy_bandwidth_gbs("cpu", nbytes=2**20) == pytest.approx(2 * 2**20 / 2e-3 / 1e9)


def test_outputs_are_compared_within_the_dtype_s_rounding_scalars_too():
    assert harness.output_mismatch(torch.tensor(2.0), torch.tensor(1.0)).startswith("output off eager's by 1.0e+00")
    assert harness.output_mismatch(torch.tensor([1.0 + 1e-4]), torch.tensor([1.0])) is None
    assert harness.output_mismatch(torch.tensor([1.002]), torch.tensor([1.0])).startswith("output off eager's by 2.0e")
    # eager's output not finite says nothing of the others': no comparison
    assert harness.output_mismatch(torch.tensor([0.0, 1.0]), torch.tensor([float("nan"), 1.0])) is None


def test_providers_take_turns_in_alternating_order_with_a_share_of_the_repetitions_each(monkeypatch):
    timed = []

    def time_ms(run, device, reps, setup=None):
        run(setup() if setup else None)
        timed[-1] = (timed[-1], reps)
        return [1.0]

    monkeypatch.setattr(harness, "time_ms", time_ms)
    problem = harness.Problem("tiny", {name: (lambda name=name: timed.append(name) or torch.ones(1))
                                       for name in ("eager", "fastlm")}, backward=lambda output: None, reps=12)
    rows = harness.run_problem("op", problem, "cpu", "fwd", None)
    turns = [entry for entry in timed if isinstance(entry, tuple)]  # after each provider's warm-up calls
    assert turns == [("eager", 3), ("fastlm", 3), ("fastlm", 3), ("eager", 3), ("eager", 3), ("fastlm", 3),
                     ("fastlm", 3), ("eager", 3), ("eager", 3), ("fastlm", 3)]
    assert [row.reps for row in rows] == [5, 5]


def _fails_on_call(n: int, error: Exception):
    """A provider's forward that works (returns a tensor) until its ``n``-th call, which raises ``error``."""
    calls = []

    def forward():
        calls.append(None)
        if len(calls) >= n:
            raise error
        return torch.ones(3).sum()
    return forward


def test_a_failing_provider_is_reported_and_the_others_still_timed():
    ok = lambda: torch.ones(3).sum()  # noqa: E731
    problem = harness.Problem("tiny", {"eager": ok, "broken": _fails_on_call(1, RuntimeError("no kernel\nmore")),
                                         "later": _fails_on_call(4, MemoryError("out of memory")), "fine": ok},
                                backward=lambda out: None, reps=5)
    rows = {row.provider: row for row in harness.run_problem("op", problem, "cpu", "fwd", None)}
    assert list(rows) == ["eager", "broken", "later", "fine"]  # in the problem's order
    assert rows["broken"].error == "RuntimeError: no kernel" and rows["broken"].median_ms is None
    assert rows["later"].error == "MemoryError: out of memory"  # raised while timed, after the warm-up
    for name in ("eager", "fine"):
        assert rows[name].error is None and rows[name].median_ms > 0 and rows[name].speedup_vs_eager > 0
    assert rows["broken"].speedup_vs_eager is None


def test_a_provider_whose_output_is_not_eagers_is_a_failure_not_a_time():
    """A fast wrong kernel (a no-op loss, an output of another shape) is a failed row, not a speed-up; rounding
    within the dtype's tolerance is not."""
    x = torch.randn(50, 7)
    forwards = {"eager": lambda: x.sum(1), "no-op": lambda: x[:, 0] * 0, "flat": lambda: x.sum(1).view(5, 10),
                "rounded": lambda: x.sum(1) * (1 + 1e-6)}
    problem = harness.Problem("tiny", forwards, backward=lambda out: None, reps=3)
    rows = {row.provider: row for row in harness.run_problem("op", problem, "cpu", "fwd", None)}
    assert rows["no-op"].error.startswith("output off eager's by 1.0e+00") and rows["no-op"].median_ms is None
    assert rows["flat"].error == "output of shape (5, 10), not eager's (50,)"
    assert rows["rounded"].error is None and rows["rounded"].median_ms > 0
    # Liger's cross-entropy writes its gradient over its logits: its later calls' values are not eager's
    problem.unverified = ("no-op",)
    rows = {row.provider: row for row in harness.run_problem("op", problem, "cpu", "fwd", None)}
    assert rows["no-op"].error is None and rows["flat"].error is not None


def test_a_failing_peak_measurement_keeps_the_times(monkeypatch):
    """One more call for the peak memory that runs out of memory: the times stand, the peak is unknown (the case
    was lost, eager's row too)."""
    def out_of_memory(*args):
        raise MemoryError("out of memory")

    monkeypatch.setattr(harness, "peak_extra_mb", out_of_memory)
    ok = lambda: torch.ones(3).sum()  # noqa: E731
    problem = harness.Problem("tiny", {"eager": ok, "fine": ok}, backward=lambda out: None, reps=3)
    rows = harness.run_problem("op", problem, "cpu", "fwd", None)
    assert [(row.error, row.peak_extra_mb, row.median_ms > 0) for row in rows] == [(None, None, True)] * 2


def test_only_compiled_backends_that_run_on_the_device_are_timed(monkeypatch):
    timed = harness.fastlm_backends("cpu")
    assert "torch" not in timed and "triton" not in timed  # the reference, the interpreter
    if "cpp" in backends.available():
        assert timed == ["cpp"]
    monkeypatch.setattr(backends, "runs_on", lambda name, device: name != "cpp")
    assert "cpp" not in harness.fastlm_backends("cpu")


def eager_batch_norm_step():
    """Eager BatchNorm's output and input gradient (8 MB each), which glibc hands back from the pages the last step
    freed: a resident-set count alone saw 0 MB."""
    x, grad = torch.randn(2048, 1024, requires_grad=True), torch.randn(2048, 1024)
    bn = torch.nn.BatchNorm1d(1024)

    def step(_):
        bn(x).backward(grad)
        x.grad = None
    return step


def fastlm_cross_entropy_step():
    """The cpp cross-entropy's gradient (16 MB), whose storage the op keeps for its next call: a training step that
    does not run right after another one pays for it."""
    skip_unless_runs("cpp")
    x, target = torch.randn(4096, 1024, requires_grad=True), torch.randint(0, 1024, (4096,))

    def step(_):
        cross_entropy(x, target, backend="cpp").backward()
        x.grad = None
    return step


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("make_step", [eager_batch_norm_step, fastlm_cross_entropy_step], ids=lambda f: f.__name__)
def test_peak_memory_counts_what_a_repeated_step_allocates_again(make_step):
    step = make_step()
    for _ in range(3):
        step(None)
    assert harness.peak_extra_mb(step, "cpu") >= 15


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_a_result_records_its_commit_and_changes_outside_bench_results(tmp_path, monkeypatch):
    """A run that rewrites the committed results leaves the tree clean for the record; any other change to a
    tracked file makes it dirty."""
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "op-cpu.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "base")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    monkeypatch.setattr(harness, "CHECKOUT", str(tmp_path))
    monkeypatch.delenv("FASTLM_GIT_COMMIT", raising=False)
    (tmp_path / "bench" / "results" / "op-cpu.json").write_text('{"new": 1}')
    env = harness.environment("cpu")
    assert (env["git_commit"], env["git_dirty"]) == (head.strip(), False)
    assert env["date"].endswith("+00:00")  # UTC, said so
    (tmp_path / "code.py").write_text("x = 2\n")
    assert harness.environment("cpu")["git_dirty"] is True


def test_table_times_keep_three_significant_digits_without_exponents():
    assert [harness._ms(ms) for ms in (5102.4, 71.04, 0.1473, 0.000123)] == ["5102", "71.0", "0.147", "0.000123"]


def _result(**fields) -> dict:
    environment = {"device": "cpu", "device_name": "CPU", "threads": 2, "torch": "2", "triton": "3",
                   "git_commit": "0123456789abcdef", "git_dirty": False, "date": "2026-12-07T00:00:00+00:00",
                   "timing": "timed"}
    row = {"case": "N=8", "provider": "eager", "median_ms": 1.0, "spread_ms": [0.9, 1.1], "speedup_vs_eager": 1.0,
           "gbs": None, "peak_extra_mb": 0.0}
    rows = [row, {**row, "provider": "fastlm-cpp", "median_ms": 0.5, "spread_ms": [0.45, 0.55],
                  "speedup_vs_eager": 2.0}]
    return {"op": "op", "mode": "full", "environment": environment, "rows": rows, **fields}


def test_table_names_each_case_once_and_a_busy_machine_above_one_load_per_core():
    lines = harness._result_table(_result(load_per_core_at_start=1.5))
    assert "; a busy machine (load 1.5 per core at the start)." in lines[0]
    assert lines[3].startswith("| N=8 | eager |") and lines[4].startswith("|  | fastlm-cpp | 0.500 (0.450-0.550)")
    assert "busy" not in harness._result_table(_result(load_per_core_at_start=1.0))[0]
    failed = _result()
    failed["rows"][1] |= {"median_ms": None, "spread_ms": None, "speedup_vs_eager": None, "error": "a | b"}
    assert harness._result_table(failed)[4] == "|  | fastlm-cpp | failed: a / b | - | - | 0 |"  # one cell still


def test_no_plot_when_every_provider_failed(tmp_path):
    pytest.importorskip("matplotlib")
    row = harness.Row("op", "N=8", "full", "eager", None, None, 0, error="RuntimeError: no")
    assert harness.plot([row], str(tmp_path / "plot.png")) is False
    assert os.listdir(tmp_path) == []


def test_a_save_interrupted_midway_leaves_no_partial_file(tmp_path):
    path = str(tmp_path / "result.json")

    def interrupted(out):
        json.dump({"half": 1}, out)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harness._write_atomically(path, interrupted)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_of_a_call_that_allocates_nothing_is_about_zero_after_a_larger_peak():
    """The process's peak is reset before the measured call: an earlier, larger peak does not count."""
    torch.ones(2**24).sum()  # 64 MB, touched, then freed
    assert harness.peak_extra_mb(lambda _: None, "cpu") < 1
