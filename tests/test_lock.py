"""The hashed environment locks (envs/lock-*.txt, made by envs/lock.sh with uv).

What a user relies on: the venv holds the lock setup.sh chose (every distribution
at its locked version), every pin carries sha256 hashes, both locks agree with
envs/requirements.txt, the CPU lock takes the CPU build of torch and the universal
PyPI lock PyPI's build, and Horovod's sdist is pinned by its hash.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, VENV_BIN

from scalelab import sysfacts

ENVS = REPO / "envs"


def entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of every requirement in a pip lock."""
    out: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", path.read_text()):
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", block)
        if m:
            name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
            out[name] = (m.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return out


def requirements() -> dict[str, str]:
    return sysfacts.lock_pins((ENVS / "requirements.txt").read_text())


@pytest.mark.parametrize("variant", ["cpu", "pypi"])
def test_lock_pins_every_requirement_with_hashes(variant):
    lock = entries(ENVS / f"lock-{variant}.txt")
    assert len(lock) > len(requirements())  # transitive dependencies are locked too
    for name, (_, hashes) in lock.items():
        assert hashes, f"{name} has no hash"
    for name, version in requirements().items():
        assert name in lock, f"{name} of requirements.txt missing from lock-{variant}.txt"
        assert lock[name][0].split("+")[0] == version, (name, lock[name][0], version)
    text = (ENVS / f"lock-{variant}.txt").read_text()
    assert "--find-links" not in text and "--index-url" not in text  # no host, no local path


def test_cpu_lock_takes_the_cpu_torch_and_pypi_lock_the_cuda_build():
    cpu, pypi = entries(ENVS / "lock-cpu.txt"), entries(ENVS / "lock-pypi.txt")
    assert cpu["torch"][0] == "2.13.0+cpu"
    assert not any(n.startswith("nvidia-") for n in cpu)
    assert pypi["torch"][0] == "2.13.0"
    assert any(n.startswith("nvidia-nccl") for n in pypi)
    assert any(n.startswith("nvidia-cudnn") for n in pypi)
    # On the CPU lock's target (Python 3.11 here) the two agree on everything they share:
    # one stack, two torch builds. (The universal lock may pin newer releases for newer
    # Pythons behind markers; lock_pins keeps the pins that apply to this interpreter.)
    here = sysfacts.lock_pins((ENVS / "lock-pypi.txt").read_text())
    shared = (set(cpu) & set(here)) - {"torch"}
    assert shared and all(cpu[n][0] == here[n] for n in shared), [
        (n, cpu[n][0], here[n]) for n in shared if cpu[n][0] != here[n]
    ]


def test_this_venv_is_the_lock_setup_chose():
    """setup.sh installed the lock it chose (a copy lies in the venv): every distribution
    that applies here at its locked version."""
    chosen = Path(sys.prefix) / sysfacts.VENV_LOCK
    assert chosen.is_file(), "setup.sh copies the lock it installed into the venv"
    assert chosen.read_text() in {(ENVS / f"lock-{v}.txt").read_text() for v in ("cpu", "pypi")}
    wrong = []
    for name, version in sysfacts.lock_pins(chosen.read_text()).items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != version:
            wrong.append(f"{name}: locked {version}, installed {have}")
    assert not wrong, wrong
    state = sysfacts.lock_state()
    assert state and state["installed_matches"], state


def test_horovod_sdist_pin_matches_build_script_default_and_pip_checks_it(tmp_path):
    pin = entries(ENVS / "lock-horovod.txt")["horovod"]
    script = (ENVS / "build_horovod.sh").read_text()
    assert f"HOROVOD_VERSION:-{pin[0]}" in script and "--require-hashes" in script
    bad = tmp_path / "bad.txt"
    wrong = hashlib.sha256(b"not the sdist").hexdigest()
    bad.write_text(f"horovod=={pin[0]} --hash=sha256:{wrong}\n")
    proc = subprocess.run(
        [
            str(VENV_BIN / "python"),
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--require-hashes",
            "-d",
            str(tmp_path / "d"),
            "-r",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "THESE PACKAGES DO NOT MATCH THE HASHES" in proc.stderr
    assert f"Got        {pin[1][0]}" in proc.stderr  # PyPI's sdist is the pinned file
