"""The benchmark harness behind ``fastlm bench``: providers timed side by side in one run, medians with their
spread, speed-ups over eager PyTorch, GB/s, peak memory, and the results written as a terminal table, CSV,
JSON and PNG plots. It lives in the package (not in bench/) so that an installed fastlm can benchmark itself.

A ``Problem`` is one case of one op (sizes, dtype) with the forward of every provider (fastlm backends,
eager PyTorch, torch.compile, Liger-Kernel where installed) on shared inputs; ``run_problem`` times each
provider in the chosen mode (fwd, bwd or full) and returns one ``Row`` per provider. A provider that raises
(torch.compile failing on a shape, a GPU out of memory) gets a row with the error instead of times, and the
others are still measured.

Timing: CPU with torch.utils.benchmark's ``Timer.blocked_autorange`` (blocks of calls, over about as long as
the case's repetitions take; median and quartiles of the blocks); GPU likewise, blocks of back-to-back calls
between two CUDA events (see ``gpu_blocks_ms``). For ``bwd``, each backward is timed alone (perf_counter on
CPU, CUDA events on GPU) after its forward ran, untimed, just before. The providers take turns: the time of each is
split into ``ROUNDS`` rounds, each round times every provider once (in alternating order), so that a
machine whose speed drifts over seconds (a shared VM) slows every provider alike instead of whichever
ran during a slow spell. Two untimed warm-up calls per provider come first; the first call's
extra time over the second (compilation, Triton JIT and autotuning, first allocations) is reported apart as
``compile_s``. Peak memory: CPU as the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs before the measured call); GPU with torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import csv
import ctypes
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import torch

MODES = ("fwd", "bwd", "full")
ROUNDS = 5  # turns each provider gets within one case (see the module docstring)
T = TypeVar("T")
# The checkout this module sits in, if any: results then default to its bench/results and carry its commit.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Problem:
    """One case of an op. ``forwards`` maps each provider to its forward on the shared inputs; ``backward``
    backpropagates such an output and frees the inputs' gradients (inside the step, so peak memory counts
    them); ``min_bytes`` holds, per mode, the fewest bytes that mode must move (no entry: no GB/s)."""

    case: str
    forwards: dict[str, Callable[[], torch.Tensor]]
    backward: Callable[[torch.Tensor], None]
    reps: int
    min_bytes: dict[str, int] = field(default_factory=dict)
    annotate: Callable[["Row"], None] | None = None  # fills op-specific fields of row.extra
    unverified: tuple[str, ...] = ()  # providers whose output is not compared with eager's (see run_problem)


@dataclass
class Row:
    op: str
    case: str
    mode: str
    provider: str
    median_ms: float | None  # None: the provider failed (see error)
    spread_ms: tuple[float, float] | None  # 25th and 75th percentiles
    reps: int
    speedup_vs_eager: float | None = None
    gbs: float | None = None
    of_copy_bw: float | None = None
    peak_extra_mb: float | None = None
    peak_vs_eager: float | None = None
    compile_s: float | None = None
    extra: dict = field(default_factory=dict)
    error: str | None = None  # what the provider raised, in one line


def fastlm_backends(device: str) -> list[str]:
    """The fastlm backends worth timing on ``device``: compiled ones only (not the torch reference, which
    eager already covers, nor Triton's CPU interpreter)."""
    from fastlm import backends

    return [name for name in backends.available()
            if name != "torch" and not (name == "triton" and device == "cpu")
            and backends.runs_on(name, torch.device(device))]


def backward_for(leaves: list[torch.Tensor], grad: torch.Tensor | None = None) -> Callable[[torch.Tensor], None]:
    def backward(output: torch.Tensor) -> None:
        output.backward(grad)
        for leaf in leaves:
            leaf.grad = None

    return backward


def step(problem: Problem, provider: str, mode: str) -> tuple[Callable[[], object] | None, Callable[[object], object]]:
    """(setup, run) for one provider in ``mode``: only ``run`` is timed; it takes what ``setup`` returned."""
    forward = problem.forwards[provider]
    if mode == "fwd":
        return None, lambda _: forward()
    if mode == "bwd":
        return forward, problem.backward
    return None, lambda _: problem.backward(forward())


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


TIMING_BUDGET_S = 2.0


def time_ms(run: Callable[[object], object], device: str, reps: int,
            setup: Callable[[], object] | None = None) -> list[float]:
    """Milliseconds per call of ``run(setup())`` (setup untimed), over about ``reps`` calls, at most about
    ``TIMING_BUDGET_S`` seconds: one entry per call, or, on CPU without a setup, one per block of calls
    (torch.utils.benchmark)."""
    if device == "cuda" and setup is None:
        return gpu_blocks_ms(lambda: run(None), reps)
    if setup is None:
        from torch.utils import benchmark

        start_s = time.perf_counter()
        run(None)
        first_s = time.perf_counter() - start_s
        budget_s = min(TIMING_BUDGET_S, max(0.01, reps * first_s))
        if first_s >= budget_s:  # a call as long as the budget is the sample (blocked_autorange would add two)
            return [first_s * 1e3]
        timer = benchmark.Timer("run(None)", globals={"run": run}, num_threads=torch.get_num_threads())
        return [seconds * 1e3 for seconds in timer.blocked_autorange(min_run_time=budget_s).times]
    times = []
    deadline_s = time.perf_counter() + TIMING_BUDGET_S  # (setups included: a backward's setup is its forward)
    for _ in range(reps):
        if len(times) >= 5 and time.perf_counter() > deadline_s:
            break
        state = setup() if setup else None
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            run(state)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            run(state)
            times.append((time.perf_counter() - start_s) * 1e3)
    return times


def gpu_blocks_ms(call: Callable[[], object], reps: int, block_ms: float = 1.0, budget_ms: float = 200.0,
                  device: str = "cuda") -> list[float]:
    """Milliseconds per call on a GPU, one entry per block of back-to-back calls timed by CUDA events, as a
    training loop runs them: each call is issued while the previous one runs, so a provider bound by its
    kernel launches is charged for them (flushing L2 between calls, as triton's do_bench does, lets it issue
    them while the flush runs), and caches stay warm as in the loop. A block lasts about ``block_ms``, so
    that the events' resolution does not matter; all blocks together about ``reps`` calls, at most
    ``budget_ms``.
    ``device="cpu"`` times the same blocks with perf_counter (for tests without a GPU)."""
    def mark() -> object:
        if device != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(start: object, end: object) -> float:
        return start.elapsed_time(end) if device == "cuda" else (end - start) * 1e3

    _sync(device)
    start_s = time.perf_counter()
    call()
    _sync(device)
    first_ms = (time.perf_counter() - start_s) * 1e3
    calls = max(1, round(block_ms / max(first_ms, 1e-3)))
    blocks = max(5, min(round(reps / calls), round(budget_ms / (calls * max(first_ms, 1e-3)))))
    marks = []
    for _ in range(blocks):
        start = mark()
        for _ in range(calls):
            call()
        marks.append((start, mark()))
    _sync(device)
    return [elapsed_ms(start, end) / calls for start, end in marks]


def warm_up(run: Callable[[object], object], device: str, setup: Callable[[], object] | None) -> float:
    """Two untimed calls; returns the first one's extra seconds over the second (the one-off costs)."""
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        run(setup() if setup else None)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return max(0.0, seconds[0] - seconds[1])


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def release_cpu_memory() -> None:
    """Frees what the CPU would reuse unseen by a resident-set count: fastlm's kept output and gradient buffers
    (csrc/cpu/reused_buffer.h) and glibc's free heap pages. A call then shows in VmHWM all it allocates, where
    memory taken back from the heap would otherwise count as nothing."""
    if hasattr(torch.ops.fastlm, "release_reused_buffers"):
        torch.ops.fastlm.release_reused_buffers()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def peak_extra_mb(run: Callable[[object], object], device: str,
                  setup: Callable[[], object] | None = None) -> float | None:
    """Memory one call of ``run`` adds at its peak over what was allocated before it (None if unmeasurable).
    On a GPU the caching allocator's count; on the CPU the growth of the resident set, after
    release_cpu_memory."""
    state = setup() if setup else None
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(state)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    release_cpu_memory()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
        before = _status_mb("VmRSS")
        run(state)
        return max(0.0, _status_mb("VmHWM") - before)  # not below zero when the call frees memory
    except OSError:
        return None


def failure(error: Exception, device: str) -> str:
    """One line saying what a provider raised; frees the cached GPU memory a failed call may have left."""
    if device == "cuda":
        torch.cuda.empty_cache()
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


# How far a provider's output may be from eager's, relative to its largest value: rounding, not a wrong kernel.
OUTPUT_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def output_mismatch(got: torch.Tensor, expected: torch.Tensor) -> str | None:
    """Why ``got`` is not eager's output ``expected`` beyond rounding, or None (also where eager's is not finite,
    which says nothing of the others)."""
    got, want = got.detach().double().cpu(), expected.detach().double().cpu()
    if got.shape != want.shape:
        return f"output of shape {tuple(got.shape)}, not eager's {tuple(want.shape)}"
    if not want.numel() or not want.isfinite().all():
        return None
    error = ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
    tolerance = OUTPUT_TOLERANCE.get(expected.dtype, 1e-3)
    return None if error <= tolerance else (f"output off eager's by {error:.1e} of its largest value (tolerance "
                                            f"{tolerance:.0e})")


def run_problem(op: str, problem: Problem, device: str, mode: str, copy_gbs: float | None) -> list[Row]:
    """Times every provider of the problem side by side, in turns; ratios are over the 'eager' provider. A
    provider that raises, warming up or timed, leaves the turns and is reported by its error; so does one whose
    output, after its warm-up, is not eager's (a fast wrong kernel is no result). Each provider's warm-up makes
    the same calls, so that providers with state of their own (a training step's model) compare in step."""
    torch.compiler.reset()  # each case compiles afresh, for its own shapes, inside its own warm-up
    steps, compile_s, errors, outputs = {}, {}, {}, {}
    for provider in problem.forwards:
        try:
            setup, run = step(problem, provider, mode)
            compile_s[provider] = warm_up(run, device, setup)
            outputs[provider] = problem.forwards[provider]().detach().clone()  # (a graph's or kept buffer)
            steps[provider] = setup, run
        except Exception as error:
            errors[provider] = failure(error, device)
    for provider, output in outputs.items():
        mismatch = (output_mismatch(output, outputs["eager"])
                    if "eager" in outputs and provider not in problem.unverified else None)
        if mismatch:
            errors[provider] = mismatch
            del steps[provider]
    del outputs
    times: dict[str, list[float]] = {provider: [] for provider in steps}
    reps_per_round = max(1, -(-problem.reps // ROUNDS))
    for turn in range(ROUNDS):
        order = list(steps) if turn % 2 == 0 else list(reversed(steps))
        for provider in order:
            setup, run = steps[provider]
            try:
                times[provider] += time_ms(run, device, reps_per_round, setup)
            except Exception as error:
                errors[provider] = failure(error, device)
                del steps[provider]
    rows, rated = [], rated_bandwidth_gbs(device)
    for provider in problem.forwards:
        if provider in errors:
            rows.append(Row(op, problem.case, mode, provider, None, None, 0, error=errors[provider]))
            continue
        setup, run = steps[provider]
        samples = times[provider]
        try:
            peak = peak_extra_mb(run, device, setup)
        except Exception as error:  # (out of memory for one more call, say): the time stands, the peak is unknown
            failure(error, device)
            peak = None
        row = Row(op, problem.case, mode, provider, statistics.median(samples),
                  (_percentile(samples, 0.25), _percentile(samples, 0.75)), len(samples),
                  compile_s=compile_s[provider], peak_extra_mb=peak)
        if mode in problem.min_bytes:
            row.gbs = problem.min_bytes[mode] / (row.median_ms * 1e-3) / 1e9
            row.of_copy_bw = row.gbs / copy_gbs if copy_gbs else None
            if rated:
                row.extra["of_rated_bw"] = round(row.gbs / rated, 3)
        if problem.annotate:
            problem.annotate(row)
        rows.append(row)
    eager = next((row for row in rows if row.provider == "eager" and not row.error), None)
    for row in rows:
        if eager and not row.error:
            row.speedup_vs_eager = eager.median_ms / row.median_ms
            if row.peak_extra_mb is not None and eager.peak_extra_mb:
                row.peak_vs_eager = row.peak_extra_mb / eager.peak_extra_mb
    return rows


def copy_bandwidth_gbs(device: str, nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth measured now (bytes read + written per second): the roofline."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = statistics.median(time_ms(lambda _: dst.copy_(src), device, reps=20))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def timing_method(device: str) -> str:
    turns = f"providers in {ROUNDS} interleaved rounds"
    if device == "cuda":
        return ("CUDA events around blocks of back-to-back calls (~1 ms each, L2 not flushed), median and "
                "quartiles of the blocks; bwd: CUDA events around each backward after an untimed forward, at most "
                f"about {TIMING_BUDGET_S:g} s per provider a round; {turns}")
    return ("torch.utils.benchmark Timer.blocked_autorange after 2 warm-up calls, median and quartiles of its "
            "blocks; bwd: time.perf_counter around each backward after an untimed forward, at most "
            f"about {TIMING_BUDGET_S:g} s per provider a round; {turns}")


def rated_bandwidth_gbs(device: str) -> float | None:
    """The GPU's rated memory bandwidth from its memory clock and bus width (double data rate), where torch
    reports them; None on the CPU."""
    if device != "cuda":
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


def environment(device: str) -> dict:
    # A copy of the tree without .git (as on a lent GPU machine) can be told its commit in FASTLM_GIT_COMMIT.
    commit = os.environ.get("FASTLM_GIT_COMMIT", "")
    dirty = None  # whether tracked files other than bench/results differ from the commit (unknown without .git)
    if commit:  # "<sha>-dirty", as bench/gpu_session.sh's header makes it, says so; a bare sha says nothing more
        commit, dirty = commit.removesuffix("-dirty"), True if commit.endswith("-dirty") else None
    if not commit and os.path.exists(os.path.join(CHECKOUT, ".git")):
        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=CHECKOUT)
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                     ":!bench/results"], capture_output=True, text=True, cwd=CHECKOUT)
            if head.returncode == 0 and status.returncode == 0:  # git may refuse (another user's checkout)
                commit, dirty = head.stdout.strip(), bool(status.stdout.strip())
        except OSError:  # no git program
            pass
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    if device == "cpu" and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), name)
    return {
        "device": device,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # the CUDA release torch was built with (None in a CPU build)
        "triton": triton_version,
        "liger_kernel": installed_version("liger-kernel"),  # the baseline's release, where it was measured
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "rated_bandwidth_gbs": rated_bandwidth_gbs(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_per_core": load_per_core(),
        "timing": timing_method(device),
    }


def load_per_core() -> float | None:
    """The 1-minute load average per CPU core, None where the system does not report it. Above 1, other work
    competes with the timed calls (on this project's 2-core VM, eager's OpenMP threads then ran 400x slower)."""
    try:
        return round(os.getloadavg()[0] / (os.cpu_count() or 1), 2)
    except (OSError, AttributeError):
        return None


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def progress(items: Iterable[T], total: int, label: Callable[[T], str]) -> Iterator[T]:
    """``items`` with progress on stderr: a tqdm bar when tqdm is installed, else a line per item."""
    try:
        from tqdm import tqdm
    except ImportError:
        for done, item in enumerate(items, 1):
            print(f"[{done}/{total}] {label(item)}", file=sys.stderr, flush=True)
            yield item
        return
    with tqdm(items, total=total, file=sys.stderr) as bar:
        for item in bar:
            bar.set_description(label(item))
            yield item


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def _ms(value: float) -> str:
    """Three significant digits, never in exponent notation."""
    return f"{value:.{max(0, 2 - math.floor(math.log10(value)))}f}" if value > 0 else f"{value:g}"


def print_rows(rows: list[Row]) -> None:
    width = max(len(row.case) for row in rows)
    header = (f"{'case':<{width}} {'provider':<16} {'median ms':>10} {'IQR ms':>17} {'vs eager':>9} {'GB/s':>8} "
              f"{'of copy':>8} {'peak +MB':>9} {'compile s':>10}")
    print(header)
    print("-" * len(header))
    for row in rows:
        if row.error:
            print(f"{row.case:<{width}} {row.provider:<16} FAILED: {row.error}")
            continue
        spread = f"{row.spread_ms[0]:.3f}-{row.spread_ms[1]:.3f}"
        extra = " ".join(f"{k}={v}" for k, v in row.extra.items())
        print(f"{row.case:<{width}} {row.provider:<16} {row.median_ms:>10.3f} {spread:>17} "
              f"{_fmt(row.speedup_vs_eager, '.2f', 'x'):>9} {_fmt(row.gbs, '.1f'):>8} {_fmt(row.of_copy_bw, '.3f'):>8} "
              f"{_fmt(row.peak_extra_mb, '.0f'):>9} {_fmt(row.compile_s, '.2f'):>10} {extra}")


class NotSaved(Exception):
    """A result file could not be written (a full disk, ...): the run cannot keep what it measures."""


def _write_atomically(path: str, write: Callable, mode: str = "w") -> None:
    """``write(file)`` into a scratch file renamed over ``path``: a run killed mid-save leaves the last whole
    file, never half of one, and a save that fails leaves no scratch file either."""
    scratch = f"{path}.part"
    try:
        with open(scratch, mode, **({"newline": ""} if mode == "w" else {})) as out:
            write(out)
        os.replace(scratch, path)
    except BaseException:
        if os.path.exists(scratch):
            os.remove(scratch)
        raise


def save(stem: str, device: str, rows: list[Row], header: dict, with_plot: bool = True) -> list[str]:
    """Writes ``stem``.json (environment, ``header``, rows), ``stem``.csv (one line per row) and, when
    ``with_plot`` and matplotlib is installed, ``stem``.png (else it removes an older one); returns the paths
    written. Called again as rows come in, it rewrites them whole. Raises NotSaved where a file cannot be
    written."""
    result = {"environment": environment(device), **header, "rows": [asdict(row) for row in rows]}
    flat = [_flat(row) for row in rows]
    columns = list(dict.fromkeys(key for line in flat for key in line))

    def write_csv(out) -> None:
        writer = csv.DictWriter(out, columns)
        writer.writeheader()
        writer.writerows(flat)
    try:
        os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
        _write_atomically(f"{stem}.json", lambda out: json.dump(result, out, indent=1))
        _write_atomically(f"{stem}.csv", write_csv)
        paths = [f"{stem}.json", f"{stem}.csv"]
        if with_plot and plot(rows, f"{stem}.png"):
            paths.append(f"{stem}.png")
        elif os.path.exists(f"{stem}.png"):  # an earlier run's plot, which these rows would not match
            os.remove(f"{stem}.png")
    except OSError as error:
        raise NotSaved(f"cannot save the results as {stem}.*: {error}") from error
    return paths


def _flat(row: Row) -> dict:
    line = asdict(row)
    line["q25_ms"], line["q75_ms"] = line.pop("spread_ms") or (None, None)
    line.update(line.pop("extra"))
    return line


def plot(rows: list[Row], path: str) -> bool:
    """Time (and GB/s, where the op defines its bytes) against the case, one line per provider. False when no
    provider has a time (all failed), and, with a printed note, when matplotlib is not installed."""
    if all(row.median_ms is None for row in rows):
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    cases = list(dict.fromkeys(row.case for row in rows))
    providers = list(dict.fromkeys(row.provider for row in rows))
    panels = [("median_ms", "median ms (log)")] + ([("gbs", "GB/s")] if any(row.gbs for row in rows) else [])
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for provider in providers:
            points = [(cases.index(row.case), getattr(row, key)) for row in rows
                      if row.provider == provider and getattr(row, key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=provider)
        ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(label)
        if key == "median_ms":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    figure.suptitle(f"{rows[0].op}, {rows[0].mode}")
    figure.tight_layout()
    try:
        _write_atomically(path, lambda out: figure.savefig(out, format="png", dpi=120), mode="wb")
    finally:
        plt.close(figure)
    return True


def markdown_table(paths: list[str]) -> str:
    """The README's benchmark table from saved JSON results: per file, a line saying the op, mode, device,
    versions, how it was measured and the commit (and whether the run was quick, cut short or made from a tree
    with uncommitted changes), then one table row per provider and case."""
    parts = []
    for path in paths:
        with open(path) as source:
            try:
                result = json.load(source)
            except ValueError as error:
                raise ValueError(f"{path} is not JSON ({error})") from error
        missing = {"op", "mode", "environment", "rows"} - set(result if isinstance(result, dict) else ())
        if missing:
            raise ValueError(f"{path} is not a fastlm bench result (it lacks {', '.join(sorted(missing))})")
        try:
            parts += _result_table(result)
        except (KeyError, TypeError, AttributeError, IndexError) as error:
            raise ValueError(f"{path} is not a fastlm bench result ({type(error).__name__}: {error})") from error
    return "\n".join(parts)


def _result_table(result: dict) -> list[str]:
    env = result["environment"]
    copy = f"; copy bandwidth {result['copy_bandwidth_gbs']:.1f} GB/s" if result.get("copy_bandwidth_gbs") else ""
    dirty = env.get("git_dirty")
    commit = (env["git_commit"][:10] or "unknown") + (
        " with uncommitted changes" if dirty else " (uncommitted changes unknown)" if dirty is None and
        env["git_commit"] else "")
    busy = result.get("load_per_core_at_start") or 0  # (the environment's, taken at a save, counts the run's own)
    caveats = "".join(caveat for caveat, applies in (
        ("; quick sizes and repetitions", result.get("quick")),
        (f"; a busy machine (load {busy:.1f} per core at the start)", busy > 1),
        ("; INCOMPLETE: the run was cut short", result.get("complete") is False)) if applies)
    gpu = env["device"] == "cuda"  # the CPU's thread count says nothing there; the bandwidth's fraction does
    where = f"({env['device']})" if gpu else f"({env['device']}, {env['threads']} threads)"
    liger = f", Liger-Kernel {env['liger_kernel']}" if env.get("liger_kernel") else ""  # older results lack it
    lines = [f"**{result['op']}** ({result['mode']}) on {env['device_name']} {where}, torch {env['torch']}, "
             f"triton {env['triton']}{liger}; {env['timing']}; commit {commit}, {env['date'][:10]}{copy}{caveats}.\n",
             "| case | provider | median ms (IQR) | vs eager | GB/s" + (" (of copy, of rated)" if gpu else "") +
             " | peak +MB |",
             "|---|---|---|---|---|---|"]
    previous = None
    for row in result["rows"]:
        spread = row["spread_ms"]
        median = (f"failed: {row['error']}".replace("|", "/") if row.get("error") else
                  f"{_ms(row['median_ms'])} ({_ms(spread[0])}-{_ms(spread[1])})")
        gbs = _fmt(row["gbs"], ".1f")
        if gpu and row["gbs"] is not None:
            gbs += f" ({_fmt(row.get('of_copy_bw'), '.0%')}, {_fmt(row.get('extra', {}).get('of_rated_bw'), '.0%')})"
        lines.append(f"| {row['case'] if row['case'] != previous else ''} | {row['provider']} | {median} | "
                     f"{_fmt(row['speedup_vs_eager'], '.2f', 'x')} | {gbs} | {_fmt(row['peak_extra_mb'], '.0f')} |")
        previous = row["case"]
    return lines + [""]
