"""A small MLflow client over the tracking server's REST API (``requests``, no mlflow package).

The calls scalelab needs and nothing more: experiments by name, runs by a tag, batches
of metrics, params and tags, a run's status, metric histories, and artifacts through
the server's ``mlflow-artifacts`` proxy (``mlflow server --serve-artifacts``, the
default since MLflow 2). Every request has a timeout; every failure is one
:class:`TrackerError` whose text names the server and the call, never a credential.

Credentials come from the variables MLflow's own client reads (a user and password, or a
bearer token), in the order its ``rest_utils.http_request`` takes them (3.17.2): a user
and a password win over a token. A refusal (HTTP 401, 403) says which of them was sent,
by the variables' names, never their values. ``~/.netrc`` is not read (requests would
otherwise send a password it finds there for the host to the tracking server), proxies
and CA bundles come from the usual variables.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

import requests

from scalelab.errors import ScalelabError
from scalelab.redact import redact_text
from scalelab.tracking.config import (
    CERT_ENV,
    INSECURE_ENV,
    PASSWORD_ENV,
    TOKEN_ENV,
    USERNAME_ENV,
)

API = "/api/2.0/mlflow"
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
#: The artifact URI scheme of runs whose artifacts the server proxies.
PROXIED = "mlflow-artifacts"
#: MLflow's limits (mlflow.utils.validation): entries per log-batch request, value sizes.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
#: The tag MLflow nests a child run under its parent with.
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"


class TrackerError(ScalelabError):
    """A request the tracking server did not answer, or answered with an error (exit 1)."""

    def __init__(self, message: str, *, reachable: bool = True) -> None:
        super().__init__(message)
        #: False when the server was not reached at all (refused, timed out).
        self.reachable = reachable


def _auth(environ: Mapping[str, str]) -> tuple[dict[str, str], tuple[str, str] | None]:
    """(headers, basic auth) from MLflow's variables: a user and a password win over a
    token, as in MLflow's client (its docstring says otherwise; its code decides)."""
    user, password = environ.get(USERNAME_ENV), environ.get(PASSWORD_ENV)
    if user and password:
        return {}, (user, password)
    token = environ.get(TOKEN_ENV)
    if token:
        return {"Authorization": f"Bearer {token}"}, None
    return {}, None


def _sent(environ: Mapping[str, str]) -> str:
    """Which credentials a request carries, in words naming variables (no values)."""
    if environ.get(USERNAME_ENV) and environ.get(PASSWORD_ENV):
        return f"the user ${USERNAME_ENV} with ${PASSWORD_ENV}"
    if environ.get(TOKEN_ENV):
        return f"a bearer token from ${TOKEN_ENV}"
    return (
        f"no credentials (set ${USERNAME_ENV} and ${PASSWORD_ENV}, or ${TOKEN_ENV}, "
        "where this runs)"
    )


def _refusal(status: int, sent: str) -> str:
    """What a refusal means (401: who you are, 403: what you may), else nothing."""
    if status == 401:
        return f" (not authenticated; sent {sent})"
    if status == 403:
        return f" (permission denied for {sent.removeprefix('the ')})"
    return ""


def _verify(environ: Mapping[str, str]) -> bool | str:
    if environ.get(INSECURE_ENV, "").lower() in ("1", "true", "yes"):
        return False
    for name in (CERT_ENV, "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if environ.get(name):
            return environ[name]
    return True


def _reason(exc: requests.RequestException) -> str:
    """Why a request failed, in a few words: the operating system's reason for a failed
    connection (refused, unreachable), else the error's own first words."""
    if isinstance(exc, requests.ConnectionError) and not isinstance(
        exc, requests.exceptions.SSLError
    ):
        cause: BaseException | None = exc
        for _ in range(8):  # requests -> urllib3 MaxRetryError -> NewConnectionError -> OSError
            if isinstance(cause, OSError) and cause.strerror:
                return f"cannot connect: {cause.strerror}"
            cause = getattr(cause, "reason", None) or cause.__cause__ or cause.__context__
            if cause is None:
                break
        return "cannot connect"
    return f"{type(exc).__name__}: {redact_text(str(exc))[:160]}"


class MlflowClient:
    """One tracking server at ``uri``; each request waits at most ``timeout_s``."""

    def __init__(
        self, uri: str, timeout_s: float, environ: Mapping[str, str] | None = None
    ) -> None:
        environ = os.environ if environ is None else environ
        self.uri = uri.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        self.session.trust_env = False  # no ~/.netrc; proxies and CAs are set below
        headers, self.session.auth = _auth(environ)
        self.sent = _sent(environ)
        self.session.headers.update({"User-Agent": "scalelab", **headers})
        self.session.proxies = requests.utils.get_environ_proxies(self.uri)
        self.session.verify = _verify(environ)

    def close(self) -> None:
        self.session.close()

    # ------------------------------------------------------------------ requests

    def _request(self, method: str, path: str, what: str, **kw: Any) -> requests.Response:
        try:
            resp = self.session.request(
                method, f"{self.uri}{path}", timeout=(self.timeout_s, self.timeout_s), **kw
            )
        except requests.Timeout:
            raise TrackerError(
                f"{self.uri}: {what}: no answer in {self.timeout_s:g} s", reachable=False
            ) from None
        except requests.RequestException as exc:
            raise TrackerError(f"{self.uri}: {what}: {_reason(exc)}", reachable=False) from None
        return resp

    def call(self, method: str, endpoint: str, what: str, **kw: Any) -> dict[str, Any]:
        """One REST call of the tracking API; its JSON answer, or TrackerError."""
        resp = self._request(method, f"{API}/{endpoint}", what, **kw)
        try:
            body = resp.json() if resp.content else {}
        except ValueError:
            body = {}
        if resp.status_code != 200:
            code = body.get("error_code", f"HTTP {resp.status_code}")
            message = redact_text(str(body.get("message", resp.reason)))[:300]
            hint = _refusal(resp.status_code, self.sent)
            raise TrackerError(f"{self.uri}: {what}: {code}: {message}{hint}")
        return body if isinstance(body, dict) else {}

    # ------------------------------------------------------------------ experiments

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created when missing (a concurrent creator is fine)."""
        found = self._experiment(name)
        if found is not None:
            return found
        try:
            body = self.call("POST", "experiments/create", "create experiment", json={"name": name})
            return str(body["experiment_id"])
        except TrackerError:
            found = self._experiment(name)  # created meanwhile by another run
            if found is None:
                raise
            return found

    def _experiment(self, name: str) -> str | None:
        try:
            body = self.call(
                "GET",
                "experiments/get-by-name",
                "find experiment",
                params={"experiment_name": name},
            )
        except TrackerError as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc):
                return None
            raise
        exp = body.get("experiment", {})
        if exp.get("lifecycle_stage") == "deleted":
            raise TrackerError(
                f"{self.uri}: experiment {name!r} is deleted: restore it or name another"
            )
        return str(exp["experiment_id"])

    # ------------------------------------------------------------------ runs

    def find_runs(self, experiment_id: str, tag: str, value: str) -> list[dict[str, Any]]:
        """Active runs whose tag ``tag`` equals ``value``, oldest first (start time, id)."""
        quoted = value.replace("\\", "\\\\").replace("'", "\\'")
        runs: list[dict[str, Any]] = []
        token = None
        while True:
            body = self.call(
                "POST",
                "runs/search",
                "search runs",
                json={
                    "experiment_ids": [experiment_id],
                    "filter": f"tags.`{tag}` = '{quoted}'",
                    "max_results": 1000,
                    **({"page_token": token} if token else {}),
                },
            )
            runs += body.get("runs", [])
            token = body.get("next_page_token")
            if not token:
                break
        return sorted(
            runs, key=lambda r: (int(r["info"].get("start_time", 0)), r["info"]["run_id"])
        )

    def create_run(
        self, experiment_id: str, name: str, tags: Mapping[str, str], start_ms: int
    ) -> dict[str, Any]:
        body = self.call(
            "POST",
            "runs/create",
            "create run",
            json={
                "experiment_id": experiment_id,
                "run_name": name,
                "start_time": start_ms,
                "tags": [{"key": k, "value": v} for k, v in tags.items()],
            },
        )
        return body["run"]

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self.call("GET", "runs/get", "get run", params={"run_id": run_id})["run"]

    def delete_run(self, run_id: str) -> None:
        self.call("POST", "runs/delete", "delete run", json={"run_id": run_id})

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.call(
            "POST", "runs/set-tag", "set tag", json={"run_id": run_id, "key": key, "value": value}
        )

    def finish_run(self, run_id: str, status: str, end_ms: int) -> None:
        self.call(
            "POST",
            "runs/update",
            "update run status",
            json={"run_id": run_id, "status": status, "end_time": end_ms},
        )

    def log_batch(
        self,
        run_id: str,
        metrics: list[dict[str, Any]] = (),  # type: ignore[assignment]
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Metrics ({key, value, step, timestamp}), params and tags, in batches within
        MLflow's limits."""
        metrics = list(metrics)
        pairs = [("params", k, v) for k, v in (params or {}).items()]
        pairs += [("tags", k, v) for k, v in (tags or {}).items()]
        while metrics or pairs:
            chunk_m, metrics = metrics[:MAX_METRICS_PER_BATCH], metrics[MAX_METRICS_PER_BATCH:]
            room = min(MAX_PARAMS_TAGS_PER_BATCH, MAX_METRICS_PER_BATCH - len(chunk_m))
            chunk_p, pairs = pairs[:room], pairs[room:]
            self.call(
                "POST",
                "runs/log-batch",
                "log metrics, params and tags",
                json={
                    "run_id": run_id,
                    "metrics": chunk_m,
                    "params": [
                        {"key": k, "value": v} for kind, k, v in chunk_p if kind == "params"
                    ],
                    "tags": [{"key": k, "value": v} for kind, k, v in chunk_p if kind == "tags"],
                },
            )

    def metric_history(self, run_id: str, key: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        token = None
        while True:
            params = {"run_id": run_id, "metric_key": key, "max_results": 25000}
            if token:
                params["page_token"] = token
            body = self.call("GET", "metrics/get-history", "read metric history", params=params)
            out += body.get("metrics", [])
            token = body.get("next_page_token")
            if not token:
                return out

    # ------------------------------------------------------------------ artifacts

    def list_artifacts(self, run_id: str, path: str = "") -> Iterator[str]:
        """Every artifact file of the run (paths relative to its artifact root)."""
        params = {"run_id": run_id, **({"path": path} if path else {})}
        body = self.call("GET", "artifacts/list", "list artifacts", params=params)
        for entry in body.get("files", []):
            if entry.get("is_dir"):
                yield from self.list_artifacts(run_id, entry["path"])
            else:
                yield entry["path"]

    def upload_artifact(self, run: Mapping[str, Any], path: str, data: bytes) -> None:
        """PUT one file into the run's artifacts through the server's proxy."""
        root = str(run["info"].get("artifact_uri", ""))
        parsed = urllib.parse.urlparse(root)
        if parsed.scheme != PROXIED:
            raise TrackerError(
                f"{self.uri}: upload artifact: the run's artifact root is {parsed.scheme or root!r}"
                ", not served by the tracking server (start it with --serve-artifacts)"
            )
        where = "/".join(p for p in (parsed.path.strip("/"), path) if p)
        resp = self._request(
            "PUT",
            f"{ARTIFACTS_API}/{urllib.parse.quote(where)}",
            f"upload artifact {path}",
            data=data,
        )
        if resp.status_code != 200:
            text = resp.reason if resp.status_code in (401, 403) else redact_text(resp.text)
            raise TrackerError(
                f"{self.uri}: upload artifact {path}: HTTP {resp.status_code} "
                f"{text[:200]}{_refusal(resp.status_code, self.sent)}"
            )
