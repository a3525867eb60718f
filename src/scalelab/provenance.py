"""provenance.json: what a run was made of, split into what must match on a rerun and what may not.

Rank 0 writes ``RUN_DIR/provenance.json`` at the start of every training (the hook
is in ``scalelab.train.cli``), before the first step. The manifest has two parts:

* ``must_match``: what decides the numbers: code and library versions, the hash of
  the environment lock, the image digest, the config and dataset hashes, seeds,
  deterministic mode, world size and layout, launcher. ``scalelab reproduce``
  refuses when any of these differ from the rerun's (unless ``--force``).
* ``incidental``: what describes this one execution: git state, job id, hosts,
  times, hardware, launcher command line and an allow-listed environment.

Environment variables are copied by an allow-list only (:data:`scalelab.redact.ENV_PREFIXES`,
:data:`~scalelab.redact.ENV_NAMES`), and even an allowed name that looks like a credential is
dropped: no token, password or key ever reaches a run directory. Arguments of
ancestor launcher command lines of the form ``NAME=value`` with such a name are
redacted for the same reason.

The JSON schema is ``scalelab/schemas/provenance.schema.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scalelab import docload
from scalelab.backends import registry
from scalelab.errors import CheckFailed, UsageError
from scalelab.fsio import atomic_write_json, canonical, sha256_bytes
from scalelab.redact import allowed_env, redact_argv
from scalelab.rundir import RunDir
from scalelab.sysfacts import (
    dataset_hash,
    git_state,
    hardware,
    image_state,
    launcher_argv,
    lock_state,
    versions,
)

if TYPE_CHECKING:
    from scalelab.layout import Layout

FILE = RunDir.PROVENANCE
FORMAT = "scalelab-provenance"
VERSION = 1
SCHEMA = Path(__file__).parent / "schemas" / "provenance.schema.json"


def collect(cfg: Any, run_dir: Path, layout: Layout) -> dict[str, Any]:
    """The manifest of the run about to start in ``run_dir`` (this process = rank 0), with
    the layout the trainer detected (so run_info.json and the manifest agree)."""
    nodes = max(1, layout.world_size // max(1, layout.local_world_size))
    config = cfg.to_dict()
    environ = allowed_env()
    image = image_state(run_dir)
    lock = lock_state()
    must = {
        "versions": versions(),
        "lock_sha256": lock["sha256"] if lock else None,
        "image_sha256": image["sha256"] if image else None,
        "config_sha256": config_sha256(config),
        "data_sha256": dataset_hash(cfg)["sha256"],
        "seed": cfg.seed,
        "deterministic": bool(cfg.train.deterministic),
        "device": cfg.train.device,
        "backend": cfg.dist.backend,
        "launcher": layout.launcher,
        "world_size": layout.world_size,
        "nodes": nodes,
        "tasks_per_node": layout.local_world_size,
    }
    slurm = None
    if os.environ.get("SLURM_JOB_ID"):
        slurm = {
            "job_id": os.environ.get("SLURM_JOB_ID"),
            "nodelist": os.environ.get("SLURM_JOB_NODELIST"),
            "partition": os.environ.get("SLURM_JOB_PARTITION"),
            "ntasks": os.environ.get("SLURM_NTASKS"),
            "tasks_per_node": os.environ.get("SLURM_TASKS_PER_NODE")
            or os.environ.get("SLURM_STEP_TASKS_PER_NODE"),
            "step_id": os.environ.get("SLURM_STEP_ID"),
        }
    start = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        # each start's own world (an elastic restart may run on fewer or more nodes)
        "world_size": layout.world_size,
        "nodes": nodes,
        "restart_count": layout.restart_count,
    }
    incidental = {
        "git": git_state(),
        "lock": lock,
        "image": image,
        "data": dataset_hash(cfg),
        "hardware": hardware(),
        "slurm": slurm,
        "launcher_argv": launcher_argv(),
        "argv": redact_argv(list(sys.argv)),
        "executable": sys.executable,
        "host": socket.gethostname(),
        "started_at": start["started_at"],
        "deterministic_flags": {
            "config": bool(cfg.train.deterministic),
            "CUBLAS_WORKSPACE_CONFIG": ":4096:8"
            if cfg.train.deterministic
            else os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        },
        "env": environ,
        "starts": [start],
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        "run_dir": str(run_dir.resolve()),
        "provenance_id": provenance_id(must),
        "config": config,
        "must_match": must,
        "incidental": incidental,
    }


def config_sha256(config: dict[str, Any]) -> str:
    """sha256 of the config without where things lie (data.path, data.scratch): the data's
    own hash stands for its content, so a study moved to another machine keeps its id."""
    ident = json.loads(json.dumps(config))
    for key in ("path", "scratch"):
        ident.get("data", {}).pop(key, None)
    return sha256_bytes(canonical(ident))


def provenance_id(must: dict[str, Any]) -> str:
    """Short id of the must-match part: two runs with the same id should give the same bits."""
    return sha256_bytes(canonical(must))[:12]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of a nested dict (lists are leaves)."""
    if isinstance(obj, dict) and not obj and not prefix:
        return {}
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


#: Must-match fields that decide the numbers of the MPI backend's runs only: Horovod's
#: version and build are recorded for every run (the environment had them), but a DDP or
#: FSDP run never calls Horovod, so an environment without it still reproduces that run.
MPI_BACKEND_FIELDS = ("versions.horovod", "versions.horovod_build")


def _backend(must: dict[str, Any]) -> str | None:
    """The backend the run used (``auto`` resolved as the trainer resolves it)."""
    requested, launcher = must.get("backend"), must.get("launcher")
    if not isinstance(requested, str) or not isinstance(launcher, str):
        return None
    return registry.resolve(requested, launcher, int(must.get("world_size") or 1))


def _decides(key: str, backends: set[str | None]) -> bool:
    if any(key == f or key.startswith(f + ".") for f in MPI_BACKEND_FIELDS):
        return registry.MPI in backends or None in backends
    return True


def decides(key: str, must: dict[str, Any]) -> bool:
    """Whether must-match field ``key`` (flattened, e.g. ``versions.horovod``) decides the
    numbers of the run ``must`` describes."""
    return _decides(key, {_backend(must)})


def must_match_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per must-match field that differs: 'versions.torch: 2.13.0 (run) != 2.12.0',
    leaving out the fields that do not decide this run's backend (:data:`MPI_BACKEND_FIELDS`)."""
    a, b = flatten(recorded), flatten(current)
    backends = {_backend(recorded), _backend(current)}
    return [
        f"{k}: {a.get(k)!r} (recorded) != {b.get(k)!r} (now)"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and _decides(k, backends)
    ]


def validate(manifest: dict[str, Any], where: str = FILE) -> None:
    """Raise CheckFailed naming the first schema violation."""
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(manifest),
        key=lambda e: list(e.absolute_path),
    )
    if errors:
        e = errors[0]
        field = ".".join(map(str, e.absolute_path)) or "(top level)"
        raise CheckFailed(f"{where}: field '{field}': {e.message}")


def load(run_dir: str | Path) -> dict[str, Any]:
    """A run's manifest; UsageError naming the file when it is missing or not JSON."""
    path = RunDir(run_dir).provenance_path
    if not path.is_file():
        raise UsageError(
            f"{path}: no provenance manifest (is {run_dir} a scalelab run "
            "directory, trained with this version?)"
        )
    data = docload.load(path, fmt="json", mapping=False)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(f"{path}: not a scalelab provenance manifest")
    return data


def record_start(
    cfg: Any, run_dir: str | Path, layout: Layout, resume: bool = False
) -> dict[str, Any] | None:
    """Write RUN_DIR/provenance.json (rank 0 only; other ranks return None at once).

    The trainer calls it once its input passed (config, batch plan, data opened, run
    directory checked), with the layout it detected: nothing is checked again here, so
    every run kind gets its manifest. A resumed run keeps its first manifest and appends
    this start to ``incidental.starts``; a must-match field that changed between starts
    is listed in ``incidental.changed_on_resume`` (the numbers then mix two setups).
    """
    if not layout.is_main:
        return None
    out = Path(run_dir)
    path = RunDir(out).provenance_path
    manifest = collect(cfg, out, layout)
    old = None
    if resume and path.exists():
        with contextlib.suppress(OSError, ValueError):
            old = json.loads(path.read_text())
    if (
        isinstance(old, dict)
        and old.get("format") == FORMAT
        and (
            old.get("must_match", {}).get("config_sha256")
            == manifest["must_match"]["config_sha256"]
        )
    ):
        changed = must_match_differences(old["must_match"], manifest["must_match"])
        inc = old.setdefault("incidental", {})
        inc.setdefault("starts", []).extend(manifest["incidental"]["starts"])
        if changed:
            inc.setdefault("changed_on_resume", []).extend(changed)
        manifest = old
    atomic_write_json(path, manifest)
    return manifest
