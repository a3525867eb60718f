"""Typed building blocks of every config section (pydantic v2): strict, documented, bounded.

The lowest layer of the configuration: the trainer's run config and the backends'
``dist`` section both build on :class:`Section`, so neither imports the other.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Physical bounds: a value past them is a typo (or hostile), and it would fail in the job
# with an overflow or a traceback (timedelta(seconds=1e100), lr 1e308) instead of at plan
# time. They are field constraints, so the JSON schema the workflow embeds carries them.
#: Counts: samples, steps, epochs, classes, batch sizes.
MAX_COUNT = 10**9
#: Plain quantities without a unit of their own (weight decay, clipping, epochs).
MAX_FLOAT = 1e6
#: Seconds a wait may last (a collective waiting a week is a dead job).
MAX_SECONDS = 7 * 24 * 3600
#: Learning rates (no optimizer here trains above 10).
MAX_LR = 10
#: Buffer sizes in MB (64 GiB).
MAX_MB = 65536
#: Seeds: numpy's range.
MAX_SEED = 2**32 - 1

#: A float that must be finite (YAML .nan/.inf are refused with the field's name).
Finite = Annotated[float, Field(allow_inf_nan=False)]
PosFloat = Annotated[float, Field(gt=0, le=MAX_FLOAT, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, le=MAX_FLOAT, allow_inf_nan=False)]
PosInt = Annotated[int, Field(ge=1, le=MAX_COUNT)]
NonNegInt = Annotated[int, Field(ge=0, le=MAX_COUNT)]
LearningRate = Annotated[float, Field(gt=0, le=MAX_LR, allow_inf_nan=False)]
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)]
Megabytes = Annotated[float, Field(gt=0, le=MAX_MB, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
#: A split is a directory of the staged data: a plain name, never a path.
SPLIT_NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
SplitName = Annotated[str, Field(pattern=SPLIT_NAME_PATTERN, min_length=1)]


class Section(BaseModel):
    """Base of every config section: strict types, unknown keys refused, docs from docstrings."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        use_attribute_docstrings=True,
        validate_assignment=True,
        allow_inf_nan=False,
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON ready)."""
        return self.model_dump(mode="python")


# --------------------------------------------------------------------------- errors
# The one error formatter of every pydantic config (the run config, the study config, the
# container section): a field path and a one-line reason, a "did you mean" for unknown keys.


def did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def section_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The section model under ``root`` that holds the field at ``loc`` (None: not a
    section)."""
    cls: Any = root
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls


def dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def error_parts(err: dict, root: type[BaseModel]) -> tuple[str, str]:
    """(field path, one-line reason) of one pydantic error of a ``root`` model."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        owner = section_at(root, loc[:-1])
        names = list(owner.model_fields) if owner else []
        return dotted(loc), (
            f"unknown key{did_you_mean(loc[-1], names)}; valid: {', '.join(names)}"
        )
    if kind == "missing":
        return dotted(loc), "required, missing"
    if kind == "value_error":
        text = str(ctx.get("error", err["msg"]))
        if text.startswith("@"):
            name, _, text = text[1:].partition(":")
            loc = (*loc, name)
        return dotted(loc), text
    value = err.get("input")
    if kind == "finite_number":
        return dotted(loc), f"must be a finite number, got {value}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {
            "greater_than": ">",
            "greater_than_equal": ">=",
            "less_than": "<",
            "less_than_equal": "<=",
        }[kind]
        bound = next(iter(ctx.values()), "?")
        return dotted(loc), f"must be {op} {bound}, got {show(value)}"
    if kind == "string_pattern_mismatch":
        pattern = ctx.get("pattern", "")
        if pattern == SPLIT_NAME_PATTERN:
            return dotted(loc), (
                f"{show(value)} is not a plain name (letters, digits and . _ - only)"
            )
        return dotted(loc), f"{show(value)} does not match {pattern}"
    if kind in ("too_short", "too_long"):
        return dotted(
            loc
        ), f"expected {ctx.get('min_length', ctx.get('max_length'))} items, got {show(value)}"
    if kind == "literal_error":
        return dotted(loc), f"expected one of {ctx.get('expected')}, got {show(value)}"
    if kind == "model_type" or kind == "dict_type":
        return dotted(loc), f"expected a mapping, got {show(value)}"
    if kind == "float_type" and isinstance(value, str):
        hint = ""
        try:
            float(value)
            hint = " (YAML reads 1e-3 as text: write 1.0e-3)"
        except ValueError:
            pass
        return dotted(loc), f"expected a number, got {show(value)}{hint}"
    names = {
        "int_type": "an integer",
        "float_type": "a number",
        "bool_type": "true or false",
        "string_type": "a string",
        "list_type": "a list",
    }
    if kind in names:
        return dotted(loc), f"expected {names[kind]}, got {show(value)}"
    return dotted(loc), f"{err['msg']}, got {show(value)}"


def first_error(exc: ValidationError, root: type[BaseModel]) -> tuple[str, str]:
    """(field path, reason) of the error of ``exc`` to report: unknown keys first (a typo
    explains the other errors of its section)."""
    errors = exc.errors(include_url=False)
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")
    return error_parts(errors[0], root)


def format_error(exc: ValidationError, root: type[BaseModel], prefix: str = "") -> str:
    """The first error of ``exc`` as ``field 'PREFIXpath': reason`` (one line)."""
    path, reason = first_error(exc, root)
    where = f"{prefix}{path}" if path else prefix.rstrip(".") or "config"
    return f"field '{where}': {reason}".replace("\n", " ")
