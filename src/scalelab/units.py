"""Quantities typed on a command line: byte sizes and durations, each with one parser.

Sizes (:func:`parse_size`): ``data localize --reserve``, ``commbench --min-bytes/--max-bytes``
and ``predict --grad-bytes/--min-fit-bytes/--max-fit-bytes`` all read sizes here, so one
spelling means one number everywhere. Units (case-insensitive, optional space):

* none or ``B``: bytes;
* ``K``, ``M``, ``G``, ``T``, ``P``, ``E`` and ``KiB`` .. ``EiB``: binary,
  ``1K`` = 1024 (nccl-tests' ``1K`` .. ``256M``, and the docs' ``1GiB``);
* ``KB``, ``MB``, ``GB``, ``TB``, ``PB``, ``EB``: decimal (SI), ``1MB`` = 10**6.

A number may have a fraction or an exponent (``1.5G``, ``2e9``); the result is whole bytes
(rounded down). NaN, infinities, negative numbers and anything above :data:`MAX_SIZE` are
refused in one line naming the option.

Durations (:func:`check_seconds`): a finite number of seconds, positive, at most
:data:`MAX_SECONDS`; NaN would compare false with every deadline and never fire.
"""

from __future__ import annotations

import math
import re

from scalelab.errors import UsageError

_BINARY = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
UNITS: dict[str, int] = {
    "": 1,
    "B": 1,
    **_BINARY,
    **{f"{k}IB": v for k, v in _BINARY.items()},
    **{f"{k}B": 1000 ** (i + 1) for i, k in enumerate(_BINARY)},
}
#: No size a command takes is larger (1 EiB): beyond it a typo, not a plan.
MAX_SIZE = 1 << 60

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(
    text: object, what: str = "size", *, minimum: int = 1, maximum: int = MAX_SIZE
) -> int:
    """``'1K'`` -> 1024, ``'500MB'`` -> 500000000, ``'2e9'`` -> 2000000000 bytes.

    ``what`` names the option in the error; ``minimum`` is 0 where zero means "none"
    (``--reserve 0``). Raises :class:`UsageError` (exit 2) for anything else.
    """
    m = _SIZE.fullmatch(str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in UNITS:
        raise UsageError(
            f"{what}: {text!r} is not a size like 4096, 1K, 64MiB, 2GB or 1e9 "
            "(K, M, G = 1024-based; KB, MB, GB = 1000-based)"
        )
    value = float(m.group(1)) * UNITS[unit]
    if not math.isfinite(value) or value > maximum:
        raise UsageError(f"{what}: {text!r} is larger than {format_size(maximum)}")
    if value < minimum:
        raise UsageError(f"{what}: {text!r} must be at least {minimum} byte(s)")
    return int(value)


def format_size(n: int) -> str:
    """Bytes in the largest binary unit below them: ``256MiB``, ``5.9GiB``, ``100B``."""
    for unit in ("EiB", "PiB", "TiB", "GiB", "MiB", "KiB"):
        scale = UNITS[unit.upper()]
        if n >= scale:
            return f"{n // scale}{unit}" if n % scale == 0 else f"{n / scale:.1f}{unit}"
    return f"{n}B"


#: No timeout a command takes is longer (30 days): beyond it a typo, and timedelta's range.
MAX_SECONDS = 30 * 86400.0


def check_seconds(
    value: float, what: str, *, minimum: float = 0.0, allow_zero: bool = False
) -> float:
    """``value`` if it is a usable duration in seconds (finite, > 0 unless ``allow_zero``,
    >= ``minimum``, <= :data:`MAX_SECONDS`); else a one-line :class:`UsageError`."""
    positive = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and positive and minimum <= value <= MAX_SECONDS):
        low = f"at least {minimum:g}" if minimum > 0 else ">= 0" if allow_zero else "> 0"
        raise UsageError(
            f"{what}: {value!r} must be a number of seconds {low} and at most "
            f"{MAX_SECONDS:.0f} (30 days)"
        )
    return value
