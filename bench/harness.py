"""The shared benchmark harness: providers timed side by side in one run, medians and ratios, peak memory.

Every benchmark in bench/ builds a list of ``Provider``s for a case (fastlm backends, eager PyTorch,
torch.compile, Liger-Kernel where installed) and hands them to ``run_case``, which warms each one up
(compile time stays out), times it, measures the peak memory it adds, and returns one row per provider
with its median, spread and speed-up over eager. ``save`` writes the rows as JSON with the machine,
versions and git commit.

Timing: CPU with a perf_counter loop (median of the repetitions); GPU with triton.testing.do_bench
(CUDA events, median). Peak memory: CPU as the growth of the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs before each measured call); GPU with torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Provider:
    """A named way of running the case: ``run()`` performs one full measured step."""

    name: str
    run: Callable[[], object]


@dataclass
class Row:
    case: str
    provider: str
    median_ms: float
    spread_ms: tuple[float, float]  # 25th and 75th percentiles
    speedup_vs_eager: float | None = None
    peak_extra_mb: float | None = None
    extra: dict = field(default_factory=dict)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def parse_args(doc: str, name: str) -> argparse.Namespace:
    """The command line every benchmark takes: --device, --quick, --save."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes, a few repetitions")
    parser.add_argument("--save", action="store_true", help=f"write bench/results/{name}-<device>.json")
    return parser.parse_args()


def fastlm_backends(device: str) -> list[str]:
    """The fastlm backends worth timing on ``device``: compiled ones only (not the torch reference, which
    eager already covers, nor Triton's CPU interpreter)."""
    from fastlm import backends

    return [name for name in backends.available()
            if name != "torch" and not (name == "triton" and device == "cpu")
            and backends.runs_on(name, torch.device(device))]


def time_ms(fn: Callable[[], object], device: str, reps: int = 10, warmup: int = 2) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn`` after ``warmup`` calls."""
    if device == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, warmup=25, rep=max(100, reps * 10), return_mode="all")
        return list(ms)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_extra_mb(fn: Callable[[], object], device: str) -> float | None:
    """Memory one call of ``fn`` adds at its peak over what was allocated before it (None if unmeasurable)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
        before = _status_mb("VmRSS")
        fn()
        return _status_mb("VmHWM") - before
    except OSError:
        return None


def run_case(case: str, providers: list[Provider], device: str, reps: int = 10, warmup: int = 2,
             memory: bool = True) -> list[Row]:
    """Times every provider on the case, side by side, and fills in speed-ups over the 'eager' provider."""
    rows = []
    for provider in providers:
        times = time_ms(provider.run, device, reps, warmup)
        rows.append(Row(case, provider.name, statistics.median(times),
                        (_percentile(times, 0.25), _percentile(times, 0.75))))
        if memory:
            rows[-1].peak_extra_mb = peak_extra_mb(provider.run, device)
    eager = next((row.median_ms for row in rows if row.provider == "eager"), None)
    for row in rows:
        row.speedup_vs_eager = eager / row.median_ms if eager else None
    return rows


def copy_bandwidth_gbs(device: str, nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth measured now (bytes read + written per second): the roofline."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = statistics.median(time_ms(lambda: dst.copy_(src), device, reps=20))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def environment(device: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(RESULTS_DIR)).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    if device == "cpu":
        with open("/proc/cpuinfo") as cpuinfo:
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), name)
    return {
        "device": device,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def print_rows(rows: list[Row]) -> None:
    header = f"{'case':<34} {'provider':<16} {'median ms':>10} {'IQR ms':>17} {'vs eager':>9} {'peak +MB':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        spread = f"{row.spread_ms[0]:.3f}-{row.spread_ms[1]:.3f}"
        speedup = f"{row.speedup_vs_eager:.2f}x" if row.speedup_vs_eager else "-"
        peak = f"{row.peak_extra_mb:.0f}" if row.peak_extra_mb is not None else "-"
        extra = " ".join(f"{k}={v}" for k, v in row.extra.items())
        print(f"{row.case:<34} {row.provider:<16} {row.median_ms:>10.3f} {spread:>17} {speedup:>9} {peak:>9} {extra}")


def save(name: str, device: str, rows: list[Row], extra: dict | None = None) -> str:
    """Writes bench/results/<name>-<device>.json and returns its path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}-{device}.json")
    with open(path, "w") as out:
        json.dump({"environment": environment(device), **(extra or {}), "rows": [asdict(row) for row in rows]},
                  out, indent=1)
    return path
