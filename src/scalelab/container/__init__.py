"""Apptainer images: generate, lint, lock, build, pull, verify, inspect and run them.

The workflow uses two functions from here (see :mod:`scalelab.container.wiring`):
:func:`container_prefix` (the argv to put before ``scalelab train ...`` in a job)
and :func:`image_provenance` (the image's sha256 and labels for a run's record).
Nothing in this package needs the apptainer binary at import time.
"""

from scalelab.container.config import ContainerConfig
from scalelab.container.wiring import container_prefix, image_provenance

__all__ = ["ContainerConfig", "container_prefix", "image_provenance"]
