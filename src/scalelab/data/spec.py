"""``DataSpec``: what a model must fit, taken from the data it trains on.

The trainer reads it from the opened training split and records it in the run
directory (``run_info.json``, field ``data_spec``), so that ``predict`` and
``evaluate`` build the model the run trained, not one guessed from config
defaults: a staged dataset carries its own class count and image shape, which
``config.yaml``'s ``data.num_classes`` and ``data.image_shape`` do not know.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scalelab.errors import UsageError

#: The field of run_info.json that holds the trained spec.
FIELD = "data_spec"


@dataclass(frozen=True)
class DataSpec:
    """Outputs of the model (classes; the vocabulary for tokens) and one sample's input
    shape ((C, H, W) for images, (seq_len,) for tokens)."""

    num_outputs: int
    input_shape: tuple[int, ...]

    @classmethod
    def of(cls, dataset: Any) -> DataSpec:
        """The spec of an opened split (every source exposes num_classes and image_shape)."""
        return cls(int(dataset.num_classes), tuple(int(s) for s in dataset.image_shape))

    def to_dict(self) -> dict[str, Any]:
        return {"num_outputs": self.num_outputs, "input_shape": list(self.input_shape)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> DataSpec:
        """Parse a recorded spec; UsageError naming ``where`` when it is malformed."""
        try:
            spec = cls(int(data["num_outputs"]), tuple(int(s) for s in data["input_shape"]))
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{where}: field '{FIELD}': expected num_outputs and "
                             f"input_shape, got {str(data)[:80]}") from None
        if spec.num_outputs < 1 or not spec.input_shape or min(spec.input_shape) < 1:
            raise UsageError(f"{where}: field '{FIELD}': not positive: {spec.to_dict()}")
        return spec


def generated_spec(data: Any) -> DataSpec | None:
    """The spec a generated source (tokens, synthetic) is made with, from the run config's
    ``data`` section; None for data on disk (its files carry it)."""
    if data.source == "tokens":
        return DataSpec(int(data.vocab_size), (int(data.seq_len),))
    if data.source == "synthetic":
        return DataSpec(int(data.num_classes), tuple(int(s) for s in data.image_shape))
    return None


def recorded_spec(run_dir: str | Path) -> DataSpec | None:
    """The spec the run in ``run_dir`` trained with (None: a run from before it was
    recorded, or no readable run_info.json)."""
    path = Path(run_dir) / "run_info.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    data = info.get(FIELD) if isinstance(info, dict) else None
    return None if data is None else DataSpec.from_dict(data, str(path))
