"""The run directory: the one owner of its file names, its preparation, its lock and its records.

A run directory (``scalelab train --out RUN_DIR``) holds what the launcher, the
trainer, ``evaluate`` and ``reproduce`` write about one training run. Every
module that writes or reads one goes through :class:`RunDir`: it names every
file (a test finds each name in this module only), prepares the directory for
a fresh run or a resume through the output guard (marker and writer lock),
and reads the records back (summary, run info, resolved config, metrics, the
trained data spec). The formats stay with their writers; the names live here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from scalelab import fsio, output_guard
from scalelab.data.spec import FIELD as DATA_SPEC
from scalelab.data.spec import DataSpec
from scalelab.errors import UsageError, process_rank

#: The kind of scalelab output a run directory is (output_guard's marker and guard).
KIND = "run"

#: Set by `scalelab launch` and `scalelab reproduce` for their ranks: the token of the
#: RUN_DIR lock they hold on the ranks' behalf.
LOCK_ENV = "SCALELAB_RUN_LOCK"


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; a one-line UsageError naming ``path`` otherwise."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return data


class RunDir:
    """One run directory: its files, its preparation and lock, and its records."""

    RUN_CONFIG = "run.yaml"  # the config a launcher (launch, reproduce) starts the ranks with
    SWEEP = "sweep.json"  # the sweep point and its config digest (launch)
    CONTAINER = "container.json"  # the image the ranks ran in (launch)
    CONFIG = "config.yaml"  # the resolved run config (trainer)
    RUN_INFO = "run_info.json"  # how the run started, and its data spec (trainer)
    PROVENANCE = "provenance.json"  # the provenance manifest (trainer)
    METRICS = "metrics.jsonl"  # one JSON record per line (trainer, rank 0)
    MODEL = "model.pt"  # the final weights (trainer)
    SUMMARY = "summary.json"  # the run's figures; its presence marks a completed run
    CHECKPOINTS = "checkpoints"  # the checkpoint directory (trainer)
    EVALUATION = "evaluation.json"  # `scalelab evaluate --out` in the workflow
    REPRODUCE = "reproduce.json"  # `scalelab reproduce`'s comparison, in the rerun's dir
    TRACKING = "tracking.json"  # the tracking settings the study gives the run (launch)
    UNSENT = "tracking-unsent.json"  # what live tracking could not send (trainer, rank 0)
    TENSORBOARD = "tensorboard"  # TensorBoard event files (trainer, rank 0)

    #: What scalelab writes in a run directory (train, launch, evaluate, reproduce): the
    #: marker records it, and the guard replaces a run directory only if it holds no more.
    FILES = (
        RUN_CONFIG,
        SWEEP,
        CONTAINER,
        CONFIG,
        RUN_INFO,
        PROVENANCE,
        METRICS,
        MODEL,
        SUMMARY,
        CHECKPOINTS + "/",
        EVALUATION,
        REPRODUCE,
        TRACKING,
        UNSENT,
        TENSORBOARD + "/",
    )

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ file paths

    @property
    def run_config_path(self) -> Path:
        return self.path / self.RUN_CONFIG

    @property
    def sweep_path(self) -> Path:
        return self.path / self.SWEEP

    @property
    def container_path(self) -> Path:
        return self.path / self.CONTAINER

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def run_info_path(self) -> Path:
        return self.path / self.RUN_INFO

    @property
    def provenance_path(self) -> Path:
        return self.path / self.PROVENANCE

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def model_path(self) -> Path:
        return self.path / self.MODEL

    @property
    def summary_path(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def evaluation_path(self) -> Path:
        return self.path / self.EVALUATION

    @property
    def reproduce_path(self) -> Path:
        return self.path / self.REPRODUCE

    @property
    def tracking_path(self) -> Path:
        return self.path / self.TRACKING

    @property
    def unsent_path(self) -> Path:
        return self.path / self.UNSENT

    @property
    def tensorboard(self) -> Path:
        return self.path / self.TENSORBOARD

    # ------------------------------------------------------------- guard and lock

    def check(self, inputs: Iterable[str | Path] = ()) -> None:
        """The guard's check alone (a dry run too refuses what it may not replace)."""
        output_guard.check_target(self.path, KIND, inputs)

    @contextlib.contextmanager
    def guard(
        self, inputs: Iterable[str | Path] = (), *, force: bool = False, token: str | None = None
    ) -> Iterator[RunDir]:
        """Check the directory (a run directory, or new or empty), hold its writer lock."""
        with output_guard.guard(self.path, KIND, inputs, force=force, token=token):
            yield self

    @contextlib.contextmanager
    def lock(self, force: bool = False) -> Iterator[RunDir]:
        """The trainer's writer lock: refuse a RUN_DIR that is not a run directory, and
        hold its lock for the job.

        Rank 0 alone checks and locks the directory (its failure ends the job), unless
        `scalelab launch` already holds it on the ranks' behalf (:data:`LOCK_ENV`). Two
        trainings into one RUN_DIR: the second is refused before it writes anything.
        """
        if process_rank() != "0" or output_guard.held_for(self.path, os.environ.get(LOCK_ENV)):
            yield self  # rank 0 (or the launcher) checked and holds the directory for the job
            return
        with self.guard(force=force):
            yield self  # the trainer creates and marks RUN_DIR once the config has passed

    # ---------------------------------------------------------------- preparation

    def mark(self) -> None:
        """Create the directory and mark it as a run: what scalelab may resume or replace."""
        self.path.mkdir(parents=True, exist_ok=True)
        output_guard.write_marker(self.path, KIND, self.FILES)

    def prepare(self, resume: bool) -> None:
        """The trainer's start (rank 0): marked; a fresh run drops an earlier attempt's
        metrics, weights and tracker records, a resume keeps them."""
        self.mark()
        if not resume:
            for stale in (self.metrics_path, self.model_path, self.unsent_path):
                stale.unlink(missing_ok=True)
            shutil.rmtree(self.tensorboard, ignore_errors=True)

    def prepare_launch(self, config_sha256: str) -> None:
        """The launcher's start (under :meth:`guard`): a run directory left by another
        config is cleared; one of the same config is kept so ``--resume`` continues from
        its newest checkpoint (a requeued or retried job); the summary goes, so the
        trainer runs."""
        if self.path.exists() and output_guard.marker_kind(self.path) == KIND:
            try:
                old = json.loads(self.sweep_path.read_text()).get("config_sha256")
            except (OSError, json.JSONDecodeError):
                old = None
            if old != config_sha256:
                shutil.rmtree(self.path)
        self.mark()
        self.summary_path.unlink(missing_ok=True)

    def prepare_rerun(self) -> None:
        """`reproduce`'s start (under :meth:`guard`): a finished earlier rerun is replaced."""
        if self.is_complete():
            shutil.rmtree(self.path)  # a finished earlier rerun: this one starts afresh
        self.mark()

    def check_start(
        self, resume: bool, has_checkpoints: Callable[[Path], Any]
    ) -> dict[str, Any] | None:
        """Refuse to overwrite a run; the summary of a completed one on --resume.

        ``has_checkpoints(dir)``: whether the checkpoint directory holds any checkpoint
        (the checkpointer knows their names)."""
        if self.is_complete():
            if resume:
                return json.loads(self.summary_path.read_text())
            raise UsageError(
                f"--out {self.path}: holds a completed run ({self.SUMMARY}); choose a new directory"
            )
        if not resume and has_checkpoints(self.checkpoints):
            raise UsageError(
                f"--out {self.path}: holds checkpoints of an unfinished run; "
                "pass --resume to continue it or choose a new directory"
            )
        return None

    # -------------------------------------------------------------------- writers

    def write_run_config(self, config: dict[str, Any]) -> None:
        self._write_yaml(self.run_config_path, config)

    def write_config(self, config: dict[str, Any]) -> None:
        self._write_yaml(self.config_path, config)

    def write_sweep(self, doc: dict[str, Any]) -> None:
        fsio.atomic_write_text(self.sweep_path, json.dumps(doc, indent=2))

    def write_container(self, image: dict[str, Any]) -> None:
        fsio.atomic_write_text(self.container_path, json.dumps(image, indent=2))

    def write_run_info(self, info: dict[str, Any]) -> None:
        fsio.atomic_write_json(self.run_info_path, info)

    def write_model(self, writer: Callable[[IO[bytes]], Any]) -> None:
        fsio.atomic_write(self.model_path, writer)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Written last: its presence marks the run completed."""
        fsio.atomic_write_json(self.summary_path, summary)

    def write_reproduce(self, doc: dict[str, Any]) -> None:
        fsio.atomic_write_json(self.reproduce_path, doc)

    def set_tracking(self, settings: dict[str, Any] | None) -> None:
        """The run's tracking settings; None removes an earlier launch's."""
        if settings is None:
            self.tracking_path.unlink(missing_ok=True)
        else:
            fsio.atomic_write_json(self.tracking_path, settings)

    def record_unsent(self, entry: dict[str, Any]) -> None:
        """Add one start's not-sent entry to the record (a resumed run adds its own)."""
        fsio.atomic_write_json(self.unsent_path, {"unsent": [*self.unsent(), entry]})

    @staticmethod
    def _write_yaml(path: Path, doc: dict[str, Any]) -> None:
        import yaml

        fsio.atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False))

    # -------------------------------------------------------------------- state

    def is_complete(self) -> bool:
        """Whether the run completed (the trainer writes the summary last)."""
        return self.summary_path.exists()

    def stopped_after_checkpoint(self) -> bool:
        """Whether the run's last metrics record says it stopped on a signal after a
        checkpoint that is still there (then the job is to be requeued: exit 75)."""
        try:
            lines = self.metrics_path.read_text().splitlines()
            last = json.loads(lines[-1]) if lines else {}
        except (OSError, ValueError):
            return False
        if not isinstance(last, dict) or last.get("kind") != "preempted" or self.is_complete():
            return False
        return (self.checkpoints / str(last.get("checkpoint", ""))).is_file()

    # -------------------------------------------------------------------- readers

    def summary(self) -> dict[str, Any]:
        """summary.json; a UsageError naming the file when it is missing or broken."""
        if not self.summary_path.is_file():
            raise UsageError(
                f"{self.summary_path}: missing: the run did not complete (no {self.SUMMARY})"
            )
        return _read_json(self.summary_path)

    def run_info(self) -> dict[str, Any]:
        """run_info.json ({} when missing: a run made before it, or by hand)."""
        return _read_json(self.run_info_path) if self.run_info_path.is_file() else {}

    def sweep(self) -> dict[str, Any]:
        """sweep.json ({} when missing: a run not started by `scalelab launch`)."""
        return _read_json(self.sweep_path) if self.sweep_path.is_file() else {}

    def tracking(self) -> dict[str, Any] | None:
        """tracking.json (None when missing: the study tracks nothing)."""
        return _read_json(self.tracking_path) if self.tracking_path.is_file() else None

    def unsent(self) -> list[dict[str, Any]]:
        """The entries of tracking-unsent.json ([] when missing or unreadable)."""
        try:
            entries = json.loads(self.unsent_path.read_text()).get("unsent", [])
        except (OSError, ValueError, AttributeError):
            return []
        return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []

    def evaluation(self) -> dict[str, Any] | None:
        """evaluation.json (None when `scalelab evaluate` did not write one)."""
        return _read_json(self.evaluation_path) if self.evaluation_path.is_file() else None

    def config(self, missing_ok: bool = True) -> Any:
        """config.yaml as written (a raw mapping; {} when missing and ``missing_ok``)."""
        path = self.config_path
        if not path.is_file():
            if missing_ok:
                return {}
            raise UsageError(f"{path}: missing; the run did not complete")
        import yaml

        try:
            return yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UsageError(f"{path}: not valid YAML: {exc}") from None

    def metrics(self) -> Iterator[dict[str, Any]]:
        """The records of metrics.jsonl in order (none when missing); a line that is not
        JSON is a UsageError naming it."""
        path = self.metrics_path
        if not path.exists():
            return
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise UsageError(f"{path}: line {lineno} is not valid JSON") from None
            if isinstance(rec, dict):
                yield rec

    def data_spec(self) -> DataSpec | None:
        """The spec the run trained with (None: a run from before it was recorded, or no
        readable run_info.json); a malformed one is a UsageError naming the file."""
        path = self.run_info_path
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        data = info.get(DATA_SPEC) if isinstance(info, dict) else None
        return None if data is None else DataSpec.from_dict(data, str(path))
