"""One owner of sizes and durations typed on a command line (scalelab.units).

Issue 23: `parse_size` existed twice, data/cli.py reading "MB" as 10^6 and comm/bench.py as
2^20. Now one function, with the units its docstring documents, behind every size option.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from conftest import scalelab_main

from scalelab.errors import UsageError
from scalelab.units import MAX_SIZE, check_seconds, format_size, parse_size

SRC = Path(__file__).resolve().parents[1] / "src" / "scalelab"

DOCUMENTED = [
    ("4096", 4096),
    ("0", 0),
    ("1B", 1),
    ("1K", 1024),
    ("1k", 1024),
    ("1KiB", 1024),
    ("256M", 256 << 20),
    ("16M", 16 << 20),
    ("2GiB", 2 << 30),
    ("1 G", 1 << 30),
    ("1T", 1 << 40),
    ("1KB", 1000),
    ("500MB", 500 * 10**6),
    ("2GB", 2 * 10**9),
    ("1mb", 10**6),
    ("2e9", 2 * 10**9),
    ("1.5G", 3 << 29),
    ("0.5K", 512),
]


@pytest.mark.parametrize(("text", "value"), DOCUMENTED)
def test_documented_units(text, value):
    assert parse_size(text, "--x", minimum=0) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "nan",
        "inf",
        "-1K",
        "-0",
        "12Q",
        "1e400",
        "K",
        "1..2M",
        "0x10",
        "1,5G",
        "\udcff",
        "$(touch x)",
        "9" * 30,
        "2E",
        "1 2",
    ],
)
def test_refused_in_one_line_naming_the_option(text):
    with pytest.raises(UsageError, match="^--max-bytes: ") as err:
        parse_size(text, "--max-bytes")
    assert "\n" not in str(err.value)


def test_zero_only_where_allowed():
    with pytest.raises(UsageError, match="at least 1"):
        parse_size("0", "--max-bytes")
    assert parse_size("0", "--reserve", minimum=0) == 0


def test_the_bound_is_inclusive_and_named():
    assert parse_size("1E", "--x") == MAX_SIZE
    with pytest.raises(UsageError, match="larger than 4KiB"):
        parse_size("5K", "--x", maximum=4096)


def test_format_size():
    assert [format_size(n) for n in (100, 1024, 256 << 20, 6_000_000_000)] == [
        "100B",
        "1KiB",
        "256MiB",
        "5.6GiB",
    ]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e12])
def test_check_seconds_refuses(value):
    with pytest.raises(UsageError, match="^--timeout: "):
        check_seconds(value, "--timeout")


def test_check_seconds_allows():
    assert check_seconds(300.0, "--timeout") == 300.0
    assert check_seconds(0.0, "--wait", allow_zero=True) == 0.0


def test_one_parse_size_in_the_source_tree():
    """One owner: no other module defines a size parser of its own."""
    owners = [
        p.relative_to(SRC).as_posix()
        for p in SRC.rglob("*.py")
        if re.search(r"^def (parse_size|_parse_size|parse_bytes)\b", p.read_text(), re.MULTILINE)
    ]
    assert owners == ["units.py"]


def test_both_clis_read_mb_as_decimal(tmp_path):
    """commbench read "1MB" as 2^20 (equal to 1M); now it is 10^6, as `data localize`
    reads it, so --min-bytes 1M --max-bytes 1MB is an empty range (refused before any
    benchmark starts)."""
    rc, _, err = scalelab_main(
        "commbench",
        "--lib",
        "torch",
        "--min-bytes",
        "1M",
        "--max-bytes",
        "1MB",
        "--out",
        tmp_path / "cb",
    )
    assert rc == 2 and "--min-bytes 1048576 is larger than --max-bytes 1000000" in err
    rc, _, err = scalelab_main("data", "localize", tmp_path / "none", "--reserve", "1XB")
    assert rc == 2 and "--reserve: '1XB' is not a size" in err


def test_check_seconds_minimum():
    """commbench --timeout 1e-320 passed `> 0` and every collective timed out at once."""
    with pytest.raises(UsageError, match="at least 1"):
        check_seconds(1e-320, "--timeout", minimum=1.0)
    assert check_seconds(1.0, "--timeout", minimum=1.0) == 1.0
