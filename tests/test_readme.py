"""README.md stays true: its API example runs as written (on the CPU, with this machine's default backends)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_api_example_runs():
    api = README.read_text().split("## API", 1)[1]
    example = re.search(r"```python\n(.*?)```", api, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README.md (API example)", "exec"), namespace)
    assert namespace["lm"].head.weight.grad is not None  # the last line's backward reached the fused head
