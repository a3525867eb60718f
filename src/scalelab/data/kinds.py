"""The data-source vocabulary: every name of where samples come from is written here once.

Two word lists, with two roles:

* **Stage kinds** (:data:`STAGE_KINDS`): what ``scalelab data stage --source`` reads and
  writes as sharded data. A study's ``data.source`` is one of these or a generated source
  (:data:`STUDY_SOURCES`, the workflow schema's enum).
* **Run sources** (:data:`RUN_SOURCES`): what the trainer opens, the run config's
  ``data.source`` (and the provenance schema's enum). Each has a
  :class:`~scalelab.data.registry.DataSource` in :mod:`scalelab.data.registry`.

The word ``synthetic`` is in both lists and means two things: as a stage kind, seeded class
patterns written to shards once (:class:`~scalelab.data.synthetic.ClassPatterns`); as a run
source, seeded images every rank computes on the fly and never stores
(:class:`~scalelab.data.synthetic.SyntheticDataset`). :data:`STAGE_SYNTHETIC` and
:data:`RUN_SYNTHETIC` keep them apart.

The one mapping between the lists is :func:`run_source`: a study trains on what it staged
(run source ``staged``), except for a generated study source, which every rank makes itself
under the same name (nothing staged, no path).

This module imports only the errors: the config, the CLI and the workflow ask it cheaply.
"""

from __future__ import annotations

from scalelab.errors import UsageError

# ----------------------------------------------------------------------- stage kinds
#: Stage kind: seeded learnable class patterns, staged like any other data.
STAGE_SYNTHETIC = "synthetic"
#: Stage kind: scikit-learn's bundled 8x8 digits.
DIGITS = "digits"
#: Stage kind: a ROOT/CLASS/IMAGE directory of JPEG/PNG files.
IMAGEFOLDER = "imagefolder"
#: Stage kind: a user's .npz file of images and labels.
NPZ = "npz"

#: What ``scalelab data stage --source`` accepts.
STAGE_KINDS = (STAGE_SYNTHETIC, DIGITS, IMAGEFOLDER, NPZ)
#: Stage kinds read from a user's ``path``, and what that path is.
STAGE_PATHS = {IMAGEFOLDER: "directory", NPZ: "file"}
#: (images, classes) of the stage kinds whose size is known without reading anything.
KNOWN_SIZES = {DIGITS: (1797, 10)}

# ----------------------------------------------------------------------- run sources
#: Run source: seeded images computed on the fly from (seed, index), never stored.
RUN_SYNTHETIC = "synthetic"
#: Run source: one .npz file loaded into memory.
MEMORY_NPZ = "memory-npz"
#: Run source: sharded data written by ``scalelab data stage``.
STAGED = "staged"
#: Run source (and generated study source): seeded learnable token sequences (model gpt).
TOKENS = "tokens"

#: The run config's ``data.source``: what the trainer opens.
RUN_SOURCES = (RUN_SYNTHETIC, MEMORY_NPZ, STAGED, TOKENS)
#: Run sources made from the config alone (no ``data.path``; the test split is generated).
GENERATED_RUN_SOURCES = (RUN_SYNTHETIC, TOKENS)

# ----------------------------------------------------------------------- study sources
#: Study sources every rank generates itself: nothing is staged or copied, and the test
#: split is generated too.
GENERATED_STUDY_SOURCES = (TOKENS,)
#: The workflow's ``data.source``: a stage kind, or a generated source.
STUDY_SOURCES = STAGE_KINDS + GENERATED_STUDY_SOURCES


def run_source(study_source: str) -> str:
    """The run config's ``data.source`` for a study's: ``staged`` for every stage kind (the
    workflow trains on what it staged); a generated source keeps its name."""
    if study_source in GENERATED_STUDY_SOURCES:
        return study_source
    if study_source in STAGE_KINDS:
        return STAGED
    raise UsageError(
        f"field 'data.source': {study_source!r} is not one of {', '.join(STUDY_SOURCES)}"
    )
