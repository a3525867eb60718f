"""A real MLflow tracking server for the tracking tests (not collected: no test_ prefix).

The server is the user's infrastructure, not scalelab's dependency: it runs from a venv of
its own (today's newest mlflow conflicts with the lock's pyarrow, so it never enters the
project's venv). The venv is made by the tests themselves, once per pinned version, under
``~/.cache/scalelab/mlflow-venv-<hash>`` (``python3 -m venv`` + ``pip install
mlflow==MLFLOW_VERSION``), and reused while present. The store is sqlite and the artifact
root a local directory, served through the server's mlflow-artifacts proxy
(``--serve-artifacts``, the default since MLflow 2).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
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
#: Longest wait for a venv install (a cold pip cache downloads ~100 MB).
INSTALL_TIMEOUT_S = 1500
#: Longest wait for the server to answer its health check.
START_TIMEOUT_S = 120


def base_python() -> str:
    """The interpreter the server's venv is made from: python3 on PATH (as a user would),
    else the one running the tests."""
    return shutil.which("python3") or sys.executable


def venv_dir() -> Path:
    """~/.cache/scalelab/mlflow-venv-<hash of the pin and the base interpreter's version>."""
    version = subprocess.run(
        [base_python(), "-c", "import sys; print(sys.version)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    key = hashlib.sha256(f"mlflow=={MLFLOW_VERSION}\n{version}".encode()).hexdigest()[:12]
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
                f"mlflow=={MLFLOW_VERSION}",
            ],
            check=True,
            timeout=INSTALL_TIMEOUT_S,
        )
        if not _usable(venv):
            raise RuntimeError(f"{venv}: mlflow {MLFLOW_VERSION} does not import after install")
        marker.write_text(f"mlflow=={MLFLOW_VERSION}\n")
    return venv


def _usable(venv: Path) -> bool:
    py = venv_python(venv)
    if not py.exists():
        return False
    probe = subprocess.run(
        [str(py), "-c", "import mlflow; print(mlflow.__version__)"],
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


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite store and a local artifact root."""

    def __init__(self, venv: Path, root: Path, port: int | None = None) -> None:
        self.venv, self.root = venv, root
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

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
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root
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


def read_back(venv: Path, uri: str, experiment: str, out: Path) -> dict[str, Any]:
    """What the server holds for ``experiment``, read through MLflow's own client in the
    server's venv: every run (tags, params, metric histories) and its artifacts, downloaded
    under ``out``."""
    script = Path(__file__).with_name("scripts") / "mlflow_read_back.py"
    proc = subprocess.run(
        [str(venv_python(venv)), str(script), uri, experiment, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
    )
    if proc.returncode != 0:
        raise AssertionError(f"read back failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout)


@contextlib.contextmanager
def running(venv: Path, root: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(venv, root).start()
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":  # warm the cache by hand: python tests/mlflow_server.py
    print(ensure_venv())
