"""Property-based tests of every CLI's argument parsing (issue 23, item 7).

For each sub-command, hypothesis draws command lines from the command's own argparse
actions: valid flags with hostile values (NaN, infinities, negative, huge, empty, non-UTF-8
paths, paths holding ``$(touch ...)``, malformed files). Whatever the command line, the
command must keep the convention:

* its exit code is one of the documented ones (0, 1, 2, 75);
* no traceback, and at most one ``scalelab CMD: error:`` line (exactly one on failure);
* no planted ``touch $TMP/PWNED-<uuid>`` ever runs;
* nothing is created outside the test's temporary directory (every path drawn lies in it,
  the working directory is it, and the repository, the cwd and /tmp are searched for the
  run's marker afterwards).

Commands that would start real work (Slurm test cluster, image builds and pulls, commands
run in an image, the environment probe of `doctor`) are left out; `launch` always runs
with --dry-run, `reproduce` with --dry-run, `container generate` never rewrites the
committed files, `container lock` never reads the committed lock (which would query a
registry), and `data stage` draws small datasets unless a value is hostile.

Fixed seed (derandomized), bounded budget (:data:`CASES_TOTAL` command lines, about half a
minute on two cores). The count is printed and recorded for docs/reliability.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, scalelab_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import record

from scalelab import cli

MARK = f"hx{uuid.uuid4().hex[:10]}"
EXIT_CODES = {0, 1, 2, 75}
ERROR_LINE = re.compile(r"^scalelab[\w .-]*: error: ")

#: Sub-commands drawn, with the examples each gets (the budget), and flags always added.
COMMANDS: dict[tuple[str, ...], tuple[int, list[str]]] = {
    ("data", "stage"): (90, ["--quiet"]),
    ("data", "verify"): (37, []),
    ("data", "localize"): (45, []),
    ("stage",): (30, ["--quiet"]),
    ("train",): (60, []),
    ("launch",): (90, ["--dry-run"]),
    ("evaluate",): (37, []),
    ("analyze",): (45, []),
    ("commbench",): (75, []),
    ("predict",): (60, []),
    ("container", "generate"): (37, []),
    ("container", "lint"): (22, []),
    ("container", "lock"): (30, []),
    ("container", "verify"): (22, []),
    ("container", "inspect"): (15, []),
    ("reproduce",): (37, ["--dry-run"]),
    ("runs",): (22, []),
    ("diff",): (22, []),
    ("export",): (30, []),
    ("import",): (30, []),
}
CASES_TOTAL = sum(n for n, _ in COMMANDS.values())
#: Left out, and why (see the module docstring).
LEFT_OUT = {
    "doctor": "probes the whole environment (mpirun, srun, apptainer)",
    "testcluster": "starts and stops the Slurm test cluster as root",
    "container build": "builds an image",
    "container pull": "pulls an image",
    "container push": "pushes an image to a registry",
    "container sign": "rewrites an image with a signature",
    "container exec": "runs a command in an image",
}

INTS = [
    "0",
    "1",
    "2",
    "-1",
    "16",
    "2147483648",
    "99999999999999999999",
    "-99999999999999999999",
    "1e12",
    "nan",
    "",
    "0x10",
]
FLOATS = ["nan", "inf", "-inf", "-1", "0", "1e-320", "1e308", "1e12", "0.5", "", "x", "30"]
SIZES = ["0", "1K", "4K", "1MB", "1E", "2E", "-1K", "nan", "inf", "1e400", "", "12Q"]


def _files(root: Path) -> dict[str, Path]:
    """Hostile inputs on disk, all under ``root``."""
    files = {
        "empty": b"",
        "garbage": bytes(range(256)) * 4,
        "latin1.yaml": b"seed: caf\xe9\n",
        "list.yaml": b"[1, 2]\n",
        "scalar.yaml": b"just text\n",
        "null.json": b"null\n",
        "obj.json": b'{"a": 1}\n',
        "bad.csv": b"ranks,throughput\n1,\xff\n",
        "zip.npz": b"PK\x03\x04broken",
        "dup.yaml": b"a: 1\na: 2\n",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "adir").mkdir(exist_ok=True)
    (root / "adir" / "manifest.json").write_text("{}")
    (root / "emptydir").mkdir(exist_ok=True)
    return {name: root / name for name in [*files, "adir", "emptydir"]}


def _paths(root: Path, pwned: Path) -> list[str]:
    """Path values: hostile files, new names (with the run's marker), injections."""
    hostile = [str(p) for p in _files(root).values()]
    return hostile + [
        str(root / f"new-{MARK}"),
        f"rel-{MARK}",
        str(root / f"new-{MARK}" / "deep" / "x"),
        str(root / f"$(touch {pwned})"),
        f"$(touch {pwned})",
        f"`touch {pwned}`",
        str(root / f"x;touch {pwned};"),
        str(root / f"x'$(touch {pwned})'"),
        str(root / f"bad-\udcff\udcfe-{MARK}"),
        str(root / ("a" * 300)),
        "a" * 5000,
        "/proc/scalelab-nowhere/x",
        "",
        "-",
        ".",
    ]


def _texts(pwned: Path) -> list[str]:
    return [
        "",
        " ",
        "nan",
        "-1",
        "0",
        "1e12",
        "x",
        "none",
        f"$(touch {pwned})",
        f"; touch {pwned}",
        "\udcff",
        "A" * 2000,
        "a,b,,c",
        "1,x,0",
        "0.5,0.5,0",
    ]


def _specs(pwned: Path) -> list[str]:
    """--spec values: malformed JSON and points that cannot run."""
    point = {
        "backend": "ddp",
        "mode": "strong",
        "nodes": 1,
        "tasks_per_node": 1,
        "gpus_per_task": 0,
        "repeat": 0,
    }
    gen = {"data": {"source": "tokens"}}
    specs = [
        "",
        "{}",
        "[]",
        "null",
        "nan",
        '{"point": 1}',
        "{" * 5000,
        json.dumps({"point": point, "run_config": gen, "launch": {}}),
    ]
    for field, value in (
        ("nodes", -1),
        ("nodes", 10**6),
        ("tasks_per_node", 0),
        ("tasks_per_node", 2.0),
        ("gpus_per_task", "1"),
        ("backend", f"$(touch {pwned})"),
        ("repeat", None),
    ):
        specs.append(
            json.dumps({"point": {**point, field: value}, "run_config": gen, "launch": {}})
        )
    specs.append(
        json.dumps({"point": point, "run_config": gen, "launch": {"cpus_per_task": float("nan")}})
    )
    return specs


@st.composite
def _value(draw, action: argparse.Action, pools: dict[str, list[str]]) -> list[str]:
    """The argument list one occurrence of ``action`` takes."""
    kind = action.type if callable(action.type) else None
    name = (action.option_strings or [action.dest])[-1]
    if name == "--spec":
        pool = pools["specs"]
    elif action.choices:
        pool = [str(c) for c in action.choices] + pools["texts"]
    elif kind is int:
        pool = INTS
    elif kind is float:
        pool = FLOATS
    elif re.search(r"bytes|reserve|size$", name) and kind is None:
        pool = SIZES
    elif kind is Path or re.search(
        r"out|path|dir|config|data|file|lock|image|run|recipe|"
        r"results|study|bundle|commbench|measured|scratch|"
        r"requirements|def|compare",
        name,
    ):
        pool = pools["paths"]
    else:
        pool = pools["texts"] + pools["paths"][:6]
    count = 2 if action.nargs == 2 else 1
    if action.nargs in ("*", "?", argparse.REMAINDER):
        count = draw(st.integers(0, 2))
    return [draw(st.sampled_from(pool)) for _ in range(count)]


@st.composite
def command_lines(
    draw, path: tuple[str, ...], parser: argparse.ArgumentParser, pools: dict[str, list[str]]
) -> list[str]:
    """``path`` with a drawn subset of its parser's actions, each with drawn values."""
    actions = [
        a
        for a in parser._actions
        if not isinstance(
            a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
        )
    ]
    chosen = draw(st.lists(st.sampled_from(actions), max_size=min(6, len(actions)), unique_by=id))
    argv: list[str] = [*path]
    positional: list[str] = []
    remainder: list[str] = []
    for action in chosen:
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            argv.append(action.option_strings[0])
            continue
        values = draw(_value(action, pools))
        if not action.option_strings:
            (remainder if action.nargs == argparse.REMAINDER else positional).extend(values)
            continue
        repeats = draw(st.integers(1, 2)) if isinstance(action, argparse._AppendAction) else 1
        for _ in range(repeats):
            argv += [draw(st.sampled_from(action.option_strings)), *values]
    required = [
        a
        for a in parser._actions
        if not a.option_strings
        and a.nargs is None
        and a.dest not in ("help",)
        and not isinstance(a, argparse._SubParsersAction)
    ]
    if required and not positional and draw(st.booleans()):
        positional = [draw(st.sampled_from(pools["paths"])) for _ in required]
    return argv + positional + (["--", *remainder] if remainder else [])


def _leaf(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> argparse.ArgumentParser:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _safe(path: tuple[str, ...], argv: list[str], root: Path) -> list[str]:
    """The pins that keep a drawn command line from starting real work or touching the
    repository (see the module docstring); everything else is as drawn."""
    extra = list(COMMANDS[path][1])
    if path in (("data", "stage"), ("stage",)):
        argv = [a for a in argv if a not in ("verify", "localize")]
        if "--num-samples" not in argv:
            extra += ["--num-samples", "16"]
        if "--image-size" not in argv:
            extra += ["--image-size", "4", "4"]
    if path == ("container", "generate") and "--out" not in argv and "--recipe" not in argv:
        extra.append("--check")  # without --out it would rewrite the committed .def files
    if path == ("container", "lock") and "--lock" not in argv:
        extra += ["--lock", str(root / "scalar.yaml")]  # never the committed lock: a registry
    if path == ("commbench",):
        extra += ["--iters", "1", "--warmup", "0"] if "--iters" not in argv else []
        extra += [] if "--max-bytes" in argv else ["--max-bytes", "4K"]
        extra += [] if "--min-bytes" in argv else ["--min-bytes", "1K"]
        extra += [] if "--lib" in argv else ["--lib", "torch"]
        extra += [] if "--out" in argv else ["--out", str(root / f"cb-{MARK}")]
    cut = argv.index("--") if "--" in argv else len(argv)
    return argv[:cut] + extra + argv[cut:]


@contextlib.contextmanager
def _inside(root: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(old)


def _outside_hits(root: Path) -> list[str]:
    """Files carrying the run's marker or a planted PWNED name outside ``root``."""
    hits = []
    for where in (
        REPO,
        REPO / "containers",
        REPO / "config",
        Path("/tmp"),
        Path.home(),
        Path.cwd(),
    ):
        with contextlib.suppress(OSError):
            for entry in where.iterdir():
                if (MARK in entry.name or "PWNED" in entry.name) and root not in (
                    entry,
                    *entry.parents,
                ):
                    hits.append(str(entry))
    return hits


@pytest.fixture(scope="module")
def arena(tmp_path_factory, request):
    """The temporary root, the pools of values, and the tally printed at the end."""
    root = tmp_path_factory.mktemp("cli-properties")
    pwned = root / f"PWNED-{uuid.uuid4().hex}"
    pools = {"paths": _paths(root, pwned), "texts": _texts(pwned), "specs": _specs(pwned)}
    tally: dict[str, int] = {}
    started = time.monotonic()
    yield root, pwned, pools, tally
    seconds = time.monotonic() - started
    total = sum(tally.values())
    line = (
        f"cli properties: {total} command lines tried over {len(tally)} sub-commands in "
        f"{seconds:.1f} s (" + ", ".join(f"{k} {v}" for k, v in tally.items()) + ")"
    )
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown with or without -s
            reporter.write_line("\n" + line)
    if len(tally) == len(COMMANDS):
        record(
            "cli-properties",
            cases_tried=total,
            subcommands=len(tally),
            seconds=round(seconds, 1),
            left_out=", ".join(sorted(LEFT_OUT)),
        )


def _check(argv: list[str], rc: int, err: str, pwned: Path) -> None:
    shown = " ".join(ascii(a)[1:-1] for a in argv)
    assert "Traceback" not in err, f"{shown}\n{err}"
    assert rc in EXIT_CODES, f"{shown}: exit {rc}\n{err}"
    errors = [ln for ln in err.splitlines() if ERROR_LINE.match(ln)]
    assert len(errors) <= 1, f"{shown}\n{err}"
    if rc != 0:
        assert len(errors) == 1, f"{shown}: exit {rc} without one error line\n{err}"
    assert not pwned.exists(), f"{shown} ran a planted command"


@pytest.mark.parametrize("path", list(COMMANDS), ids=[" ".join(p) for p in COMMANDS])
def test_any_command_line_keeps_the_convention(path, arena):
    root, pwned, pools, tally = arena
    parser = _leaf(cli.build_parser(), path)
    name = " ".join(path)
    tally[name] = 0

    @settings(
        max_examples=COMMANDS[path][0],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def run(data):
        argv = _safe(path, data.draw(command_lines(path, parser, pools)), root)
        tally[name] += 1
        with _inside(root):
            rc, _, err = scalelab_main(*argv)
        _check(argv, rc, err, pwned)

    run()
    assert not pwned.exists()
    assert _outside_hits(root) == []
