"""fastlm.check, the `fastlm check` command: it passes on this machine's backends, and a backend that is
wrong (off by 1e-2, or accepting out-of-range ids) registered in fastlm.check.BACKENDS makes it fail."""

import re

import pytest

from conftest import skip_unless_runs
from fastlm import check


def test_quick_check_passes_on_every_backend_here(capsys):
    assert check.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for op in check.OPS:
        assert re.search(rf"^{op}\s+cpp\s+float32 .* PASS", out, re.MULTILINE)
    assert "FAIL" not in out


@pytest.fixture
def cpp():
    skip_unless_runs("cpp")
    return check.fastlm_backend("cpp")


def test_a_backend_off_by_1e_2_fails(monkeypatch, capsys, cpp):
    def off(*args, **kwargs):
        return cpp.ops["batch_norm"](*args, **kwargs) + 1e-2

    monkeypatch.setitem(check.BACKENDS, "broken", check.Backend({**cpp.ops, "batch_norm": off}, cpp.runs_on))
    assert check.main(["--quick", "--backend", "broken", "--op", "batch_norm", "--dtype", "float32"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^batch_norm\s+broken\s+float32 .* FAIL  first failure: .*: output", out, re.MULTILINE)
    assert re.search(r"^determinism\s+broken .* PASS", out, re.MULTILINE)


def test_a_backend_accepting_bad_ids_fails(monkeypatch, capsys, cpp):
    def lenient(idx, table, *args, **kwargs):
        return cpp.ops["embedding_linear"](idx.clamp(0, table.shape[0] - 1), table, *args, **kwargs)

    monkeypatch.setitem(check.BACKENDS, "lenient",
                        check.Backend({**cpp.ops, "embedding_linear": lenient}, cpp.runs_on))
    assert check.main(["--quick", "--backend", "lenient", "--op", "embedding_linear", "--dtype", "float64"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^embedding_linear\s+lenient\s+float64 .* PASS", out, re.MULTILINE)
    assert re.search(r"^refuses bad input\s+lenient .* FAIL  first failure: embedding_linear index 5 of 5 rows: "
                     r"accepted", out, re.MULTILINE)


def test_unknown_backend_is_refused():
    with pytest.raises(SystemExit):
        check.main(["--backend", "nope"])
