"""The README's example runs and learns XOR; its test command is the one CI runs."""

import contextlib
import io
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_example_learns_xor():
    code = re.search(r"## Example\n\n```python\n(.*?)```", README, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    loss, *_ = out.getvalue().split()
    assert float(loss) < 0.01
    assert "[0. 1. 1. 0.]" in out.getvalue()


def test_ci_runs_the_readme_test_command():
    command = re.search(r"# 2\. install and run the tests\n(.*)\n", README).group(1)
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
