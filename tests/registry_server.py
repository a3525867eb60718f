"""A real OCI registry for tests: Debian's `docker-registry` (CNCF distribution 2.8), over
TLS from a CA made here with openssl, optionally behind htpasswd (bcrypt) credentials.

Not a stand-in: the registry binary is the one envs/test_env.sh installs. The certificate
names the registry's IP address in subjectAltName; the trust bundle handed to Apptainer
(and to scalelab's own manifest request) through SSL_CERT_FILE is that CA plus the system
bundle, so the same environment still reaches public hosts.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml
from conftest import require

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca_and_cert(d: Path, addr: str) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key): a CA, and a server certificate
    it signed for ``addr`` (an IP address in subjectAltName)."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=scalelab test registry CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    _openssl("req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", f"/CN={addr}", cwd=d)
    (d / "ext.cnf").write_text(
        f"subjectAltName=IP:{addr}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "srv.crt", "-days", "2", "-extfile", "ext.cnf",
        cwd=d,
    )  # fmt: skip
    return d / "ca.crt", d / "srv.crt", d / "srv.key"


def make_key_pair(d: Path, name: str) -> tuple[Path, Path]:
    """(private, public) PEM keys for `apptainer sign --key` / `verify --key` (ECDSA P-256)."""
    d.mkdir(parents=True, exist_ok=True)
    private, public = d / f"{name}.pem", d / f"{name}.pub"
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-out", str(private), cwd=d,
    )  # fmt: skip
    _openssl("pkey", "-in", str(private), "-pubout", "-out", str(public), cwd=d)
    return private, public


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


@dataclass
class Registry:
    """A running registry: where it listens, what trusts it, who may log in."""

    addr: str
    port: int
    bundle: Path
    """CA + the system's bundle: what SSL_CERT_FILE names for clients."""
    ca: Path
    log: Path
    user: str | None
    password: str | None
    proc: subprocess.Popen

    @property
    def host(self) -> str:
        return f"{self.addr}:{self.port}"

    def ref(self, name: str) -> str:
        return f"oras://{self.host}/{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _wait_ready(reg: Registry, timeout: float = 30) -> None:
    """Until /v2/ answers over TLS (200, or 401 when it wants credentials)."""
    ctx = ssl.create_default_context(cafile=str(reg.ca))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"https://{reg.host}/v2/", context=ctx, timeout=5):
                return
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                return
            raise
        except (urllib.error.URLError, OSError):
            if reg.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"docker-registry did not start:\n{reg.log.read_text()[-3000:]}"
                ) from None
            time.sleep(0.2)


def start_registry(
    d: Path, *, addr: str = "127.0.0.1", user: str | None = None, password: str | None = None
) -> Registry:
    """Start `docker-registry serve` on ``addr``, TLS from a fresh CA, htpasswd auth when
    ``user`` is given; the caller stops it."""
    exe = shutil.which("docker-registry")
    require(
        exe is not None,
        "docker-registry not installed (Debian's package; envs/test_env.sh installs it)",
    )
    ca, cert, key = make_ca_and_cert(d / "pki", addr)
    bundle = d / "pki" / "bundle.pem"
    bundle.write_text(ca.read_text() + SYSTEM_BUNDLE.read_text())
    config = {
        "version": 0.1,
        "log": {"level": "info"},
        "storage": {"filesystem": {"rootdirectory": str(d / "store")}},
        "http": {"addr": "", "tls": {"certificate": str(cert), "key": str(key)}},
    }
    if user:
        require(shutil.which("htpasswd") is not None, "htpasswd missing (apache2-utils)")
        htpasswd = d / "pki" / "htpasswd"
        subprocess.run(
            ["htpasswd", "-B", "-c", "-i", str(htpasswd), user],
            input=password,
            text=True,
            check=True,
            capture_output=True,
            timeout=60,
        )
        config["auth"] = {"htpasswd": {"realm": "scalelab-test", "path": str(htpasswd)}}
    port = _free_port(addr)
    config["http"]["addr"] = f"{addr}:{port}"
    cfg = d / "registry.yml"
    cfg.write_text(yaml.safe_dump(config))
    log = d / "registry.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [exe, "serve", str(cfg)], stdout=out, stderr=subprocess.STDOUT, cwd=d
        )
    reg = Registry(addr, port, bundle, ca, log, user, password, proc)
    try:
        _wait_ready(reg)
    except BaseException:
        reg.stop()
        raise
    return reg


def client_env(reg: Registry, home: Path, base: dict[str, str]) -> dict[str, str]:
    """A client's environment: the registry trusted, Apptainer's login store and cache of
    its own (APPTAINER_CONFIGDIR, APPTAINER_CACHEDIR) so no test touches ~/.apptainer."""
    env = dict(base)
    env.update(
        SSL_CERT_FILE=str(reg.bundle),
        APPTAINER_CONFIGDIR=str(home / "apptainer"),
        APPTAINER_CACHEDIR=str(home / "cache"),
    )
    os.makedirs(home / "apptainer", exist_ok=True)
    return env


def login(env: dict[str, str], reg: Registry) -> None:
    """`apptainer registry login` into the login store ``env`` names (password on stdin)."""
    subprocess.run(
        ["apptainer", "registry", "login", "--username", str(reg.user), "--password-stdin"]
        + [f"oras://{reg.host}"],
        input=reg.password,
        text=True,
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )


def build_tiny_sif(d: Path, apptainer: str) -> Path:
    """A real SIF of a few KB, `apptainer build` from a sandbox directory (no network, under
    a second): the registry round trip costs seconds, not the CPU image's minutes."""
    sandbox = d / "sandbox"
    (sandbox / "etc").mkdir(parents=True, exist_ok=True)
    (sandbox / "etc" / "scalelab-test").write_text("a tiny image for the registry tests\n")
    out = d / "tiny.sif"
    subprocess.run(
        [apptainer, "build", "--force", str(out), str(sandbox)],
        check=True,
        capture_output=True,
        timeout=120,
        env={**os.environ, "APPTAINER_CACHEDIR": str(d / "cache")},
    )
    return out
