"""The code's style is the tools' verdict, not a habit: ruff's lint rules and its formatter
(pyproject.toml [tool.ruff]) over everything the project ships and tests."""

from __future__ import annotations

import subprocess

from conftest import REPO, VENV_BIN

PATHS = ["src", "tests", "tools", "benchmarks"]


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ruff"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_ruff_lint_is_clean():
    proc = ruff("check", "--no-cache", *PATHS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_ruff_format_leaves_every_file_as_it_is():
    proc = ruff("format", "--check", "--no-cache", *PATHS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_the_format_check_can_fail(tmp_path):
    """A badly formatted file is reported: the check above is not vacuous."""
    bad = tmp_path / "bad.py"
    bad.write_text("x = {  'a':1,'b' :2 }\n")
    proc = ruff("format", "--check", "--no-cache", str(bad))
    assert proc.returncode == 1 and "bad.py" in proc.stdout


#: A module longer than this holds more than one concern: split it by what changes together.
MAX_MODULE_LINES = 500


def test_every_module_is_at_most_max_module_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p in sorted((REPO / "src" / "scalelab").rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
