"""Why a layout cannot exist: one config field and one reason. The plan lists these for
skipped sweep points; a run that writes the point explicitly stops on the first."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """Why a layout cannot exist: the config field and the reason (one line)."""

    field: str
    reason: str

    def line(self, prefix: str = "") -> str:
        """``field 'PREFIXFIELD': REASON`` (the workflow passes ``train.``)."""
        return f"field '{prefix}{self.field}': {self.reason}"

    def __str__(self) -> str:
        return self.line()
