"""What a run directory gives a tracker: keys, tags, params, metrics and artifacts.

One function per thing, shared by the live tracker and ``track sync``, so both send the
same values under the same names. Everything that leaves the run directory goes through
the provenance's redaction (:mod:`scalelab.redact`): a value under a credential-like
name is replaced, a ``NAME=secret`` pair or a URL password inside a value loses the
secret. Metric values are the records of ``metrics.jsonl`` as they are.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import yaml

from scalelab.provenance import flatten
from scalelab.redact import REDACTED, SECRET_NAME, redact_text, redact_tree
from scalelab.rundir import RunDir
from scalelab.tracking.mlflow import MAX_KEY, MAX_PARAM_VALUE, MAX_TAG_VALUE, PARENT_TAG

#: The tag that identifies a scalelab run or study on the server (what sync looks up).
KEY_TAG = "scalelab.key"
#: "study" (a parent run) or "run" (a child run).
KIND_TAG = "scalelab.kind"
STUDY_TAG = "scalelab.study"
RUN_ID_TAG = "scalelab.run_id"
#: Fields of an epoch record that are not metrics (its position, its kind, its clock).
NOT_METRICS = frozenset({"kind", "epoch", "epochs", "time"})
#: Prefix of the summary's figures logged as metrics (one value each, at step 0).
SUMMARY_PREFIX = "summary."
#: The files of a run directory sent as its artifacts, when present.
RUN_ARTIFACTS = (
    RunDir.SUMMARY,
    RunDir.PROVENANCE,
    RunDir.METRICS,
    RunDir.CONFIG,
    RunDir.EVALUATION,
)


def study_tags(study_key: str) -> dict[str, str]:
    return {KEY_TAG: study_key, KIND_TAG: "study", STUDY_TAG: study_key}


def first_start(run_dir: RunDir) -> str:
    """When the run first started (provenance.json keeps it across resumes): a rerun of
    the same sweep point is another child run, a resumed one is the same."""
    with contextlib.suppress(OSError, ValueError, AttributeError, LookupError, TypeError):
        manifest = json.loads(run_dir.provenance_path.read_text())
        return str(manifest["incidental"]["starts"][0]["started_at"])
    return ""


def run_key(study_key: str, run_id: str, run_dir: RunDir) -> str:
    """The child run's key: its study, its sweep point, its first start."""
    return f"{study_key}/{run_id}/{first_start(run_dir)}"


def run_tags(study_key: str, run_id: str, run_dir: RunDir, parent_id: str) -> dict[str, str]:
    """The child run's tags: its key, its parent, and its sweep point (sweep.json)."""
    tags = {
        KEY_TAG: run_key(study_key, run_id, run_dir),
        KIND_TAG: "run",
        STUDY_TAG: study_key,
        RUN_ID_TAG: run_id,
        PARENT_TAG: parent_id,
    }
    point = {k: v for k, v in run_dir.sweep().items() if k not in ("run_id", "config_sha256")}
    tags.update({f"scalelab.point.{k}": v for k, v in _strings(point, MAX_TAG_VALUE).items()})
    return tags


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _strings(tree: dict[str, Any], limit: int) -> dict[str, str]:
    """Flattened ``{a.b: text}``: strings as they are, anything else as JSON; a value
    under a credential-like name is redacted, every value loses embedded secrets."""
    out = {}
    for key, value in flatten(tree).items():
        if len(key) > MAX_KEY:
            continue
        text = REDACTED if SECRET_NAME.search(key) else redact_text(_text(value))
        out[key] = text[:limit]
    return out


def params(config: dict[str, Any]) -> dict[str, str]:
    """A run config (or a study's sections) as MLflow params."""
    return _strings(config, MAX_PARAM_VALUE)


def _finite(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def epoch_metrics(record: dict[str, Any], timestamp_ms: int) -> list[dict[str, Any]]:
    """An epoch record of metrics.jsonl as MLflow metrics at step = its epoch (0-based,
    as in the file); fields without a finite number (val_loss when not validated) are
    left out."""
    step = int(record["epoch"])
    return [
        {"key": key, "value": float(value), "step": step, "timestamp": timestamp_ms}
        for key, value in record.items()
        if key not in NOT_METRICS and _finite(value)
    ]


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The same values for TensorBoard: key -> value."""
    return {m["key"]: m["value"] for m in epoch_metrics(record, 0)}


def epoch_records(run_dir: RunDir) -> list[dict[str, Any]]:
    """The run's epoch records, one per epoch (the last one written wins: a resumed run
    may have trained an epoch twice)."""
    last: dict[int, dict[str, Any]] = {}
    for rec in run_dir.metrics():
        if rec.get("kind") == "epoch" and isinstance(rec.get("epoch"), int):
            last[rec["epoch"]] = rec
    return [last[e] for e in sorted(last)]


def record_ms(record: dict[str, Any]) -> int:
    """The record's own time (metrics.jsonl's ``time``, seconds) in milliseconds."""
    value = record.get("time")
    return int(float(value) * 1000) if _finite(value) else 0


def summary_metrics(summary: dict[str, Any], timestamp_ms: int) -> list[dict[str, Any]]:
    """The summary's top-level figures as metrics ``summary.KEY`` (one value, step 0)."""
    return [
        {"key": f"{SUMMARY_PREFIX}{k}", "value": float(v), "step": 0, "timestamp": timestamp_ms}
        for k, v in summary.items()
        if _finite(v) and not SECRET_NAME.search(k)
    ]


def artifact_bytes(path: Path) -> bytes:
    """A file as sent to a tracker: JSON, JSON lines and YAML redacted value by value,
    other text redacted line by line, images as they are."""
    data = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix in (".png", ".jpg", ".jpeg", ".parquet"):
        return data
    text = data.decode("utf-8", errors="replace")
    if suffix == ".json":
        with contextlib.suppress(ValueError):
            return (json.dumps(redact_tree(json.loads(text)), indent=2) + "\n").encode()
    if suffix == ".jsonl":
        with contextlib.suppress(ValueError):
            lines = [json.dumps(redact_tree(json.loads(x))) for x in text.splitlines() if x]
            return ("\n".join(lines) + "\n").encode() if lines else b""
    if suffix in (".yaml", ".yml"):
        with contextlib.suppress(yaml.YAMLError):
            doc = redact_tree(yaml.safe_load(text))
            return yaml.safe_dump(doc, sort_keys=False).encode()
    return "\n".join(redact_text(line) for line in text.split("\n")).encode()


def run_artifacts(run_dir: RunDir) -> dict[str, Path]:
    """Artifact name -> file, for the run artifacts present."""
    return {name: run_dir.path / name for name in RUN_ARTIFACTS if (run_dir.path / name).is_file()}
