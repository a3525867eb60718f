"""Hardware profiles: the declared machines the layout advisor predicts for.

The profiles live in ``hardware_profiles.yaml`` beside this module (package data), one per
machine kind: the device (whose dense bf16 peak is :mod:`scalelab.train.peak`'s table,
the one owner of peaks, unless the profile measured its own), the share of that peak the
model's GEMMs reach, memory per device, devices per node, and the intra- and inter-node
links (bandwidth one way and latency per ring step). Every figure carries its source;
:func:`load` validates the file (pydantic, strict) so a figure without one is refused.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, model_validator

from scalelab.config_types import Section, format_error
from scalelab.docload import load as load_document
from scalelab.errors import UsageError
from scalelab.train.peak import peak_bf16

#: The shipped profiles (package data).
PROFILES_FILE = Path(__file__).with_name("hardware_profiles.yaml")
#: Bytes per element of activations and gradients, and bytes of model and optimizer state
#: per parameter, by training precision. bf16: mixed-precision Adam as in the ZeRO paper
#: (Rajbhandari et al. 2020, section 3.1: 2 + 2 bytes of 16-bit weights and gradients, 12
#: of fp32 master weights, momentum and variance); fp32: 4 + 4 + 8 (Adam's two moments).
PRECISIONS: dict[str, dict[str, int]] = {
    "bf16": {"act_bytes": 2, "grad_bytes": 2, "weight_bytes": 2, "optimizer_bytes": 12},
    "fp32": {"act_bytes": 4, "grad_bytes": 4, "weight_bytes": 4, "optimizer_bytes": 8},
}

Source = Annotated[str, Field(min_length=8)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class Figure(Section):
    """A number and where it comes from (a datasheet, a paper, a measurement or an
    assumption said as one)."""

    value: Positive
    """The figure, in the unit its field names."""
    source: Source
    """Where it comes from."""


class Count(Section):
    """A whole number and where it comes from."""

    value: Annotated[int, Field(ge=1, le=4096)]
    """The count."""
    source: Source
    """Where it comes from."""


class Fraction(Section):
    """A share in (0, 1] and where it comes from."""

    value: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    """The share."""
    source: Source
    """Where it comes from."""


class Link(Section):
    """One kind of link: bandwidth in one direction and latency per ring step."""

    bandwidth_Bps: Figure
    """Bytes/s one way: per device within a node; per node (all NICs) between nodes."""
    latency_s: Figure
    """Seconds per ring step (the alpha of the alpha-beta model)."""


class Profile(Section):
    """One machine kind."""

    description: str
    """What the machine is, in words."""
    device: str
    """The device's name as torch reports it; it finds the peak in train/peak.py's table."""
    precision: Literal["bf16", "fp32"]
    """How models train on it: bf16 mixed precision (GPUs) or fp32 (the CPU)."""
    peak_flops: Figure | None = None
    """Only for a device outside the peak table: its measured peak FLOP/s."""
    achievable_fraction: Fraction
    """Share of the peak the model's matrix products reach."""
    memory_bytes: Figure
    """Memory per device in bytes."""
    devices_per_node: Count
    """Devices (ranks) per node."""
    intra_node: Link
    """The link between devices of one node."""
    inter_node: Link
    """The link between nodes."""

    @model_validator(mode="after")
    def _has_a_peak(self) -> Profile:
        if self.peak_flops is None and peak_bf16(self.device) is None:
            raise ValueError(
                f"@peak_flops:device {self.device!r} is not in train/peak.py's table; "
                "give a measured peak_flops with its source"
            )
        return self

    def peak(self) -> tuple[float, str]:
        """(peak FLOP/s, its source): the measured one, else the peak table's."""
        if self.peak_flops is not None:
            return self.peak_flops.value, self.peak_flops.source
        found = peak_bf16(self.device)
        assert found is not None  # _has_a_peak
        return found

    def achievable_flops(self) -> float:
        """FLOP/s the model's compute is predicted to run at."""
        return self.peak()[0] * self.achievable_fraction.value

    def bytes_of(self, what: str) -> int:
        """Bytes per element or parameter of ``what`` at this profile's precision."""
        return PRECISIONS[self.precision][what]


class Profiles(Section):
    """The profiles file."""

    profiles: dict[str, Profile]
    """Profile name -> profile."""


def load(path: str | Path = PROFILES_FILE) -> Profiles:
    """The profiles in ``path`` (default: the shipped file), validated; a bad file is one
    UsageError line naming it and the field."""
    doc = load_document(path, str(path))
    try:
        return Profiles.model_validate(doc)
    except ValidationError as exc:
        raise UsageError(f"{path}: {format_error(exc, Profiles)}") from None


@cache
def shipped() -> Profiles:
    """The shipped profiles, read once."""
    return load()


def profile(name: str) -> Profile:
    """The shipped profile ``name``; an unknown name is one UsageError line."""
    found = shipped().profiles
    if name not in found:
        raise UsageError(f"--hardware: unknown profile {name!r}; valid: {', '.join(found)}")
    return found[name]
