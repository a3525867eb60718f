"""A study's identity for the trackers, and the settings the workflow hands its runs.

The study key names the MLflow parent run: a hash of where the study's results lie (the
absolute path) and of what it studies (its ``data``, ``train`` and ``sweep`` sections).
A changed sweep or training is another parent; a changed analysis threshold or tracking
server is the same. The workflow computes it when it parses (common.smk) and exports the
study's settings for each training job's launcher (:data:`TRACKING_ENV`); ``scalelab
track sync`` computes it again from RESULTS/config.yaml, the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from scalelab.fsio import canonical, sha256_bytes
from scalelab.tracking.config import TRACKING_ENV, StudySettings, TrackingConfig

#: The sections that say what a study studies (the rest says how it runs and reports).
IDENTITY_SECTIONS = ("data", "train", "sweep")
#: Hex digits of a study key.
KEY_LENGTH = 16


def study_key(cfg: Mapping[str, Any], results: str | Path) -> str:
    """The study's key: its results directory (absolute) and its identity sections."""
    ident = {
        "results": str(Path(results).resolve()),
        **{name: cfg.get(name) for name in IDENTITY_SECTIONS},
    }
    return sha256_bytes(canonical(ident))[:KEY_LENGTH]


def study_name(results: str | Path, key: str) -> str:
    """The parent run's name: the results directory's name and the key's start."""
    return f"{Path(results).resolve().name} {key[:8]}"


def settings(cfg: Mapping[str, Any], results: str | Path) -> StudySettings | None:
    """What the runs of a validated study receive (None: no tracker is on)."""
    tracking = TrackingConfig.model_validate(cfg.get("tracking") or {})
    if not tracking.enabled:
        return None
    key = study_key(cfg, results)
    return StudySettings.model_validate(
        {
            "tracking": tracking.model_dump(),
            "study_key": key,
            "study_name": study_name(results, key),
        }
    )


def export(cfg: Mapping[str, Any], environ: MutableMapping[str, str]) -> StudySettings | None:
    """Set (or clear) :data:`TRACKING_ENV` for the jobs this workflow starts; the
    settings, or None when no tracker is on."""
    found = settings(cfg, cfg["results"])
    if found is None:
        environ.pop(TRACKING_ENV, None)
    else:
        environ[TRACKING_ENV] = found.model_dump_json()
    return found


# --------------------------------------------------------------------------- results
# What ``track sync`` reads in RESULTS, as the workflow's rules write it (workflow/rules).
#: The effective config (rule effective_config).
EFFECTIVE_CONFIG = "config.yaml"
#: The plan: runs and skipped combinations (rule effective_config).
PLAN_FILE = "sweep.json"
#: One run directory per sweep point (rule train).
RUNS_DIR = "runs"
#: The scaling analysis (rule analyze).
ANALYSIS_DIR = "analysis"
