"""Put a study's parent run and a run's child run on an MLflow server, sending only what
the server lacks.

Runs are found by their key tag (:data:`~scalelab.tracking.content.KEY_TAG`), never by
name: a study's parent by the study key, a child by the study key, its sweep point and its
first start. Whatever the server already holds (a param, a metric at a step, an artifact
path, a finished status) is not sent again, so a second sync sends nothing. The live
tracker uses the same lookups; what it could not send, a sync sends.

Several runs of a study may create its parent at the same moment: each takes the oldest
parent with the study's key, and :func:`merge_parents` (the study's sync) moves the
children of any other onto it and deletes the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from scalelab.rundir import RunDir
from scalelab.tracking import content
from scalelab.tracking.mlflow import PARENT_TAG, MlflowClient

FINISHED = "FINISHED"


@dataclass
class Counts:
    """What one sync sent (runs created, params, metric values, artifacts, statuses)."""

    runs: int = 0
    params: int = 0
    metrics: int = 0
    artifacts: int = 0
    statuses: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, other: Counts) -> None:
        for name in ("runs", "params", "metrics", "artifacts", "statuses"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.notes += other.notes

    @property
    def total(self) -> int:
        return self.runs + self.params + self.metrics + self.artifacts + self.statuses

    def as_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "params": self.params,
            "metrics": self.metrics,
            "artifacts": self.artifacts,
            "statuses": self.statuses,
        }

    def words(self) -> str:
        return (
            f"{self.runs} run(s) created, {self.params} param(s), {self.metrics} metric "
            f"value(s), {self.artifacts} artifact(s), {self.statuses} status update(s)"
        )


def now_ms() -> int:
    return int(time.time() * 1000)


def ensure_parent(
    client: MlflowClient, experiment_id: str, study_key: str, name: str, counts: Counts
) -> dict[str, Any]:
    """The study's parent run: the oldest with its key, created when there is none."""
    found = client.find_runs(experiment_id, content.KEY_TAG, study_key)
    if found:
        return found[0]
    client.create_run(experiment_id, name, content.study_tags(study_key), now_ms())
    counts.runs += 1
    return client.find_runs(experiment_id, content.KEY_TAG, study_key)[0]


def ensure_child(
    client: MlflowClient,
    experiment_id: str,
    parent: dict[str, Any],
    tags: dict[str, str],
    name: str,
    start_ms: int,
    counts: Counts,
) -> dict[str, Any]:
    """The run's child run (by its key tag), created under ``parent`` when missing; an
    existing one is moved under ``parent`` when it hangs elsewhere."""
    parent_id = parent["info"]["run_id"]
    found = client.find_runs(experiment_id, content.KEY_TAG, tags[content.KEY_TAG])
    if not found:
        counts.runs += 1
        return client.create_run(experiment_id, name, {**tags, PARENT_TAG: parent_id}, start_ms)
    run = found[0]
    if _tags(run).get(PARENT_TAG) != parent_id:
        client.set_tag(run["info"]["run_id"], PARENT_TAG, parent_id)
    return run


def merge_parents(client: MlflowClient, experiment_id: str, study_key: str) -> int:
    """One parent per study: children of a younger duplicate move to the oldest, the
    duplicates are deleted. Returns how many were deleted."""
    parents = client.find_runs(experiment_id, content.KEY_TAG, study_key)
    if len(parents) < 2:
        return 0
    keep = parents[0]["info"]["run_id"]
    for extra in parents[1:]:
        gone = extra["info"]["run_id"]
        for child in client.find_runs(experiment_id, PARENT_TAG, gone):
            client.set_tag(child["info"]["run_id"], PARENT_TAG, keep)
        client.delete_run(gone)
    return len(parents) - 1


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t.get("value", "") for t in run.get("data", {}).get("tags", [])}


def _params(run: dict[str, Any]) -> dict[str, str]:
    return {p["key"]: p.get("value", "") for p in run.get("data", {}).get("params", [])}


def missing_params(run: dict[str, Any], wanted: dict[str, str]) -> dict[str, str]:
    """Params the run lacks (a param, once logged, cannot change: those are kept)."""
    have = _params(run)
    return {k: v for k, v in wanted.items() if k not in have}


def missing_metrics(
    client: MlflowClient, run: dict[str, Any], wanted: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Metric values whose (key, step) the server does not have yet."""
    run_id = run["info"]["run_id"]
    logged = {m["key"] for m in run.get("data", {}).get("metrics", [])}
    have: set[tuple[str, int]] = set()
    for key in sorted({m["key"] for m in wanted} & logged):
        have |= {(key, int(h.get("step", 0))) for h in client.metric_history(run_id, key)}
    return [m for m in wanted if (m["key"], m["step"]) not in have]


def send_artifacts(
    client: MlflowClient, run: dict[str, Any], files: dict[str, Any], counts: Counts
) -> None:
    """Upload the artifacts (name -> Path) the run does not hold yet."""
    have = set(client.list_artifacts(run["info"]["run_id"]))
    for name, path in files.items():
        if name not in have:
            client.upload_artifact(run, name, content.artifact_bytes(path))
            counts.artifacts += 1


def sync_run(
    client: MlflowClient,
    experiment_id: str,
    parent: dict[str, Any],
    study_key: str,
    run_id: str,
    run_dir: RunDir,
) -> Counts:
    """Everything one run directory holds, onto its child run; only what is missing."""
    counts = Counts()
    tags = content.run_tags(study_key, run_id, run_dir, parent["info"]["run_id"])
    start = next((content.record_ms(r) for r in run_dir.metrics()), 0) or now_ms()
    child = ensure_child(client, experiment_id, parent, tags, run_id, start, counts)
    child = client.get_run(child["info"]["run_id"])
    child_id = child["info"]["run_id"]
    extra = {k: v for k, v in tags.items() if _tags(child).get(k) != v}
    new_params = missing_params(child, content.params(run_dir.config()))
    wanted = [
        m
        for rec in content.epoch_records(run_dir)
        for m in content.epoch_metrics(rec, content.record_ms(rec))
    ]
    complete = run_dir.is_complete()
    if complete:
        wanted += content.summary_metrics(run_dir.summary(), now_ms())
    new_metrics = missing_metrics(client, child, wanted)
    if new_params or new_metrics or extra:
        client.log_batch(child_id, new_metrics, new_params, extra)
        counts.params += len(new_params)
        counts.metrics += len(new_metrics)
    send_artifacts(client, child, content.run_artifacts(run_dir), counts)
    if complete and child["info"].get("status") != FINISHED:
        client.finish_run(child_id, FINISHED, now_ms())
        counts.statuses += 1
    if not complete:
        counts.notes.append(f"{run_dir}: not complete (no {RunDir.SUMMARY}): left running")
    return counts
