"""Typed building blocks of every config section (pydantic v2): strict, documented, bounded.

The lowest layer of the configuration: the trainer's run config and the backends'
``dist`` section both build on :class:`Section`, so neither imports the other.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

#: A float that must be finite (YAML .nan/.inf are refused with the field's name).
Finite = Annotated[float, Field(allow_inf_nan=False)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
#: A split is a directory of the staged data: a plain name, never a path.
SplitName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1)]


class Section(BaseModel):
    """Base of every config section: strict types, unknown keys refused, docs from docstrings."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True,
                              validate_assignment=True, allow_inf_nan=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON ready)."""
        return self.model_dump(mode="python")
