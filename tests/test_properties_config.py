"""Property-based tests (hypothesis) of the config loader and the plan (issue 23).

For any document and any mutation of a valid workflow config, the invariants are:

* the outcome is a result or exactly one error line (``scalelab plan: error: ...``,
  naming the file or the field), with the documented exit code (0 or 2), never a
  traceback;
* no file outside the target is touched (the shipped config/ and .test/ directories,
  the working directory);
* no command is executed: planted ``touch $TMP/PWNED-<uuid>`` payloads never run.

The search is derandomized (a fixed seed: the same cases every run) and bounded
(``max_examples`` per property, about 40 s together on 2 cores); each property prints
how many cases it tried, and docs/reliability.md gets the counts (tests/reliability.py).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import record

from scalelab import cli, docload
from scalelab.errors import UsageError

BASE = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
TOKEN = uuid.uuid4().hex
os.environ.setdefault("TMP", tempfile.gettempdir())
MARKER = Path(os.environ["TMP"]) / f"PWNED-{TOKEN}"
PLANT = f"touch $TMP/PWNED-{TOKEN}"
PAYLOADS = [
    f"$({PLANT})",
    f"`{PLANT}`",
    f"x;{PLANT}",
    f"x\n{PLANT}",
    f"'$({PLANT})'",
    "/",
    "config",
    ".test",
    "..",
    "-rf",
    "",
    "ä",
    "\x00",
]

#: A fixed seed and a bounded budget; function-scoped fixtures are not shared per example.
PROFILE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TRIED: dict[str, int] = {}
SECONDS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    """Print each property's case count and time, and record them for the docs."""
    yield
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        for name, n in TRIED.items():
            print(f"\nhypothesis: {name}: {n} cases in {SECONDS.get(name, 0):.1f} s", flush=True)
    if TRIED and not request.config.option.keyword:
        record(
            "property-based-config",
            **{f"cases_{k}": v for k, v in TRIED.items()},
            seconds=round(sum(SECONDS.values()), 1),
            seed="derandomize=True",
            planted_commands_executed=int(MARKER.exists()),
        )


def _count(name: str, started: float) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1
    SECONDS[name] = SECONDS.get(name, 0.0) + time.monotonic() - started


def _shipped_state() -> list[tuple[str, int, float]]:
    """The study's shipped config directories, as files, sizes and times."""
    out = []
    for top in ("config", ".test"):
        for p in sorted((REPO / top).rglob("*")):
            if p.is_file():
                st_ = p.stat()
                out.append((str(p), st_.st_size, st_.st_mtime))
    return out


SHIPPED = _shipped_state()


def _one_error_line(message: str, prefix: str) -> None:
    assert "\n" not in message and message.startswith(prefix), message
    assert "Traceback" not in message


# ----------------------------------------------------------------------------- loader

_KEYS = st.sampled_from(["results", "lr", "a", "b", "__use_yte__", "<<", "sweep", "1", "-"])
_SCALARS = st.sampled_from(
    [
        "1",
        "1.0",
        "1e308",
        ".nan",
        "null",
        "~",
        "true",
        "'x'",
        '"y"',
        "*a",
        "&a x",
        "&a [1, 2]",
        "[*a, *a]",
        "{x: 1}",
        "!!binary AA==",
        "|\n  text",
        "- 1",
        ": :",
        "\t",
        "\ufeff",
        "café",
    ]
)


@st.composite
def yaml_documents(draw) -> bytes:
    """Documents of YAML's building blocks (keys, anchors, aliases, flow collections),
    some re-encoded (UTF-16, Latin-1) or cut off, plus arbitrary bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    lines = draw(st.lists(st.tuples(st.integers(0, 2), _KEYS, _SCALARS), max_size=12))
    text = "".join(f"{'  ' * depth}{key}: {value}\n" for depth, key, value in lines)
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["utf-16", "latin-1", "cut"]))
    if encoding == "cut":
        data = text.encode()
        return data[: draw(st.integers(0, len(data)))]
    return text.encode(encoding, errors="replace")


@settings(PROFILE, max_examples=2000)
@given(data=yaml_documents(), fmt=st.sampled_from(["yaml", "json"]))
def test_loader_gives_a_mapping_or_one_line(data, fmt):
    started = time.monotonic()
    try:
        doc = docload.loads(data, "doc.yaml", fmt=fmt)
        assert isinstance(doc, dict)
    except UsageError as exc:
        _one_error_line(str(exc), "doc.yaml")
    _count("loader", started)


# ----------------------------------------------------------------------------- plan


#: Where a mutation lands: every leaf and section of the test config, and keys it lacks.
def _paths(node, prefix=()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    return out


PATHS = _paths(BASE) + [
    ("container", "image"),
    ("data", "path"),
    ("data", "scratch"),
    ("resources", "slurm_extra"),
    ("launch", "extra_srun_args"),
    ("cluster", "cpus_per_node"),
    ("sweep", "tp"),
    ("train", "model", "name"),
]
_NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2, -1, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1.0, 2.0, 0.5, 1e308, 1e100, -0.0]),
)
_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        _NUMBERS,
        st.sampled_from(PAYLOADS),
        st.text(max_size=12),
        st.sampled_from(["gpt", "cnn", "tokens", "ddp", "fsdp"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["lr", "name", "x", "results"]), inner, max_size=3),
    ),
    max_leaves=8,
)


@st.composite
def mutated_configs(draw) -> dict:
    cfg = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        node = cfg
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = draw(_VALUES)
    return cfg


def _plan(path: Path, cwd: Path) -> tuple[int, str, str]:
    """`scalelab plan PATH` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["plan", str(path)])
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()


def _check_plan(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp)
        config = study / "study.yaml"
        config.write_bytes(text)
        code, out, err = _plan(config, study)
        assert code in (0, 2), (code, err)
        if code == 2:
            assert err.count("\n") == 1, err
            _one_error_line(err.rstrip("\n"), "scalelab plan: error: ")
        else:
            assert out.startswith("sweep: ") and not err, err
        assert sorted(p.name for p in study.iterdir()) == ["study.yaml"]  # nothing else
    assert not MARKER.exists()


@settings(PROFILE, max_examples=800)
@given(cfg=mutated_configs())
def test_plan_of_a_mutated_config_is_a_plan_or_one_line(cfg):
    started = time.monotonic()
    _check_plan(yaml.safe_dump(cfg, allow_unicode=True).encode())
    _count("plan_mutated_config", started)


@st.composite
def edited_texts(draw) -> bytes:
    """The test config as text, with lines duplicated, dropped or aliased."""
    lines = (REPO / ".test" / "config.yaml").read_text().splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["dup", "drop", "alias", "anchor", "payload"]))
        if action == "dup":
            lines.insert(i, lines[i])
        elif action == "drop":
            del lines[i]
        elif action == "alias" and ":" in lines[i]:
            lines[i] = lines[i].split(":", 1)[0] + ": *a\n"
        elif action == "anchor" and ":" in lines[i]:
            key, value = lines[i].split(":", 1)
            lines[i] = f"{key}: &a {value.strip() or '[]'}\n"
        elif ":" in lines[i]:
            lines[i] = lines[i].split(":", 1)[0] + f": {draw(st.sampled_from(PAYLOADS))!r}\n"
    return "".join(lines).encode()


@settings(PROFILE, max_examples=600)
@given(text=edited_texts())
def test_plan_of_an_edited_config_file_is_a_plan_or_one_line(text):
    started = time.monotonic()
    _check_plan(text)
    _count("plan_edited_file", started)


@settings(PROFILE, max_examples=16)
@given(cfg=mutated_configs())
def test_plan_command_exit_code_and_one_line(cfg):
    """The same through the real command (a fresh interpreter): exit 0 or 2, one line."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "study.yaml"
        config.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        proc = subprocess.run(
            [sys.executable, "-m", "scalelab", "plan", str(config)],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode in (0, 2), proc.stderr
        if proc.returncode == 2:
            assert len(proc.stderr.splitlines()) == 1, proc.stderr
            _one_error_line(proc.stderr.rstrip("\n"), "scalelab plan: error: ")
    assert not MARKER.exists()
    _count("plan_command", started)


def test_nothing_shipped_was_touched_and_nothing_ran():
    """After the properties above: the shipped configs are as they were, no payload ran."""
    assert _shipped_state() == SHIPPED
    assert not MARKER.exists()
