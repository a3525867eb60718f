"""A real MLflow tracking server for the tracking tests (not collected: no test_ prefix).

The server is the user's infrastructure, not scalelab's dependency: it runs from a venv of
its own (today's newest mlflow conflicts with the lock's pyarrow, so it never enters the
project's venv). The venv is made by the tests themselves, once per pinned version, under
``~/.cache/scalelab/mlflow-venv-<hash>`` (``python3 -m venv`` + ``pip install
mlflow==MLFLOW_VERSION``), and reused while present. The store is sqlite and the artifact
root a local directory, served through the server's mlflow-artifacts proxy
(``--serve-artifacts``, the default since MLflow 2).

``MlflowServer(..., auth=True)`` starts MLflow's own basic-auth app (``--app-name
basic-auth``, from the ``auth`` extra): its users live in a sqlite file beside the store,
and its admin, with a password made per server, comes from a ``basic_auth.ini`` named by
``MLFLOW_AUTH_CONFIG_PATH``. :meth:`MlflowServer.create_user` adds users through the
server's REST API with the admin's credentials.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: The server's version: one that exists on PyPI (the client side speaks its REST API).
MLFLOW_VERSION = "3.17.2"
#: What the venv installs: the server with its ``auth`` extra (Flask-WTF), so one venv
#: serves both the plain app and ``--app-name basic-auth``.
MLFLOW_REQUIREMENT = f"mlflow[auth]=={MLFLOW_VERSION}"
#: A module only the auth extra brings: a venv without it is not reused.
AUTH_PROBE = "flask_wtf"
#: Longest wait for a venv install (a cold pip cache downloads ~100 MB).
INSTALL_TIMEOUT_S = 1500
#: Longest wait for the server to answer its health check.
START_TIMEOUT_S = 120


def base_python() -> str:
    """The interpreter the server's venv is made from: python3 on PATH (as a user would),
    else the one running the tests."""
    return shutil.which("python3") or sys.executable


def venv_dir() -> Path:
    """~/.cache/scalelab/mlflow-venv-<hash of the requirement and the base interpreter's
    version>: a changed pin or extra is another venv, never an old one reused."""
    version = subprocess.run(
        [base_python(), "-c", "import sys; print(sys.version)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    key = hashlib.sha256(f"{MLFLOW_REQUIREMENT}\n{version}".encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "scalelab" / f"mlflow-venv-{key}"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv() -> Path:
    """The server's venv, made once. A lock file keeps two test runs from racing, and a
    marker written last tells a finished venv from one an interrupted install left."""
    venv = venv_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    marker = venv / "scalelab-complete"
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and _usable(venv):
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([base_python(), "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run(
            [
                str(venv_python(venv)),
                "-m",
                "pip",
                "install",
                "--quiet",
                MLFLOW_REQUIREMENT,
            ],
            check=True,
            timeout=INSTALL_TIMEOUT_S,
        )
        if not _usable(venv):
            raise RuntimeError(f"{venv}: mlflow {MLFLOW_VERSION} does not import after install")
        marker.write_text(f"{MLFLOW_REQUIREMENT}\n")
    return venv


def _usable(venv: Path) -> bool:
    py = venv_python(venv)
    if not py.exists():
        return False
    probe = subprocess.run(
        [str(py), "-c", f"import {AUTH_PROBE}, mlflow; print(mlflow.__version__)"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return probe.returncode == 0 and probe.stdout.strip() == MLFLOW_VERSION


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The basic-auth app's admin user (its password is made per server).
ADMIN_USER = "admin"


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite store and a local artifact root;
    ``auth``: behind MLflow's basic-auth app (see the module doc)."""

    def __init__(
        self, venv: Path, root: Path, port: int | None = None, *, auth: bool = False
    ) -> None:
        self.venv, self.root = venv, root
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.auth = auth
        #: The admin's (user, password) on an auth server, kept across restarts of ``root``.
        self.admin: tuple[str, str] | None = (ADMIN_USER, self._admin_password()) if auth else None

    def _admin_password(self) -> str:
        """The admin password of ``root``'s user store: made once, read again on a restart
        (MLflow takes it only when it creates the admin)."""
        path = self.root / "admin-password"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(18))
        return path.read_text()

    def _auth_env(self) -> dict[str, str]:
        """The basic-auth app's config file (written into ``root``) and its variable."""
        ini = self.root / "basic_auth.ini"
        assert self.admin is not None
        ini.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{self.root / 'basic_auth.db'}\n"
            f"admin_username = {self.admin[0]}\n"
            f"admin_password = {self.admin[1]}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # The app refuses to start without a static key for its forms' CSRF tokens.
        key = secrets.token_hex(16)
        return {**env, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": key}

    def create_user(self, user: str, password: str) -> None:
        """A user of the auth server, made by the admin through the REST API."""
        import requests

        resp = requests.post(
            f"{self.uri}/api/2.0/mlflow/users/create",
            json={"username": user, "password": password},
            auth=self.admin,
            timeout=60,
        )
        if resp.status_code != 200:
            raise RuntimeError(f"create user {user}: HTTP {resp.status_code} {resp.text[:300]}")

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 (the server's life)
        argv = [
            str(venv_python(self.venv)),
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--serve-artifacts",
            "--workers",
            "1",
        ]
        env = None
        if self.auth:
            argv += ["--app-name", "basic-auth"]
            env = self._auth_env()
        self.proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.root,
            env=env,
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import requests

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_tail()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server not ready in {START_TIMEOUT_S} s: {self.log_tail()}")

    def stop(self) -> None:
        """Stop the server's whole process group (gunicorn/uvicorn workers too)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def log_tail(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def read_back(
    venv: Path, uri: str, experiment: str, out: Path, auth: tuple[str, str] | None = None
) -> dict[str, Any]:
    """What the server holds for ``experiment``, read through MLflow's own client in the
    server's venv: every run (tags, params, metric histories) and its artifacts, downloaded
    under ``out``. ``auth``: the (user, password) it reads as (an auth server's admin)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    if auth is not None:
        env.update(MLFLOW_TRACKING_USERNAME=auth[0], MLFLOW_TRACKING_PASSWORD=auth[1])
    script = Path(__file__).with_name("scripts") / "mlflow_read_back.py"
    proc = subprocess.run(
        [str(venv_python(venv)), str(script), uri, experiment, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        raise AssertionError(f"read back failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout)


@contextlib.contextmanager
def running(venv: Path, root: Path, *, auth: bool = False) -> Iterator[MlflowServer]:
    server = MlflowServer(venv, root, auth=auth).start()
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":  # warm the cache by hand: python tests/mlflow_server.py
    print(ensure_venv())
