"""``DataSpec``: what a model must fit, taken from the data it trains on.

The trainer reads it from the opened training split and records it in the run
directory (``run_info.json``, field ``data_spec``), so that ``predict`` and
``evaluate`` build the model the run trained, not one guessed from config
defaults: a staged dataset carries its own class count and image shape, which
``config.yaml``'s ``data.num_classes`` and ``data.image_shape`` do not know.
"""

from __future__ import annotations

from dataclasses import dataclass
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
            raise UsageError(
                f"{where}: field '{FIELD}': expected num_outputs and "
                f"input_shape, got {str(data)[:80]}"
            ) from None
        if spec.num_outputs < 1 or not spec.input_shape or min(spec.input_shape) < 1:
            raise UsageError(f"{where}: field '{FIELD}': not positive: {spec.to_dict()}")
        return spec
