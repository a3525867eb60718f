"""Charliecloud for real: ch-run on the tree scalelab derives from the session's verified CPU
SIF, the image's own torch and scalelab, a 1-rank training equal to the same run under
`apptainer exec` of that SIF, and the derivation's refusals (a tampered SIF; a killed unpack).

No stand-in: `ch-run` and `unsquashfs` are Debian's (charliecloud 0.31, squashfs-tools),
installed by envs/test_env.sh. CI (SCALELAB_REQUIRE_CLUSTER=1) fails, never skips, without.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import VENV_BIN, require, run, tool_env
from container_image import SCALELAB, require_apptainer, session_image

from scalelab.container import charliecloud

PY = str(VENV_BIN / "python")
pytestmark = pytest.mark.timeout(2400)  # the first test may wait for a cold image build


def require_ch_run() -> str:
    """The real ch-run (and unsquashfs); conftest.require: a skip off CI, a failure in CI."""
    path = shutil.which("ch-run")
    require(
        path is not None and shutil.which("unsquashfs") is not None,
        "charliecloud or squashfs-tools not installed (./setup.sh --test-env)",
    )
    assert path is not None
    return path


@pytest.fixture(scope="session")
def cpu_image() -> dict:
    require_ch_run()
    return session_image()


def ch_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The tools' environment with $USER, which ch-run requires."""
    return charliecloud.ch_env(tool_env(extra))


def linked_sif(cpu_image: dict, where: Path) -> Path:
    """The session SIF under ``where`` (a hard link where possible): the derived tree lands
    beside it, in this test's directory."""
    where.mkdir(parents=True, exist_ok=True)
    out = where / "scalelab-cpu.sif"
    try:
        os.link(cpu_image["path"], out)
    except OSError:
        shutil.copyfile(cpu_image["path"], out)
    return out


def ch_exec(image: Path, cmd: list[str], binds: list[Path] = (), timeout: float = 600):
    argv = [SCALELAB, "container", "exec", "--runtime", "charliecloud", "--no-nv"]
    argv += ["--image", str(image), *(f"--bind={b}" for b in binds), "--", *cmd]
    return run(argv, env=ch_env(), timeout=timeout)


@pytest.fixture(scope="module")
def derived(cpu_image, tmp_path_factory) -> Path:
    return linked_sif(cpu_image, tmp_path_factory.mktemp("ch"))


def test_derived_tree_runs_the_images_torch_and_scalelab(cpu_image, derived):
    probe = (
        "import sys, shutil, torch, scalelab; print(sys.prefix); print(scalelab.__file__); "
        "print(shutil.which('scalelab')); print(torch.__version__)"
    )
    # The host venv first on PATH (tool_env): the image's own must still win.
    out = ch_exec(derived, ["/opt/venv/bin/python", "-c", probe]).stdout
    prefix, module, exe, version = out.splitlines()[-4:]
    assert prefix == "/opt/venv" and exe == "/opt/venv/bin/scalelab"
    assert module.startswith("/opt/venv/lib/python3.11/site-packages/scalelab/")
    assert version.startswith("2.13.0")
    tree = charliecloud.image_dir(derived, cpu_image["sha256"])
    assert tree.is_dir() and (tree / "opt/venv/bin/python").exists()
    env = dict(line.split("=", 1) for line in (tree / "ch/environment").read_text().splitlines())
    assert env["PATH"].startswith("/opt/venv/bin:") and env["LD_LIBRARY_PATH"] == "/opt/venv/lib"
    # Reused while present: a second exec does not unpack again (same inode, fast).
    inode, t0 = tree.stat().st_ino, time.monotonic()
    ch_exec(derived, ["/bin/true"])
    assert tree.stat().st_ino == inode and time.monotonic() - t0 < 15


def _staged(root: Path) -> Path:
    data = root / "synthetic"
    run(
        [PY, "-m", "scalelab", "data", "stage", "--source", "synthetic", "--num-samples", "200"]
        + ["--num-classes", "4", "--image-size", "8", "8", "--shards", "2"]
        + ["--out", str(data), "--quiet"],
        timeout=300,
    )
    return data


def _train_config(root: Path, data: Path) -> Path:
    cfg = {
        "seed": 5,
        "model": {"name": "cnn"},
        "data": {"source": "staged", "path": str(data)},
        "optim": {"global_batch_size": 32, "lr": 0.05},
        "train": {"epochs": 1, "threads": 1, "deterministic": True},
        "dist": {"backend": "none"},
    }
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_training_under_ch_run_equals_apptainer_exec_of_the_same_sif(cpu_image, derived, tmp_path):
    cfg = _train_config(tmp_path, _staged(tmp_path))
    ch_out, app_out = tmp_path / "run-ch", tmp_path / "run-apptainer"
    train = ["scalelab", "train", "--config", str(cfg)]
    ch_exec(derived, [*train, "--out", str(ch_out)], binds=[tmp_path])
    run(
        [require_apptainer(), "exec", "--userns", "--bind", str(tmp_path)]
        + [str(cpu_image["path"]), *train, "--out", str(app_out)],
        env=tool_env(),
        timeout=600,
    )
    s_ch = json.loads((ch_out / "summary.json").read_text())
    s_app = json.loads((app_out / "summary.json").read_text())
    assert s_ch["global_steps"] == s_app["global_steps"] > 0
    # The same image's torch on the same CPU, deterministic: the same bytes; and the host
    # venv (the image's pins are the venv's) gives them too (measured: all three equal).
    host = tmp_path / "run-host"
    run([PY, "-m", "scalelab", *train[1:], "--out", str(host)], timeout=600)
    assert _sha256(ch_out / "model.pt") == _sha256(app_out / "model.pt")
    assert _sha256(host / "model.pt") == _sha256(ch_out / "model.pt")


def test_a_tampered_sif_is_refused_before_anything_is_unpacked(cpu_image, tmp_path):
    image = tmp_path / "img" / "scalelab-cpu.sif"
    image.parent.mkdir()
    shutil.copyfile(cpu_image["path"], image)
    with open(image, "r+b") as f:  # one byte inside the SquashFS partition
        f.seek(image.stat().st_size // 2)
        byte = f.read(1)
        f.seek(image.stat().st_size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "container": {
                    "image": str(image),
                    "sha256": cpu_image["sha256"],
                    "runtime": "charliecloud",
                    "nv": False,
                }
            }
        )
    )
    proc = run(
        [SCALELAB, "container", "exec", "--config", str(config), "--", "/bin/true"],
        env=ch_env(),
        check=False,
    )
    assert proc.returncode != 0 and "sha256 mismatch" in proc.stderr, proc.stderr
    assert sorted(p.name for p in image.parent.iterdir()) == ["scalelab-cpu.sif"]


_DERIVE = """
import sys
from scalelab.container import charliecloud
charliecloud.derive(sys.argv[1], sys.argv[2], sys.argv[3])
"""


def test_an_interrupted_unpack_leaves_nothing_that_looks_ready(cpu_image, tmp_path):
    ch_run = require_ch_run()
    image = linked_sif(cpu_image, tmp_path / "img")
    ready = charliecloud.image_dir(image, cpu_image["sha256"])
    args = [sys.executable, "-c", _DERIVE, str(image), cpu_image["sha256"], ch_run]
    proc = subprocess.Popen(args, env=ch_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        partial: list[Path] = []
        while not partial and time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in image.parent.iterdir() if ".partial-" in p.name]
            time.sleep(0.05)
        assert partial, "no partial tree appeared"
        time.sleep(1)  # let unsquashfs write part of the tree
        os.killpg(proc.pid, signal.SIGKILL)  # the derivation and its unsquashfs
    finally:
        proc.wait(timeout=60)
    assert not ready.exists()
    assert [p.name for p in image.parent.iterdir() if p.name.startswith("sha256-")] == []
    # Derived again from scratch: the ready tree, which runs.
    got = charliecloud.derive(image, cpu_image["sha256"], ch_run)
    assert got == ready and (ready / charliecloud.ENV_FILE).is_file()
    out = run([ch_run, str(ready), "--", "/bin/echo", "ok"], env=ch_env()).stdout
    assert out.strip() == "ok"


def test_partial_trees_of_dead_unpacks_are_removed_and_young_ones_kept(tmp_path):
    """A killed unpack leaves a hidden partial tree (gigabytes on the shared filesystem);
    the next derivation removes the ones no live unpack can own, and only those."""
    final = tmp_path / "sha256-ab.ch"
    old, young = (final.with_name(f".{final.name}.partial-{n}-0000") for n in (1, 2))
    for d in (old, young):
        (d / "usr" / "bin").mkdir(parents=True)
        (d / "usr" / "bin" / "x").write_text("x")
        (d / "usr").chmod(0o555)  # read-only directories, as unsquashfs leaves them
    hours_ago = time.time() - charliecloud.STALE_PARTIAL_S - 60
    os.utime(old, (hours_ago, hours_ago))
    other = tmp_path / ".sha256-cd.ch.partial-3-0000"  # another image's: not this one's
    other.mkdir()
    os.utime(other, (hours_ago, hours_ago))
    assert charliecloud.remove_stale_partials(final) == [old]
    assert not old.exists() and young.is_dir() and other.is_dir()
