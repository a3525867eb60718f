"""./setup.sh as users meet it: plain PyPI, other Pythons, no root, no compiler.

- The universal PyPI lock installs, hashes checked, for Python 3.11 to 3.14 on x86_64 and
  aarch64: uv resolves it against the real registry without downloading the wheels.
- Each stopping up-front check is provoked for real (a Python 3.10, a Python without
  ensurepip, a full file system, an index that cannot be reached): one line, exit 2, and
  no .venv left behind.
- A set-up that reads torch from a localhost directory laid out like PyTorch's CPU index,
  on a machine whose C++ compiler is hidden: the CPU lock, one warning, no Horovod, and a
  training run that works.
- A non-root user, with shims that record any call to sudo, apt-get, dpkg, dnf or yum:
  ``./setup.sh --no-run`` and one short training, and no shim called.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import http.server
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, VENV_BIN, require

PYTHONS = ["3.11", "3.12", "3.13", "3.14"]
PLATFORMS = {"x86_64": "x86_64-manylinux_2_28", "aarch64": "aarch64-manylinux_2_28"}
LOCAL_TORCH = sorted(glob.glob("/opt/wheels/torch-2.13.0+cpu-cp311-*.whl"))


def needs_root() -> None:
    require(os.geteuid() == 0, "mounts and users need root (CI is root)")


def needs_local_torch() -> None:
    require(bool(LOCAL_TORCH), "no torch 2.13.0+cpu wheel in /opt/wheels on this machine")


def pypi_only_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a machine whose pip reads only PyPI: no local wheel directory, no
    extra index; the CA bundle stays (these machines reach PyPI through a TLS proxy)."""
    conf = tmp / "pip.conf"
    conf.write_text(
        "[global]\n" + (f"cert = {os.environ['PIP_CERT']}\n" if os.environ.get("PIP_CERT") else "")
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            (
                "PIP_FIND_LINKS",
                "PIP_EXTRA_INDEX_URL",
                "PIP_INDEX_URL",
                "UV_",
                "VIRTUAL_ENV",
                "PYTHONPATH",
            )
        )
    }
    env["PIP_CONFIG_FILE"] = str(conf)
    # The test's venv must not come first: setup.sh finds its own interpreter.
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != str(VENV_BIN))
    env.update(extra)
    return env


def setup_copy(dest: Path) -> Path:
    """The files setup.sh reads before it installs anything: itself and envs/."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "setup.sh", dest / "setup.sh")
    shutil.copytree(REPO / "envs", dest / "envs")
    return dest


def checkout_copy(dest: Path) -> Path:
    """The checkout as a clone has it: tracked and not-ignored files, no .venv or results."""
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if src.is_file() or src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel, follow_symlinks=False)
    return dest


def assert_stopped(proc: subprocess.CompletedProcess, where: Path, *words: str) -> str:
    """A stopping check: exit 2, one error line naming the fix, nothing half-installed."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("setup.sh: error: "), proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not (where / ".venv").exists(), "a stopped set-up left a .venv behind"
    return lines[0]


# -- the universal lock ---------------------------------------------------------------------
@pytest.mark.parametrize("machine", sorted(PLATFORMS))
@pytest.mark.parametrize("python", PYTHONS)
def test_pypi_lock_installs_for_every_python_and_platform(python, machine, tmp_path):
    """uv resolves envs/lock-pypi.txt with --require-hashes against PyPI for the target (a
    second each; nothing large is downloaded). pip cannot: one Snakemake dependency is an
    sdist it would have to build."""
    env = pypi_only_env(
        tmp_path,
        SSL_CERT_FILE=os.environ.get("PIP_CERT", "") or "/etc/ssl/certs/ca-certificates.crt",
        UV_CACHE_DIR=str(tmp_path / "uv"),
    )
    proc = subprocess.run(
        [
            str(VENV_BIN / "uv"),
            "pip",
            "install",
            "--dry-run",
            "--require-hashes",
            "--python-version",
            python,
            "--python-platform",
            PLATFORMS[machine],
            "--target",
            str(tmp_path / "target"),
            "-r",
            str(REPO / "envs" / "lock-pypi.txt"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        pytest.fail(
            f"envs/lock-pypi.txt does not install for Python {python} on {machine}: {last}",
            pytrace=False,
        )
    assert "torch==2.13.0" in proc.stderr + proc.stdout
    assert not list((tmp_path / "target").glob("*.dist-info"))  # a dry run installs nothing


# -- stopping checks, each provoked for real ---------------------------------------------------
def test_a_python_older_than_3_11_stops_before_anything(tmp_path):
    old = sorted(
        glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3"))
        + glob.glob("/usr/bin/python3.10")
    )
    require(bool(old), "no Python 3.10 on this machine (pyenv has one on the project's machines)")
    where = setup_copy(tmp_path / "co")
    proc = subprocess.run(
        ["bash", "setup.sh", "--no-run"],
        cwd=where,
        capture_output=True,
        text=True,
        env=pypi_only_env(tmp_path, PYTHON=old[0]),
        timeout=120,
    )
    assert_stopped(proc, where, "Python 3.10", "3.11 to 3.14", "PYTHON=")


def test_a_python_without_venv_and_no_uv_stops_and_names_the_fix(tmp_path):
    """As on Debian/Ubuntu without python3.X-venv: ensurepip cannot be imported."""
    shadow = tmp_path / "shadow" / "ensurepip"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('ensurepip is not installed')\n")
    where = setup_copy(tmp_path / "co")
    env = pypi_only_env(tmp_path, PYTHONPATH=str(shadow.parent))
    env["PATH"] = os.pathsep.join(
        p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "uv").exists()
    )
    proc = subprocess.run(
        ["bash", "setup.sh", "--no-run"],
        cwd=where,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert_stopped(proc, where, "no venv module", "-venv", "uv")


def test_a_full_file_system_stops_before_any_download(tmp_path):
    needs_root()
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    try:
        where = setup_copy(small / "co")
        proc = subprocess.run(
            ["bash", "setup.sh", "--no-run"],
            cwd=where,
            capture_output=True,
            text=True,
            env=pypi_only_env(tmp_path),
            timeout=120,
        )
        assert_stopped(proc, where, "MB free", "GB")
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_torch_unreachable_stops_and_removes_the_new_venv(tmp_path):
    """pip's only index refuses connections (a login node behind a firewall)."""
    where = setup_copy(tmp_path / "co")
    env = pypi_only_env(
        tmp_path, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0", PIP_TIMEOUT="5"
    )
    proc = subprocess.run(
        ["bash", "setup.sh", "--no-run"],
        cwd=where,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert_stopped(proc, where, "torch 2.13.0 cannot be found", "--torch-index")


# -- a CPU index on localhost, no C++ compiler -------------------------------------------------
class _Index(http.server.SimpleHTTPRequestHandler):
    """A static server that remembers which files it sent."""

    sent: list[str]

    def log_message(self, fmt: str, *args: object) -> None:  # quiet, but recorded
        self.sent.append(self.path)


@contextlib.contextmanager
def cpu_index(root: Path) -> Iterator[str]:
    """A directory laid out like PyTorch's CPU index (PEP 503: simple/torch/ with the wheel,
    '+' percent-encoded as there), served over HTTP on localhost."""
    torch_dir = root / "simple" / "torch"
    torch_dir.mkdir(parents=True)
    wheel = Path(LOCAL_TORCH[0])
    os.symlink(wheel, torch_dir / wheel.name)
    href = wheel.name.replace("+", "%2B")
    (torch_dir / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="{href}">{wheel.name}</a></body></html>\n'
    )
    (root / "simple" / "index.html").write_text('<a href="torch/">torch</a>\n')
    handler = type("Handler", (_Index,), {"sent": []})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple", handler.sent
    finally:
        server.shutdown()


def hide_compilers() -> list[str]:
    """Shell lines that, inside a private mount namespace, make every C++ compiler on PATH
    a non-executable file, as on a login node without a compiler."""
    real = set()
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            real.add(os.path.realpath(found))
    return [f"mount --bind /dev/null {shlex.quote(p)}" for p in sorted(real)]


TRAIN_CONFIG = """seed: 7
model: {name: cnn, options: {width: 8, hidden: 32}}
data: {source: synthetic, num_samples: 128, val_samples: 32, image_shape: [3, 16, 16],
       num_classes: 4}
optim: {global_batch_size: 32, lr: 0.05}
train: {epochs: 1, threads: 1, progress: false}
metrics: {warmup_steps: 1}
"""


@pytest.mark.setup
def test_cpu_index_on_localhost_and_no_compiler_gives_cpu_lock_without_horovod(tmp_path):
    needs_root()
    needs_local_torch()
    where = checkout_copy(tmp_path / "co")
    (where / "train.yaml").write_text(TRAIN_CONFIG)
    with cpu_index(tmp_path / "index") as (url, sent):
        script = "\n".join(
            [
                "set -e",
                *hide_compilers(),
                'for c in c++ g++; do [ ! -x "$(command -v $c)" ]; done',
                f"bash setup.sh --no-run --torch-index {shlex.quote(url)}",
                ".venv/bin/scalelab train --config train.yaml --out run",
            ]
        )
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
            cwd=where,
            capture_output=True,
            text=True,
            env=pypi_only_env(tmp_path),
            timeout=900,
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert any(p.endswith(".whl") and "torch-2.13.0" in p for p in sent), sent
    assert "torch 2.13.0+cpu found" in proc.stdout
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("setup.sh: warning:")]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0], proc.stderr
    assert (where / ".venv" / "scalelab-lock.txt").read_text() == (
        REPO / "envs" / "lock-cpu.txt"
    ).read_text()
    assert not list((where / ".venv").glob("lib/python*/site-packages/horovod"))
    assert "mode local: ready" in proc.stdout
    assert (where / "run" / "summary.json").is_file()


# -- no root ------------------------------------------------------------------------------
SHIMS = ("sudo", "apt-get", "apt", "dpkg", "dpkg-query", "dnf", "yum")


@pytest.fixture
def plain_user() -> Iterator[tuple[str, Path]]:
    """A user the test creates, with a home it owns in a directory every user may enter
    (pytest's own tmp directories are root's alone)."""
    needs_root()
    name = f"sl{uuid.uuid4().hex[:8]}"
    base = Path(tempfile.mkdtemp(prefix="scalelab-nonroot-"))
    base.chmod(0o755)
    home = base / name
    subprocess.run(
        [
            "useradd",
            "--no-user-group",
            "--gid",
            "users",
            "--home-dir",
            str(home),
            "--create-home",
            "--shell",
            "/bin/bash",
            name,
        ],
        check=True,
    )
    try:
        yield name, home
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], check=False)
        subprocess.run(["userdel", name], check=False)
        shutil.rmtree(base, ignore_errors=True)


def elf_runpath(lib: Path) -> list[str]:
    """The RUNPATH entries of a shared library, as `readelf -d` prints them."""
    out = subprocess.run(
        ["readelf", "-d", str(lib)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    found = re.search(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.*)\]", out)
    return found.group(1).split(":") if found else []


def horovod_cache() -> Path:
    """The Horovod wheel cache setup.sh filled for this machine's venv."""
    root = Path(os.environ.get("SCALELAB_CACHE", Path.home() / ".cache" / "scalelab"))
    wheels = sorted(root.glob("wheels/horovod*-cp311-cpu/horovod-*.whl"))
    assert wheels, f"no cached Horovod wheel under {root}/wheels (setup.sh builds one)"
    return wheels[0].parent


@pytest.mark.setup
def test_setup_as_a_plain_user_never_calls_sudo_or_a_package_manager(plain_user):
    name, home = plain_user
    base = home.parent
    user = pwd.getpwnam(name)
    where = checkout_copy(home / "scalelab")
    (where / "train.yaml").write_text(TRAIN_CONFIG)
    shims = home / "shims"
    shims.mkdir()
    calls = home / "calls.log"
    for tool in SHIMS:
        (shims / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\nexit 1\n')
        (shims / tool).chmod(0o755)
    # The read-only Horovod cache: a copy nobody can write, keyed as setup.sh keys it.
    cache = base / "ro-cache"
    shutil.copytree(horovod_cache(), cache / "wheels" / horovod_cache().name)
    for p in [cache, *cache.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(home)], check=True)
    env = pypi_only_env(
        base,
        HOME=str(home),
        USER=name,
        LOGNAME=name,
        PYTHON="/usr/bin/python3",
        SCALELAB_CACHE=str(cache),
        PATH=f"{shims}:/usr/local/bin:/usr/bin:/bin",
        PIP_FIND_LINKS=os.environ.get("PIP_FIND_LINKS", ""),
    )
    (base / "pip.conf").chmod(0o644)
    script = (
        "bash setup.sh --no-run && "
        ".venv/bin/scalelab train --config train.yaml --out run && "
        ".venv/bin/python -c 'import horovod.torch as hvd; print(\"horovod ok\")'"
    )
    proc = subprocess.run(
        [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--init-groups",
            "bash",
            "-c",
            script,
        ],
        cwd=where,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not calls.exists(), f"setup called: {calls.read_text()}"
    assert "using cached Horovod wheel" in proc.stdout
    # The cached wheel was built for another venv: it finds this venv's libmpi and torch
    # libraries relative to itself, and names no directory of the venv that built it.
    (ext,) = (where / ".venv").glob("lib/python3*/site-packages/horovod/torch/mpi_lib_v2*.so")
    runpath = elf_runpath(ext)
    assert runpath and all(e.startswith("$ORIGIN/") for e in runpath), runpath
    resolved = {(ext.parent / e.removeprefix("$ORIGIN/")).resolve() for e in runpath}
    assert (where / ".venv" / "lib").resolve() in resolved, runpath
    assert "horovod ok" in proc.stdout
    assert (where / "run" / "summary.json").is_file()
