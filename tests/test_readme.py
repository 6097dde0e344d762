"""README.md stays true: its API example runs as written (on the CPU, with this machine's default backends) and
fuses what it says; CI runs the README's test command."""

import pathlib
import re

import torch
from conftest import fastlm_ops_called

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_api_example_runs():
    api = README.read_text().split("## API", 1)[1]
    example = re.search(r"```python\n(.*?)```", api, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README.md (API example)", "exec"), namespace)
    assert namespace["lm"].head.weight.grad is not None  # the last line's backward reached the head
    # and, as its comments say, the converted model runs fused: its layers and its head + loss
    called = fastlm_ops_called(lambda: namespace["lm"](namespace["idx"], torch.randint(0, 5000, (32,))).backward())
    for op in ("fastlm::embedding_linear", "fastlm::batch_norm", "fastlm::linear_cross_entropy"):
        assert op in called, (op, called)


def test_ci_runs_the_readme_test_command():
    """.ci/run installs requirements.txt, builds, and runs pytest under TRITON_INTERPRET=1, as the README's test
    command does, and requirements.txt pins every package, so that CI's environment is the one tests passed in."""
    root = README.parent
    command = re.search(r"Run the tests.*?```bash\n(.*?)\n```", README.read_text(), re.S).group(1)

    def plain(line: str) -> str:  # how a step is spelled aside: python3 or python, pip or python -m pip, quiet
        line = re.sub(r"\bpython3\b", "python", line).replace("python -m pip", "pip")
        return " ".join(word for word in line.split() if word != "-q" or "pytest" in line)

    ci_lines = {plain(line) for line in (root / ".ci" / "run").read_text().splitlines()}
    for step in command.split(" && "):
        assert plain(step) in ci_lines, f"the README's test step {step!r} is not a line of .ci/run"
    requirements = [line for line in (root / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert "torch==2.13.0" in requirements
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.+]*", line) for line in requirements), requirements
