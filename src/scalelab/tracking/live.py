"""The trainer's tracker: rank 0 sends its run to MLflow and writes TensorBoard event files.

:meth:`RunTracker.open` reads the settings the study left in the run directory
(``RunDir.TRACKING``); without them, or on any rank but 0, the tracker does nothing.
The trainer calls :meth:`~RunTracker.start`, :meth:`~RunTracker.epoch`,
:meth:`~RunTracker.finish` and :meth:`~RunTracker.close`, and none of them raises or
waits on the network: MLflow's requests run on the :class:`~scalelab.tracking.sender.Sender`
lane. The bound on what tracking costs a run: nothing per step or epoch (a queue put); at its
end, :meth:`close` lets the lane drain for at most ``tracking.mlflow.flush_s``. A server
that accepts connections and never answers fails the first request after
``tracking.mlflow.timeout_s`` and nothing more is tried, so it costs at most that, once.

What was not sent is said once, in one line, and recorded in the run directory
(``RunDir.UNSENT``); ``scalelab track sync`` sends it later.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from scalelab.redact import redact_text
from scalelab.rundir import RunDir
from scalelab.tracking import content, sync
from scalelab.tracking.config import RunSettings, parse
from scalelab.tracking.mlflow import MlflowClient
from scalelab.tracking.sender import Item, Sender


def _say(text: str) -> None:
    print(f"scalelab train: tracking: {text}", file=sys.stderr, flush=True)


class MlflowLive:
    """One run's child run, fed item by item through a :class:`Sender`."""

    def __init__(self, settings: RunSettings, run_dir: RunDir) -> None:
        self.settings, self.run_dir = settings, run_dir
        self.mlflow = settings.tracking.mlflow
        self.client = MlflowClient(self.mlflow.uri or "", self.mlflow.timeout_s)
        self.sender = Sender("mlflow")
        self.child: dict[str, Any] | None = None
        self.parent_id: str | None = None
        self.counts = sync.Counts()

    def start(self, config: dict[str, Any]) -> None:
        names = content.params(config)
        self.sender.put(Item(f"run start ({len(names)} params)", len(names), self._open(names)))

    def _open(self, names: dict[str, str]):
        def send() -> None:
            s, client = self.settings, self.client
            exp = client.experiment_id(self.mlflow.experiment)
            parent = sync.ensure_parent(client, exp, s.study_key, s.study_name, self.counts)
            self.parent_id = parent["info"]["run_id"]
            tags = content.run_tags(s.study_key, s.run_id, self.run_dir, parent["info"]["run_id"])
            child = sync.ensure_child(
                client, exp, parent, tags, s.run_id, sync.now_ms(), self.counts
            )
            child = client.get_run(child["info"]["run_id"])
            new = sync.missing_params(child, names)
            if new:
                client.log_batch(child["info"]["run_id"], params=new)
            self.child = child

        return send

    def _log(self, metrics: list[dict[str, Any]]):
        def send() -> None:
            if self.child is None:
                raise RuntimeError("no child run (its creation failed)")
            self.client.log_batch(self.child["info"]["run_id"], metrics)

        return send

    def epoch(self, record: dict[str, Any]) -> None:
        metrics = content.epoch_metrics(record, sync.now_ms())
        what = f"epoch {record['epoch'] + 1} metrics ({len(metrics)} values)"
        self.sender.put(Item(what, len(metrics), self._log(metrics)))

    def finish(self, summary: dict[str, Any]) -> None:
        metrics = content.summary_metrics(summary, sync.now_ms())
        self.sender.put(Item(f"summary metrics ({len(metrics)})", len(metrics), self._log(metrics)))
        for name, path in content.run_artifacts(self.run_dir).items():
            self.sender.put(Item(f"artifact {name}", 1, self._upload(name, path)))
        self.sender.put(Item("final status", 1, self._status))

    def _upload(self, name: str, path: Path):
        def send() -> None:
            if self.child is None:
                raise RuntimeError("no child run (its creation failed)")
            self.client.upload_artifact(self.child, name, content.artifact_bytes(path))

        return send

    def _status(self) -> None:
        if self.child is None:
            raise RuntimeError("no child run (its creation failed)")
        self.client.finish_run(self.child["info"]["run_id"], sync.FINISHED, sync.now_ms())
        if self.settings.standalone and self.parent_id is not None:  # no study finishes it
            self.client.finish_run(self.parent_id, sync.FINISHED, sync.now_ms())

    def close(self) -> dict[str, Any] | None:
        """Drain within the bound; the not-sent entry (None: everything was sent)."""
        unsent = self.sender.close(self.mlflow.flush_s)
        self.client.close()
        if not unsent:
            return None
        return {
            "tracker": "mlflow",
            "uri": self.mlflow.uri,
            "experiment": self.mlflow.experiment,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "reason": redact_text(self.sender.error or "unknown"),
            "not_sent": [item.what for item in unsent],
            "values": sum(item.count for item in unsent),
        }


class TensorBoardLive:
    """Event files in RUN_DIR/tensorboard, one scalar per epoch metric (step = epoch)."""

    def __init__(self, run_dir: RunDir) -> None:
        from torch.utils.tensorboard import SummaryWriter  # the tensorboard package

        self.writer = SummaryWriter(log_dir=str(run_dir.tensorboard))

    def epoch(self, record: dict[str, Any]) -> None:
        walltime = record.get("time") or time.time()
        for key, value in content.epoch_scalars(record).items():
            self.writer.add_scalar(key, value, global_step=int(record["epoch"]), walltime=walltime)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RunTracker:
    """The trackers of one rank-0 run (none elsewhere); see the module doc."""

    def __init__(self, run_dir: RunDir, settings: RunSettings | None) -> None:
        self.run_dir, self.settings = run_dir, settings
        self.mlflow: MlflowLive | None = None
        self.tensorboard: TensorBoardLive | None = None
        self.closed = False

    @classmethod
    def open(cls, run_dir: RunDir, main: bool) -> RunTracker:
        """The run's tracker (a silent one on ranks other than 0, or without settings)."""
        if not main:
            return cls(run_dir, None)
        try:
            raw = run_dir.tracking()
            settings = None if raw is None else parse(raw, RunSettings, str(run_dir.tracking_path))
        except Exception as exc:  # a tracker never breaks training
            _say(f"off: {exc}")
            return cls(run_dir, None)
        return cls(run_dir, settings)

    def _guard(self, what: str, action) -> None:
        """Run a tracker call; an error turns that tracker off with one line."""
        try:
            action()
        except Exception as exc:
            _say(f"{what}: {type(exc).__name__}: {redact_text(str(exc))[:300]}")
            if what == "TensorBoard":
                self.tensorboard = None

    def start(self, config: dict[str, Any]) -> None:
        s = self.settings
        if s is None:
            return
        if s.tracking.mlflow.uri and s.tracking.mlflow.live:
            self._guard("mlflow", lambda: self._start_mlflow(s, config))
        if s.tracking.tensorboard:
            self._guard("TensorBoard", self._start_tensorboard)

    def _start_mlflow(self, s: RunSettings, config: dict[str, Any]) -> None:
        self.mlflow = MlflowLive(s, self.run_dir)
        self.mlflow.start(config)

    def _start_tensorboard(self) -> None:
        self.tensorboard = TensorBoardLive(self.run_dir)

    def epoch(self, record: dict[str, Any]) -> None:
        """After the epoch's record is in metrics.jsonl."""
        if self.mlflow is not None:
            self._guard("mlflow", lambda: self.mlflow.epoch(record))
        if self.tensorboard is not None:
            self._guard("TensorBoard", lambda: self.tensorboard.epoch(record))

    def finish(self, summary: dict[str, Any]) -> None:
        """After summary.json is written: the run's figures, artifacts and status."""
        if self.mlflow is not None:
            self._guard("mlflow", lambda: self.mlflow.finish(summary))

    def close(self) -> None:
        """Let the lane drain (bounded), say once what was not sent, and record it."""
        if self.closed:
            return
        self.closed = True
        if self.tensorboard is not None:
            self._guard("TensorBoard", self.tensorboard.close)
        if self.mlflow is None:
            return
        try:
            entry = self.mlflow.close()
            if entry is not None:
                self.run_dir.record_unsent(entry)
                _say(self._unsent_line(entry))
        except Exception as exc:
            _say(f"mlflow: {type(exc).__name__}: {redact_text(str(exc))[:300]}")

    def _unsent_line(self, entry: dict[str, Any]) -> str:
        items = entry["not_sent"]
        shown = ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")
        where = "RESULTS" if self.run_dir.sweep() else str(self.run_dir.path)
        return (
            f"mlflow {entry['uri']}: not sent: {shown} ({entry['reason']}); recorded in "
            f"{self.run_dir.unsent_path}; `scalelab track sync {where} --mlflow URI` sends it"
        )
