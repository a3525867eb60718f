"""One process, no communication: the reference every distributed run must match."""

from __future__ import annotations

from scalelab.backends import Backend


class NoneBackend(Backend):
    """Single-process backend (all behaviour is the base class's)."""
