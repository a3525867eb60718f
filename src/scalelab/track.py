"""``scalelab track sync RESULTS|RUN_DIR --mlflow URI``: send a study, or one run, to an
MLflow server after the fact.

For clusters whose compute nodes cannot reach the tracking server: the study runs with
``tracking.mlflow.live: false`` (or the server was down), and this command, run where
the server is reachable, sends what the results directory holds. The study's parent run
gets its identity sections as params and the effective config, the plan and the scaling
analysis (tables and plots) as artifacts; each run directory becomes a child run with its
params, per-epoch metrics, summary figures, and its summary, provenance, metrics and
config as artifacts. Everything goes through the provenance's redaction. A run directory
(one holding tracking.json: a ``scalelab train --tracking`` run, or one run of a study)
is sent alone, under the parent run its settings name.

It is idempotent: runs are found by their key tag and only what the server lacks is sent,
so a second sync sends nothing. ``--record FILE`` writes what was sent as JSON (the
workflow's track rule does).

Exit codes: 0 sent (or nothing to send); 1 the server failed or refused a request; 2 bad
usage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from scalelab import docload
from scalelab.analysis.runs import find_run_dirs
from scalelab.config_types import format_error
from scalelab.errors import UsageError
from scalelab.fsio import atomic_write_json
from scalelab.rundir import RunDir
from scalelab.study import tracking as study_tracking
from scalelab.tracking import content
from scalelab.tracking.config import MlflowSection, RunSettings, parse
from scalelab.tracking.mlflow import MlflowClient
from scalelab.tracking.sync import (
    FINISHED,
    Counts,
    ensure_parent,
    merge_parents,
    missing_params,
    now_ms,
    send_artifacts,
    sync_run,
)

#: Analysis outputs sent as the parent's artifacts (tables, the page, plots as PNG).
ANALYSIS_SUFFIXES = (".csv", ".md", ".json", ".html", ".png")


def register(sub: argparse._SubParsersAction) -> None:
    doc = (__doc__ or "").split("\n\n")
    p = sub.add_parser(
        "track", help="experiment trackers: send a study to MLflow after the fact (sync)"
    )
    actions = p.add_subparsers(dest="track_command", metavar="ACTION", required=True)
    s = actions.add_parser(
        "sync",
        help="send a study's runs, metrics and analysis to an MLflow server (idempotent)",
        description=" ".join(doc[1:4]).replace("\n", " "),
        epilog=doc[-1],
    )
    s.add_argument(
        "results",
        type=Path,
        metavar="RESULTS|RUN_DIR",
        help="the study's results directory, or one run directory holding tracking.json",
    )
    s.add_argument("--mlflow", required=True, metavar="URI", help="tracking server, http(s)://")
    s.add_argument(
        "--experiment",
        metavar="NAME",
        help="experiment (default: the study's, or the run's, tracking.mlflow.experiment)",
    )
    s.add_argument(
        "--timeout-s", type=float, metavar="S", help="longest wait for one request (default 5)"
    )
    s.add_argument("--record", type=Path, metavar="FILE", help="write what was sent as JSON")
    s.add_argument("--json", action="store_true", help="print the record as JSON")
    s.set_defaults(func=cmd_sync)


def _server(args: argparse.Namespace, cfg: dict[str, Any]) -> MlflowSection:
    """The server, experiment and timeout: the arguments over the study's section."""
    section = dict((cfg.get("tracking") or {}).get("mlflow") or {})
    section["uri"] = args.mlflow
    if args.experiment is not None:
        section["experiment"] = args.experiment
    if args.timeout_s is not None:
        section["timeout_s"] = args.timeout_s
    try:
        return MlflowSection.model_validate(section)
    except ValidationError as exc:
        message = format_error(exc, MlflowSection, "--").replace("--uri", "--mlflow")
        raise UsageError(message.replace("--timeout_s", "--timeout-s")) from None


def study_config(results: Path) -> dict[str, Any]:
    """RESULTS's effective config (the workflow writes it with the analysis)."""
    if not results.is_dir():
        raise UsageError(f"{results}: no such directory")
    path = results / study_tracking.EFFECTIVE_CONFIG
    if not path.is_file():
        raise UsageError(
            f"{path}: missing (the workflow writes it; is {results} a study's results?)"
        )
    return docload.load(path)


def analysis_files(results: Path) -> dict[str, Path]:
    """The study's artifacts: effective config, plan, and the analysis (artifact name ->
    file)."""
    files = {
        name: results / name
        for name in (study_tracking.EFFECTIVE_CONFIG, study_tracking.PLAN_FILE)
        if (results / name).is_file()
    }
    analysis = results / study_tracking.ANALYSIS_DIR
    if analysis.is_dir():
        for path in sorted(analysis.rglob("*")):
            rel = path.relative_to(results)
            hidden = any(part.startswith(".") for part in rel.parts)
            if path.is_file() and not hidden and path.suffix in ANALYSIS_SUFFIXES:
                files[rel.as_posix()] = path
    return files


def run_dirs(results: Path) -> list[RunDir]:
    runs = results / study_tracking.RUNS_DIR
    return [RunDir(d) for d in find_run_dirs(runs)] if runs.is_dir() else []


def sync_study(results: Path, server: MlflowSection, cfg: dict[str, Any]) -> dict[str, Any]:
    """Send the study in ``results``; the record of what was sent."""
    key = study_tracking.study_key(cfg, results)
    client = MlflowClient(server.uri or "", server.timeout_s)
    try:
        counts = Counts()
        exp = client.experiment_id(server.experiment)
        ensure_parent(client, exp, key, study_tracking.study_name(results, key), counts)
        merged = merge_parents(client, exp, key)  # parents made at once by live runs
        oldest = client.find_runs(exp, content.KEY_TAG, key)[0]
        parent = client.get_run(oldest["info"]["run_id"])
        ident = {s: cfg.get(s) for s in study_tracking.IDENTITY_SECTIONS}
        new = missing_params(parent, content.params(ident))
        if new:
            client.log_batch(parent["info"]["run_id"], params=new)
            counts.params += len(new)
        runs, dirs = [], run_dirs(results)
        for run_dir in dirs:
            run_id = str(run_dir.sweep().get("run_id") or run_dir.path.name)
            counts.add(sync_run(client, exp, parent, key, run_id, run_dir))
            runs.append(run_id)
        send_artifacts(client, parent, analysis_files(results), counts)
        _finish_parent(client, parent, bool(dirs) and all(d.is_complete() for d in dirs), counts)
    finally:
        client.close()
    return _record(server, exp, key, parent, runs, counts, merged)


def _finish_parent(client: MlflowClient, parent: dict, done: bool, counts: Counts) -> None:
    """Mark the study's parent run finished once every run under it is complete."""
    if done and parent["info"].get("status") != FINISHED:
        client.finish_run(parent["info"]["run_id"], FINISHED, now_ms())
        counts.statuses += 1


def _record(
    server: MlflowSection,
    exp: str,
    key: str,
    parent: dict,
    runs: list[str],
    counts: Counts,
    merged: int,
) -> dict[str, Any]:
    """What a sync did, as `track sync --json` prints it."""
    return {
        "uri": server.uri,
        "experiment": server.experiment,
        "experiment_id": exp,
        "study_key": key,
        "parent_run_id": parent["info"]["run_id"],
        "runs": runs,
        "sent": counts.as_dict(),
        "duplicate_parents_merged": merged,
        "notes": counts.notes,
        "words": counts.words(),
    }


def run_settings(path: Path) -> RunSettings | None:
    """The tracking settings of a run directory (None: ``path`` holds none, so it is a
    study's results, or nothing)."""
    run_dir = RunDir(path)
    if not run_dir.tracking_path.is_file():
        return None
    raw = docload.load(run_dir.tracking_path)
    found = parse(raw, RunSettings, str(run_dir.tracking_path))
    assert isinstance(found, RunSettings)
    return found


def sync_one(run_dir: RunDir, server: MlflowSection, settings: RunSettings) -> dict[str, Any]:
    """Send one run directory under the parent its settings name; the record."""
    client = MlflowClient(server.uri or "", server.timeout_s)
    try:
        counts = Counts()
        exp = client.experiment_id(server.experiment)
        key = settings.study_key
        parent = ensure_parent(client, exp, key, settings.study_name, counts)
        counts.add(sync_run(client, exp, parent, key, settings.run_id, run_dir))
        # no study finishes a plain run's parent: the run itself does
        _finish_parent(client, parent, settings.standalone and run_dir.is_complete(), counts)
    finally:
        client.close()
    return _record(server, exp, key, parent, [settings.run_id], counts, 0)


def cmd_sync(args: argparse.Namespace) -> int:
    results = Path(args.results)
    settings = run_settings(results)
    if settings is not None:
        server = _server(args, {"tracking": settings.tracking.model_dump()})
        record = sync_one(RunDir(results), server, settings)
    else:
        cfg = study_config(results)
        server = _server(args, cfg)
        record = sync_study(results, server, cfg)
    if args.record is not None:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.record, record)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    for note in record["notes"]:
        print(f"scalelab track sync: note: {note}")
    print(
        f"scalelab track sync: {results} -> {server.uri} experiment {server.experiment!r} "
        f"(parent {record['parent_run_id']}, {len(record['runs'])} run(s)): sent "
        f"{record['words']}"
    )
    return 0
