"""A STAND-IN for `apptainer` (and `srun`), for tests only.

It is not Apptainer: it records its argv and working directory, one JSON line
per call, to the file named by $STANDIN_LOG, and answers with canned output
($STANDIN_STDOUT, $STANDIN_STDERR, $STANDIN_RC). Tests put its directory first
on PATH to see exactly what `scalelab container ...` would run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SCRIPT = """#!{python}
# STAND-IN for {name}, written by tests/container_standin.py: NOT the real {name}.
# Records argv and cwd to $STANDIN_LOG; prints $STANDIN_STDOUT/$STANDIN_STDERR;
# exits with $STANDIN_RC.
import json, os, sys
with open(os.environ["STANDIN_LOG"], "a") as f:
    f.write(json.dumps({{"prog": "{name}", "argv": sys.argv[1:], "cwd": os.getcwd()}}) + "\\n")
sys.stdout.write(os.environ.get("STANDIN_STDOUT", ""))
sys.stderr.write(os.environ.get("STANDIN_STDERR", ""))
sys.exit(int(os.environ.get("STANDIN_RC", "0")))
"""


def make_standins(bindir: Path, names: tuple[str, ...] = ("apptainer",)) -> Path:
    """Write stand-in executables into bindir; return bindir."""
    bindir.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = bindir / name
        path.write_text(SCRIPT.format(python=sys.executable, name=name))
        path.chmod(0o755)
    return bindir


def read_log(log: Path) -> list[dict]:
    """The calls recorded by the stand-ins, in order."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def standin_env(bindir: Path, log: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose PATH holds only the stand-ins (no real apptainer can be found)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STANDIN_")}
    env["PATH"] = str(bindir)
    env["STANDIN_LOG"] = str(log)
    env.update(extra or {})
    return env
