"""Typed building blocks of every config section (pydantic v2): strict, documented, bounded.

The lowest layer of the configuration: the trainer's run config and the backends'
``dist`` section both build on :class:`Section`, so neither imports the other.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

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
SplitName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1)]


class Section(BaseModel):
    """Base of every config section: strict types, unknown keys refused, docs from docstrings."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True,
                              validate_assignment=True, allow_inf_nan=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON ready)."""
        return self.model_dump(mode="python")
