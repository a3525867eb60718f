"""The ``tracking:`` section of a study, and the settings one run receives from it.

A study writes its tracking settings into each run directory (``RunDir.TRACKING``,
written by ``scalelab launch``); the trainer's rank 0 reads them there. A plain
``scalelab train --tracking FILE`` reads the same section from FILE (:func:`load_file`)
and writes the same settings (:func:`for_run_dir`): the run directory stands in for the
study. Credentials
never pass through a config or a settings file: the MLflow token and password come
from the environment variables MLflow itself reads (:data:`TOKEN_ENV`,
:data:`USERNAME_ENV`, :data:`PASSWORD_ENV`), and a URI with a user or password in it is
refused.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import MutableMapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationError

from scalelab import docload
from scalelab.config_types import Section, format_error
from scalelab.errors import UsageError
from scalelab.fsio import canonical, sha256_bytes
from scalelab.redact import redact_text

#: The study's tracking settings, set by the workflow (common.smk) for the launcher of
#: each training job (JSON: :class:`StudySettings`). An environment variable and not a
#: rule parameter: a changed tracking server must not retrain the study.
TRACKING_ENV = "SCALELAB_TRACKING"
#: What MLflow's own client reads (the only place a credential comes from).
TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
CERT_ENV = "MLFLOW_TRACKING_SERVER_CERT_PATH"
INSECURE_ENV = "MLFLOW_TRACKING_INSECURE_TLS"

#: http(s)://host[:port][/path]: no user or password (they would reach logs and files),
#: no query, nothing a shell or a URL parser reads twice.
URI_PATTERN = r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$"
#: MLflow experiment names: plain text (Databricks-style /Users/x/name paths too).
EXPERIMENT_PATTERN = r"^[A-Za-z0-9_./@ -]{1,200}$"
#: A study key (:func:`scalelab.study.tracking.study_key`): hex.
KEY_PATTERN = r"^[0-9a-f]{8,64}$"
#: A run id (an MLflow child run's name); :func:`for_run_dir` maps a directory's name to one.
RUN_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,200}$"


def _check_uri(value: str) -> str:
    """A tracking URI without credentials; the error never repeats a password."""
    if "@" in urllib.parse.urlsplit(value).netloc:
        raise ValueError(
            "holds a user or password: give http(s)://HOST[:PORT] and put the token in "
            f"${TOKEN_ENV} (or ${USERNAME_ENV} and ${PASSWORD_ENV})"
        )
    if not re.fullmatch(URI_PATTERN, value):
        raise ValueError(
            f"expected http(s)://HOST[:PORT][/PATH] (no query), got {redact_text(value)[:80]!r}"
        )
    return value


Uri = Annotated[
    str,
    Field(max_length=2000, json_schema_extra={"pattern": URI_PATTERN}),
    AfterValidator(_check_uri),
]


class MlflowSection(Section):
    """An MLflow tracking server: a parent run per study, a child run per sweep point."""

    uri: Uri | None = None
    """Tracking server, http:// or https:// (no user or password in it: the token comes
    from $MLFLOW_TRACKING_TOKEN, or $MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD);
    null: MLflow off."""
    experiment: Annotated[str, Field(pattern=EXPERIMENT_PATTERN)] = "scalelab"
    """Experiment the study's runs go to (created when missing)."""
    live: bool = True
    """Rank 0 of each run sends its run while it trains (off the training thread); false:
    only the workflow's track rule (on the submit host) and ``scalelab track sync`` send,
    for compute nodes without a route to the server."""
    timeout_s: Annotated[float, Field(gt=0, le=120, allow_inf_nan=False)] = 5.0
    """Longest wait for one request. A server that accepts connections and never answers
    costs a run at most this, once (a training step never waits for the server)."""
    flush_s: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = 30.0
    """The most a run waits at its end for what it queued to reach a slow server; what is
    left is recorded as not sent (``scalelab track sync`` sends it)."""


class TrackingConfig(Section):
    """Experiment trackers fed from each run; metrics.jsonl stays the source of truth."""

    mlflow: MlflowSection = Field(default_factory=MlflowSection)
    """MLflow."""
    tensorboard: bool = False
    """Write TensorBoard event files into each run directory (RUN_DIR/tensorboard)."""

    @property
    def enabled(self) -> bool:
        """Whether any tracker is on."""
        return self.tensorboard or self.mlflow.uri is not None


class TrackingFile(Section):
    """The file ``scalelab train --tracking FILE`` reads: a study's ``tracking:`` section,
    alone."""

    tracking: TrackingConfig
    """The section, as a study config holds it."""


class StudySettings(Section):
    """What a study gives the runs it starts: the tracking section and the study's identity
    (the MLflow parent run's key)."""

    tracking: TrackingConfig
    """The study's tracking section."""
    study_key: Annotated[str, Field(pattern=KEY_PATTERN)]
    """The study's key (scalelab.study.tracking.study_key)."""
    study_name: Annotated[str, Field(min_length=1, max_length=200)]
    """The parent run's name."""


class RunSettings(StudySettings):
    """The tracking settings of one run (``RunDir.TRACKING``)."""

    run_id: Annotated[str, Field(pattern=RUN_ID_PATTERN)]
    """The sweep point's run id (the child run's name)."""
    standalone: bool = False
    """A run without a study (``scalelab train --tracking``): its parent run stands for
    the run directory and finishes with the run."""


def parse(data: Any, model: type[StudySettings], where: str) -> StudySettings:
    """Validate settings read from a file or the environment; one line naming ``where``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UsageError(f"{where}: {format_error(exc, model)}") from None


def from_environ(environ: MutableMapping[str, str] | None = None) -> StudySettings | None:
    """The study settings the workflow exported (None: tracking is off)."""
    raw = (os.environ if environ is None else environ).get(TRACKING_ENV)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise UsageError(f"${TRACKING_ENV}: not valid JSON") from None
    return parse(data, StudySettings, f"${TRACKING_ENV}")


def for_run(study: StudySettings, run_id: str) -> RunSettings:
    """The settings one sweep point's run receives."""
    return RunSettings.model_validate({**study.model_dump(), "run_id": run_id})


def load_file(path: str | Path) -> TrackingConfig:
    """The ``tracking:`` section of ``path`` (``scalelab train --tracking``); a bad file,
    a bad field or a section that turns on nothing is one line naming the file."""
    try:
        section = TrackingFile.model_validate(docload.load(path)).tracking
    except ValidationError as exc:
        raise UsageError(f"{path}: {format_error(exc, TrackingFile)}") from None
    if not section.enabled:
        raise UsageError(
            f"{path}: field 'tracking': turns on no tracker "
            "(set tracking.mlflow.uri, or tracking.tensorboard: true)"
        )
    return section


def for_run_dir(section: TrackingConfig, run_dir: str | Path) -> RunSettings:
    """The settings of a run started without a study: the run directory (absolute) is the
    parent run's key and name, each fresh start in it a child run named after it."""
    where = Path(run_dir).resolve()
    key = sha256_bytes(canonical({"run_dir": str(where)}))[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", where.name)[:200] or "run"
    return RunSettings.model_validate(
        {
            "tracking": section.model_dump(),
            "study_key": key,
            "study_name": f"{name} {key[:8]}",
            "run_id": name,
            "standalone": True,
        }
    )
