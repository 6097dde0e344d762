"""fastlm.benchmark, the `fastlm bench` command, on small CPU runs: the CSV and JSON it writes parse and hold
positive finite numbers for eager and fastlm-cpp side by side, and the markdown table renders from them and
from the committed results. A provider or case that fails is reported without stopping the others, and a run
cut short keeps what it measured."""

import csv
import glob
import importlib.util
import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import skip_unless_runs
from fastlm import benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def positive(value) -> bool:
    return value is not None and math.isfinite(float(value)) and float(value) > 0


def test_quick_batch_norm_writes_csv_json_and_a_table(tmp_path, capsys):
    skip_unless_runs("cpp")
    assert benchmark.main(["--quick", "--op", "batch_norm", "--device", "cpu", "--out", str(tmp_path)]) == 0
    stem = tmp_path / "batch_norm-cpu-quick"
    result = json.loads(stem.with_suffix(".json").read_text())
    expected_keys = {"device_name", "torch", "cuda", "triton", "liger_kernel", "git_commit", "date", "timing"}
    assert expected_keys <= result["environment"].keys()
    assert result["op"] == "batch_norm" and result["mode"] == "full" and positive(result["copy_bandwidth_gbs"])
    rows = result["rows"]
    assert {"eager", "fastlm-cpp", "torch.compile"} <= {row["provider"] for row in rows}
    assert len({row["case"] for row in rows}) == 4  # two quick sizes, with and without tanh
    for row in rows:
        low, high = row["spread_ms"]
        assert positive(row["median_ms"]) and low <= row["median_ms"] <= high
        assert positive(row["speedup_vs_eager"]) and positive(row["gbs"]) and positive(row["of_copy_bw"])
        assert row["compile_s"] >= 0 and row["peak_extra_mb"] >= 0
    eager_ms = {row["case"]: row["median_ms"] for row in rows if row["provider"] == "eager"}
    for row in rows:  # how many times faster than eager: eager's time over the row's
        assert row["speedup_vs_eager"] == pytest.approx(eager_ms[row["case"]] / row["median_ms"], rel=1e-3)
    with open(stem.with_suffix(".csv"), newline="") as source:
        lines = list(csv.DictReader(source))
    assert [line["provider"] for line in lines] == [row["provider"] for row in rows]
    assert all(positive(line["median_ms"]) and positive(line["gbs"]) for line in lines)
    assert stem.with_suffix(".png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    capsys.readouterr()

    assert benchmark.main(["--table", str(stem.with_suffix(".json"))]) == 0
    table = capsys.readouterr().out
    assert "**batch_norm** (full)" in table and "| case | provider |" in table
    assert table.count("| fastlm-cpp |") == 4


def test_backward_mode_on_chosen_sizes_and_dtypes(tmp_path):
    command = ["--quick", "--op", "batch_norm", "--mode", "bwd", "--sizes", "65x33", "--dtype", "float32", "float64",
               "--out", str(tmp_path)]
    assert benchmark.main(command) == 0
    result = json.loads((tmp_path / "batch_norm-cpu-bwd-float32-float64-quick.json").read_text())
    rows = result["rows"]
    assert result["command"] == ["fastlm", "bench", *command]
    assert result["cases"] == ["batch_norm 65x33 float32", "batch_norm 65x33 float64"]
    assert isinstance(result["environment"]["git_dirty"], bool)
    assert [row["case"] for row in rows[::len(rows) // 4]] == ["N=65 C=33 float32", "N=65 C=33 float32 +tanh",
                                                               "N=65 C=33 float64", "N=65 C=33 float64 +tanh"]
    assert all(row["mode"] == "bwd" and positive(row["median_ms"]) and positive(row["gbs"]) for row in rows)


def test_no_backward_alone_for_a_backward_made_in_the_forward(capsys):
    """The fused losses make their gradient in the forward: their backward alone moves next to nothing, and its
    time against eager's real backward (140x) meant nothing, so --mode bwd is refused for them, as for mlp_step,
    whose calls are whole steps, and skipped by --op all."""
    for op in ("cross_entropy", "linear_cross_entropy"):
        with pytest.raises(SystemExit) as exit:
            benchmark.main(["--quick", "--op", op, "--mode", "bwd"])
        assert exit.value.code == 2
        assert "make the gradient in the forward" in capsys.readouterr().err


def test_table_with_options_that_run_a_benchmark_is_refused(capsys):
    """--table prints saved results as they are: --op, --quick and the like would be silently ignored."""
    saved = os.path.join(REPO, "bench", "results", "batch_norm-cpu.json")
    with pytest.raises(SystemExit) as exit:
        benchmark.main(["--table", saved, "--op", "batch_norm", "--quick"])
    assert exit.value.code == 2
    assert "--op, --quick would do nothing" in capsys.readouterr().err


def test_bad_arguments_are_usage_errors(tmp_path):
    """Exit status 2, as argparse gives every usage error (1 means a provider failed), before anything runs;
    an empty --out is refused (it read as no --out, and the results went into the checkout)."""
    for argv in (["--op", "batch_norm", "--sizes", "12x", "--out", str(tmp_path)],
                 ["--op", "batch_norm", "--sizes", "0x4", "--out", str(tmp_path)],  # no rows
                 ["--sizes", "4x4"],  # --sizes needs one --op
                 ["--op", "batch_norm", "--quick", "--out", ""],
                 ["--op", "mlp_step", "--mode", "bwd", "--quick", "--out", str(tmp_path)]):  # it ran nothing, 0
        with pytest.raises(SystemExit) as exit:
            benchmark.main(argv)
        assert exit.value.code == 2, argv
    assert not os.listdir(tmp_path)


def test_sizes_and_dtypes_given_twice_are_timed_once():
    args = benchmark.parse_args(["--op", "batch_norm", "--sizes", "4x4", "4X4", "8x8", "--dtype", "float32",
                                 "float32"])
    assert args.sizes == [(4, 4), (8, 8)] and benchmark.cases(benchmark.OPS["batch_norm"], args) == [
        ((4, 4), torch.float32), ((8, 8), torch.float32)]


def test_unusable_files_are_one_line_errors(tmp_path, capsys):
    """A --table file that is missing, not JSON or not a result, and an --out that cannot be a directory
    (found before any timing): exit status 2 and the reason, no traceback."""
    (tmp_path / "not_json.json").write_text("{")
    (tmp_path / "empty.json").write_text("{}")
    with open(os.path.join(REPO, "bench", "results", "batch_norm-cpu.json")) as source:
        committed = json.load(source)
    for name, broken in (("no_device.json", {**committed, "environment": {}}), ("bad_rows.json", {**committed,
                                                                                                  "rows": [{}]})):
        (tmp_path / name).write_text(json.dumps(broken))
    for path, reason in (("missing.json", "No such file"), ("not_json.json", "not_json.json is not JSON"),
                         ("empty.json", "not a fastlm bench result"),
                         ("no_device.json", "no_device.json is not a fastlm bench result (KeyError"),
                         ("bad_rows.json", "bad_rows.json is not a fastlm bench result (KeyError")):
        assert benchmark.main(["--table", str(tmp_path / path)]) == 2
        assert reason in capsys.readouterr().err
    assert benchmark.main(["--op", "batch_norm", "--quick", "--out", str(tmp_path / "empty.json" / "run")]) == 2
    assert "cannot write there" in capsys.readouterr().err


def test_an_unwritable_out_is_refused_before_timing(tmp_path, monkeypatch, capsys):
    """A directory that exists but takes no files (read-only, another user's): refused before any timing (the
    first save after a case failed, and the last one ended in a traceback)."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(benchmark.tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(benchmark.harness, "run_problem", lambda *args: pytest.fail("timed"))
    assert benchmark.main(["--op", "batch_norm", "--quick", "--out", str(tmp_path)]) == 2
    assert "cannot write there" in capsys.readouterr().err


def test_without_a_kernel_backend_nothing_is_timed(monkeypatch, capsys, tmp_path):
    """fastlm._C failed to load: the run would time eager and torch.compile alone and pass; it fails instead."""
    monkeypatch.setattr(benchmark, "fastlm_backends", lambda device: [])
    monkeypatch.setattr(benchmark.harness, "run_problem", lambda *args: pytest.fail("timed"))
    assert benchmark.main(["--op", "batch_norm", "--quick", "--out", str(tmp_path)]) == 1
    assert "no fastlm kernel backend runs on cpu" in capsys.readouterr().err


def test_table_heading_says_what_limits_a_result(tmp_path):
    """A quick run, one cut short, one from a tree with uncommitted changes or of unknown commit: the heading
    says so (it read as the full, clean run of the committed tables)."""
    with open(os.path.join(REPO, "bench", "results", "batch_norm-cpu.json")) as source:
        committed = json.load(source)
    limited = {**committed, "quick": True, "complete": False,
               "environment": {**committed["environment"], "git_dirty": True, "git_commit": ""}}
    (tmp_path / "limited.json").write_text(json.dumps(limited))
    heading = benchmark.harness.markdown_table([str(tmp_path / "limited.json")]).splitlines()[0]
    for words in ("commit unknown with uncommitted changes", "quick sizes", "INCOMPLETE"):
        assert words in heading, heading
    clean = benchmark.harness.markdown_table([os.path.join(REPO, "bench", "results", "batch_norm-cpu.json")])
    assert not any(words in clean for words in ("uncommitted", "quick sizes", "INCOMPLETE", "unknown"))


def test_gpu_table_gives_the_bandwidth_fractions():
    """A GPU result's table shows GB/s with its fractions of the copy and rated bandwidth (the issues' measure;
    the JSON had them, the table did not) and no CPU thread count in its heading."""
    with open(os.path.join(REPO, "bench", "results", "batch_norm-cpu.json")) as source:
        result = json.load(source)
    result["environment"] = {**result["environment"], "device": "cuda", "device_name": "NVIDIA H100"}
    row = next(row for row in result["rows"] if row["gbs"])
    row.update(gbs=2000.0, of_copy_bw=0.8, extra={"of_rated_bw": 0.6})
    table = benchmark.harness._result_table(result)
    assert "(cuda)," in table[0] and "threads" not in table[0]
    assert any("| 2000.0 (80%, 60%) |" in line for line in table), table


def test_table_heading_names_the_liger_kernel_release_it_was_measured_against():
    with open(os.path.join(REPO, "bench", "results", "cross_entropy-cpu.json")) as source:
        result = json.load(source)
    assert "Liger" not in benchmark.harness._result_table(result)[0]  # none measured, none named
    result["environment"] = {**result["environment"], "liger_kernel": "0.8.5"}
    assert ", Liger-Kernel 0.8.5;" in benchmark.harness._result_table(result)[0]


def test_a_checkout_git_refuses_records_no_commit(monkeypatch):
    """git refusing the checkout (another user's: "dubious ownership") left the commit blank and the tree
    recorded as clean; both are unknown."""
    import subprocess

    monkeypatch.delenv("FASTLM_GIT_COMMIT", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: subprocess.CompletedProcess(args, 128, "", "no"))
    env = benchmark.harness.environment("cpu")
    assert env["git_commit"] == "" and env["git_dirty"] is None


def test_a_commit_given_as_dirty_is_recorded_and_shown_so(monkeypatch):
    """FASTLM_GIT_COMMIT=<sha>-dirty (bench/gpu_session.sh's recipe for a tree without .git): the commit and
    dirty recorded apart (it was git_commit "<sha>-dirty", git_dirty null, a heading cut to the bare sha); a bare
    sha leaves the changes unknown, and the heading says so."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("FASTLM_GIT_COMMIT", sha + "-dirty")
    env = benchmark.harness.environment("cpu")
    assert env["git_commit"] == sha and env["git_dirty"] is True
    with open(os.path.join(REPO, "bench", "results", "batch_norm-cpu.json")) as source:
        result = json.load(source)
    result["environment"] = {**result["environment"], "git_commit": sha, "git_dirty": True}
    assert "commit 0123456789 with uncommitted changes," in benchmark.harness._result_table(result)[0]
    monkeypatch.setenv("FASTLM_GIT_COMMIT", sha)
    result["environment"] = {**result["environment"], **benchmark.harness.environment("cpu")}
    assert result["environment"]["git_dirty"] is None
    assert "commit 0123456789 (uncommitted changes unknown)," in benchmark.harness._result_table(result)[0]


def test_no_plot_of_an_earlier_run_is_left_beside_newer_rows(tmp_path):
    """A run cut short after its first case (files saved without a plot) left the earlier run's PNG, whose
    cases were not the JSON's."""
    row = benchmark.harness.Row("op", "n=1", "full", "eager", 1.0, (1.0, 1.0), 3)
    stem = str(tmp_path / "op-cpu")
    (tmp_path / "op-cpu.png").write_bytes(b"an earlier run's plot")
    assert benchmark.harness.save(stem, "cpu", [row], {}, with_plot=False) == [f"{stem}.json", f"{stem}.csv"]
    assert not (tmp_path / "op-cpu.png").exists()


def test_markdown_table_of_the_committed_results():
    paths = sorted(glob.glob(os.path.join(REPO, "bench", "results", "*.json")))
    table = benchmark.harness.markdown_table(paths)
    assert table.count("| case | provider | median ms (IQR) |") == len(paths)
    assert "| eager |" in table


def test_mlp_step_times_a_whole_training_step(tmp_path):
    assert benchmark.main(["--quick", "--op", "mlp_step", "--sizes", "8x4x16", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("mlp_step-*.json")).read_text())["rows"]
    providers = {row["provider"] for row in rows}
    assert {"fastlm-cpp", "fastlm-cpp-step", "eager", "torch.compile"} <= providers  # the step as fastlm train runs it
    assert all(row["median_ms"] > 0 and math.isfinite(row["median_ms"]) for row in rows)


def test_failures_are_saved_reported_and_fail_the_command(tmp_path, monkeypatch, capsys):
    """One size cannot be set up, one provider raises: the command goes on with the rest, saves the failing
    row with its error, renders it in the table, names both failures and exits 1."""
    def broken():
        raise ValueError("bad shape")

    def problems(size, dtype, device, quick):
        if size == (2,):
            raise MemoryError("no room for the inputs")
        yield benchmark.Problem(f"n={size[0]}", {"eager": lambda: torch.ones(size).sum(), "broken": broken},
                                backward=lambda out: None, reps=3)
    op = benchmark.OpBench(("n",), {"cpu": []}, [], problems)
    monkeypatch.setitem(benchmark.OPS, "toy", op)
    assert benchmark.main(["--op", "toy", "--sizes", "1", "2", "3", "--quick", "--out", str(tmp_path)]) == 1
    result = json.loads((tmp_path / "toy-cpu-quick.json").read_text())
    assert result["complete"] is True
    assert [(row["case"], row["provider"], row["error"]) for row in result["rows"]] == [
        ("n=1", "eager", None), ("n=1", "broken", "ValueError: bad shape"),
        ("n=3", "eager", None), ("n=3", "broken", "ValueError: bad shape")]
    err = capsys.readouterr().err
    assert "FAILED: toy 2 float32: MemoryError: no room for the inputs" in err
    assert "FAILED: toy n=3 broken: ValueError: bad shape" in err
    table = benchmark.harness.markdown_table([str(tmp_path / "toy-cpu-quick.json")])
    assert "| broken | failed: ValueError: bad shape |" in table


def test_a_run_cut_short_keeps_the_cases_it_measured(tmp_path, monkeypatch):
    def problems(size, dtype, device, quick):
        if size == (2,):
            raise KeyboardInterrupt  # Ctrl-C, or a timeout's signal, during the second case
        yield benchmark.Problem(f"n={size[0]}", {"eager": lambda: torch.ones(size).sum()}, lambda out: None, reps=3)
    monkeypatch.setitem(benchmark.OPS, "toy", benchmark.OpBench(("n",), {"cpu": []}, [], problems))
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(["--op", "toy", "--sizes", "1", "2", "--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "toy-cpu-quick.json").read_text())
    assert result["complete"] is False and [row["case"] for row in result["rows"]] == ["n=1"]
    assert not list(tmp_path.glob("*.part"))


def test_results_that_cannot_be_saved_end_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    """A full disk at the second case's save: the run stops there (the save's OSError had counted as a failure
    of the case, the case's other problems went unmeasured, the last save ended in a traceback), prints what it
    measured and why it stopped, exits 1 and leaves the first save's file whole, no scratch file."""
    def problems(size, dtype, device, quick):
        yield benchmark.Problem(f"n={size[0]}", {"eager": lambda: torch.ones(size).sum()}, lambda out: None, reps=3)
    monkeypatch.setitem(benchmark.OPS, "toy", benchmark.OpBench(("n",), {"cpu": []}, [], problems))
    dump = benchmark.harness.json.dump

    def full_disk_at_the_second_save(result, out, **kwargs):
        if len(result["rows"]) > 1:
            raise OSError(28, "No space left on device")
        dump(result, out, **kwargs)
    monkeypatch.setattr(benchmark.harness.json, "dump", full_disk_at_the_second_save)
    assert benchmark.main(["--op", "toy", "--sizes", "1", "2", "3", "--quick", "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert re.search(r"^n=2 +eager", out, re.MULTILINE) and "n=3" not in out
    assert f"fastlm bench: error: cannot save the results as {tmp_path}/toy-cpu-quick.*: [Errno 28]" in err
    result = json.loads((tmp_path / "toy-cpu-quick.json").read_text())
    assert result["complete"] is False and [row["case"] for row in result["rows"]] == ["n=1"]
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("load", [0.5, 1.5, 8.0])
def test_a_busy_machine_is_said_and_recorded(tmp_path, monkeypatch, capsys, load):
    """Other work on the machine (load average above one per core) made eager's calls 400x slower in one
    run, and nothing said so: the run warns, and the results keep the load."""
    def problems(size, dtype, device, quick):
        yield benchmark.Problem(f"n={size[0]}", {"eager": lambda: torch.ones(size).sum()}, lambda out: None, reps=3)
    monkeypatch.setitem(benchmark.OPS, "toy", benchmark.OpBench(("n",), {"cpu": []}, [], problems))
    monkeypatch.setattr(benchmark.harness.os, "getloadavg", lambda: (load * 2, 0.0, 0.0))
    monkeypatch.setattr(benchmark.harness.os, "cpu_count", lambda: 2)
    assert benchmark.main(["--op", "toy", "--sizes", "1", "--quick", "--out", str(tmp_path)]) == 0
    assert (f"this machine is busy (load average {load:.1f} per core)" in capsys.readouterr().err) == (load > 1)
    result = json.loads((tmp_path / "toy-cpu-quick.json").read_text())
    assert result["environment"]["load_per_core"] == result["load_per_core_at_start"] == load
    heading = benchmark.harness.markdown_table([str(tmp_path / "toy-cpu-quick.json")]).splitlines()[0]
    assert (f"a busy machine (load {load:.1f} per core at the start)" in heading) == (load > 1), heading


def test_softcap_runs_every_provider_on_the_capped_loss(tmp_path):
    """--softcap K: the cross-entropy ops' cases name it, every provider computes the loss of K * tanh(x / K), and
    the files are the run's own (named for K, apart from the uncapped run's)."""
    assert benchmark.main(["--quick", "--op", "linear_cross_entropy", "--softcap", "30", "--sizes", "64x16x100",
                           "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "linear_cross_entropy-cpu-softcap30-quick.json").read_text())["rows"]
    assert {row["case"] for row in rows} == {"N=64 H=16 V=100 float32 softcap=30"}
    assert {"fastlm-cpp", "eager", "torch.compile"} <= {row["provider"] for row in rows}
    x, target = torch.randn(8, 5) * 40, torch.randint(0, 5, (8,))
    problem = next(benchmark.cross_entropy_problems((8, 5), torch.float32, "cpu", True, softcap=3.0))
    expected = torch.nn.functional.cross_entropy(3.0 * torch.tanh(x / 3.0), target)
    for name, forward in problem.forwards.items():
        loss = forward.func(x, target, **forward.keywords)  # the provider on these logits
        torch.testing.assert_close(loss, expected, msg=name)
    for argv in (["--op", "batch_norm", "--softcap", "30"], ["--op", "cross_entropy", "--softcap", "0"],
                 ["--op", "cross_entropy", "--softcap", "inf"]):
        with pytest.raises(SystemExit) as exit:
            benchmark.main(argv + ["--out", str(tmp_path / "refused")])
        assert exit.value.code == 2, argv


def test_gpu_session_script_refuses_to_measure_an_unnamed_commit(tmp_path):
    """bench/gpu_session.sh, which runs only on a lent GPU, parses, and its bench stage stops before any device
    time is spent when FASTLM_GIT_COMMIT is unset (its results would say "commit unknown")."""
    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "FASTLM_GIT_COMMIT"}
    result = subprocess.run(["bash", str(script), "bench"], capture_output=True, text=True, cwd=tmp_path,
                            env={**env, "OUT": str(tmp_path / "out")}, timeout=60)
    assert result.returncode == 2 and "FASTLM_GIT_COMMIT" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cases_count_their_bytes_and_name_what_fastlm_ran():
    """GB/s counts the fewest bytes a mode moves (cross-entropy: the logits read, then also their gradient
    written; BatchNorm: x read and y written, dy and x read and dx written); cross-entropy's rows say how many
    logits-sized buffers their peak held, embedding + linear's fastlm rows which strategy ran."""
    from fastlm.ops.embedding_linear import choose_strategy

    logits = 8 * 5 * 4
    ce = next(benchmark.cross_entropy_problems((8, 5), torch.float32, "cpu", True))
    assert ce.min_bytes == {"fwd": logits, "full": 2 * logits}
    row = benchmark.harness.Row("cross_entropy", ce.case, "full", "fastlm-cpp", 1.0, (1.0, 1.0), 1,
                                peak_extra_mb=2 * logits / 2**20)
    ce.annotate(row)
    assert row.extra == {"peak_in_NxC_buffers": 2.0}
    bn = next(benchmark.batch_norm_problems((8, 5), torch.float32, "cpu", True))
    assert bn.min_bytes == {"fwd": 2 * logits, "bwd": 3 * logits, "full": 5 * logits}
    size = (6, 3, 4, 5, 27)
    el = next(benchmark.embedding_linear_problems(size, torch.float32, "cpu", True))
    rows = [benchmark.harness.Row("embedding_linear", el.case, "full", provider, 1.0, (1.0, 1.0), 1)
            for provider in ("fastlm-cpp", "eager")]
    for row in rows:
        el.annotate(row)
    assert [row.extra for row in rows] == [{"strategy": choose_strategy(6, 27, 4, 3, 5)}, {}]


def test_the_fused_head_written_as_torch_code_is_timed_where_convert_fuses_it():
    plain = next(benchmark.linear_cross_entropy_problems((8, 4, 5), torch.float32, "cpu", True))
    capped = next(benchmark.linear_cross_entropy_problems((8, 4, 5), torch.float32, "cpu", True, softcap=3.0))
    assert "fastlm.convert" in plain.forwards and "fastlm.convert" not in capped.forwards


def test_dtypes_named_replace_each_default_size_s_own_once():
    """On a GPU, BatchNorm's default cases hold 65536 x 1024 in fp32 and in bf16: --dtype float16 times it once."""
    import argparse

    args = argparse.Namespace(sizes=[], quick=False, device="cuda", dtype=["float16"])
    assert benchmark.cases(benchmark.OPS["batch_norm"], args) == [((65536, 1024), torch.float16),
                                                                  ((32, 200), torch.float16)]
