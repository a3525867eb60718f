"""Apptainer images: generate, lint, lock, build, sign, push, pull, verify, inspect and run them.

What the rest of scalelab calls (the workflow's ``common.smk``, ``scalelab launch``, the
trainer's run record, ``scalelab doctor``); the ``scalelab container`` command lives in
:mod:`scalelab.container.cli`:

* :func:`detect`: the apptainer or singularity on PATH (None when absent);
* :func:`workflow_image`, :data:`PIN_RECORD_KEY`, :func:`export_sdm_binds`: the image
  pinned once per workflow invocation on the submit host, and the binds of --sdm jobs;
* :func:`job_container`: a training job's ``apptainer exec ... IMAGE`` prefix and the
  image's provenance (the launcher puts the prefix inside srun or mpirun:
  :func:`scalelab.launch.commands.compose`);
* :func:`image_provenance`: the image's identity for a run's record;
* :func:`inside_image_info`: proof that this process runs in an image;
* :func:`root_lacks_capabilities`: whether `apptainer exec` needs --userns here.

Nothing in this package needs the apptainer binary at import time.
"""

from scalelab.container.config import ContainerConfig
from scalelab.container.runtime import detect, root_lacks_capabilities
from scalelab.container.wiring import (
    PIN_RECORD_KEY,
    export_sdm_binds,
    image_provenance,
    inside_image_info,
    job_container,
    workflow_image,
)

__all__ = [
    "PIN_RECORD_KEY",
    "ContainerConfig",
    "detect",
    "export_sdm_binds",
    "image_provenance",
    "inside_image_info",
    "job_container",
    "root_lacks_capabilities",
    "workflow_image",
]
