"""Podman for real: `podman run --rootfs` on the tree scalelab derives from the session's
verified CPU SIF (the tree Charliecloud runs), the image's own torch and scalelab, a 1-rank
training equal to the same run under `apptainer exec`, a 2-rank mpirun with each rank in its
own `podman run` equal to the same 2 ranks under Apptainer, and a tampered SIF refused.
The argument lists and refusals first (no podman needed for those).

No stand-in: `podman` is Debian's 4.3.1 (envs/test_env.sh installs it). CI
(SCALELAB_REQUIRE_CLUSTER=1) fails, never skips, without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import VENV_BIN, require, run, tool_env
from container_image import SCALELAB, require_apptainer, session_image

from scalelab import launcher
from scalelab.container import charliecloud, podman, runtime
from scalelab.container.config import ContainerConfig
from scalelab.container.wiring import exec_prefix, inside_image_info
from scalelab.errors import UsageError

PY = str(VENV_BIN / "python")
SHA = "ab" * 32
pytestmark = pytest.mark.timeout(2400)  # the first real test may wait for a cold image build


# ---- argument lists and refusals ------------------------------------------------------------


def _cfg(**kw) -> ContainerConfig:
    return ContainerConfig.from_mapping({"image": "/img/x.sif", "runtime": "podman", **kw})


def test_podman_argv_names_the_derived_tree_and_the_hpc_namespaces(monkeypatch):
    monkeypatch.setattr(runtime, "require", lambda *a, **k: runtime.Runtime("podman", "/p"))
    c = _cfg(nv=False, binds=["/data", "/scratch:/s:ro"], exec_flags=["--cgroups=disabled"])
    argv = exec_prefix(
        c, c.bind_specs, (("A", "1"),), pwd="/work", sha256=SHA, command=["x"], derive=False
    )
    tree = str(charliecloud.image_dir("/img/x.sif", SHA))
    assert argv[0] == "podman" and argv[argv.index("run") :][:2] == ["run", "--rm"]
    assert argv[1 : argv.index("run")] == podman.global_flags()
    for flag in ("--read-only", "--network=host", "--ipc=host", "--pid=host"):
        assert flag in argv
    assert argv[-3:] == ["--rootfs", tree, "x"]
    pairs = [argv[i + 1] for i, a in enumerate(argv) if a == "-v"]
    assert pairs == ["/data:/data", "/scratch:/s:ro", "/work:/work"]
    assert f"--env-file={tree}/ch/environment" in argv
    envs = [a for a in argv if a.startswith("--env=")]
    # The host's rank variables first, then ours (podman: the last value wins).
    assert envs.index("--env=OMPI_*") < envs.index("--env=A=1")
    assert envs[-3:] == [
        "--env=SCALELAB_IMAGE_PATH=/img/x.sif",
        f"--env=SCALELAB_IMAGE_SHA256={SHA}",
        "--env=SCALELAB_CONTAINER_RUNTIME=podman",  # how the rank knows (podman.inside)
    ]
    assert "--workdir=/work" in argv and argv.index("--cgroups=disabled") < argv.index("--rootfs")
    assert "--device=nvidia.com/gpu=all" not in argv
    want = [f"--ulimit={u}" for u in podman.ulimits()]
    assert [a for a in argv if a.startswith("--ulimit=")] == want
    assert ("--userns=keep-id" in argv) == (os.geteuid() != 0)
    assert not Path(tree).exists()  # derive=False: only named


def test_nv_maps_to_the_cdi_device_and_ulimits_are_this_processs():
    argv = runtime.podman_run_argv("podman", "/t", ["x"], nv=True)
    assert "--device=nvidia.com/gpu=all" in argv
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        assert f"nofile={soft}:{hard}" in podman.ulimits()
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for u in podman.ulimits():
        if u.startswith("nproc="):
            assert max(int(v) for v in u[6:].split(":")) <= pid_max


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"userns": True}, "userns"), ({"image": "oras://h/x:1"}, "image")],
)
def test_what_podman_cannot_map_is_refused_in_one_line(changes, field):
    with pytest.raises(UsageError) as err:
        _cfg(**changes)
    assert str(err.value).startswith(f"container.{field}: ") and "\n" not in str(err.value)


def test_inside_image_info_knows_podman(monkeypatch):
    for var in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER", "CH_RUNNING"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SCALELAB_IMAGE_PATH", "/img/x.sif")
    monkeypatch.delenv(podman.MARK_VAR, raising=False)
    monkeypatch.delenv(podman.RUNTIME_VAR[0], raising=False)
    monkeypatch.setattr(podman, "CONTAINERENV", Path("/nonexistent/.containerenv"))
    assert inside_image_info() is None
    monkeypatch.setenv(*podman.RUNTIME_VAR)
    assert inside_image_info()["image"] == "/img/x.sif"


@pytest.mark.parametrize("name", ["podman", "charliecloud"])
def test_a_launch_dry_run_derives_no_tree(name, tmp_path, monkeypatch):
    """`scalelab launch --dry-run` names the tree but unpacks nothing (the image here is not
    even a SIF: a derivation would fail)."""
    exe = runtime.EXECUTABLES[name]
    monkeypatch.setattr(runtime, "require", lambda *a, **k: runtime.Runtime(exe, exe))
    image = tmp_path / "x.sif"
    image.write_bytes(b"not a sif")
    section = {"enabled": True, "image": str(image), "runtime": name, "nv": False}
    prefix, prov = launcher.container_setup(section, {}, dry_run=True)
    tree = charliecloud.image_dir(image, prov["sha256"])
    assert str(tree) in prefix and not tree.exists()
    with pytest.raises(UsageError):  # without dry_run it derives, which this file refuses
        launcher.container_setup(section, {})


# ---- for real --------------------------------------------------------------------------------


def require_podman() -> str:
    """The real podman (and unsquashfs); conftest.require: a skip off CI, a failure in CI."""
    path = shutil.which("podman")
    require(
        path is not None and shutil.which("unsquashfs") is not None,
        "podman or squashfs-tools not installed (./setup.sh --test-env)",
    )
    assert path is not None
    return path


@pytest.fixture(scope="session")
def cpu_image() -> dict:
    require_podman()
    return session_image()


@pytest.fixture(scope="module")
def linked(cpu_image, tmp_path_factory) -> Path:
    """The session SIF hard-linked into this module's directory: the tree lands beside it."""
    where = tmp_path_factory.mktemp("podman")
    out = where / "scalelab-cpu.sif"
    try:
        os.link(cpu_image["path"], out)
    except OSError:
        shutil.copyfile(cpu_image["path"], out)
    return out


def pod_exec(image: Path, cmd: list[str], binds=(), timeout: float = 600, check: bool = True):
    argv = [SCALELAB, "container", "exec", "--runtime", "podman", "--no-nv"]
    argv += ["--image", str(image), *(f"--bind={b}" for b in binds), "--", *cmd]
    return run(argv, env=tool_env(), timeout=timeout, check=check)


def test_the_tree_runs_the_images_torch_and_scalelab_under_podman(cpu_image, linked):
    probe = (
        "import os, sys, shutil, torch, scalelab; print(sys.prefix); print(scalelab.__file__); "
        "print(shutil.which('scalelab')); print(torch.__version__); "
        "print(os.environ['LD_LIBRARY_PATH']); print(os.environ['SCALELAB_IMAGE_PATH'])"
    )
    out = pod_exec(linked, ["/opt/venv/bin/python", "-c", probe]).stdout
    prefix, module, exe, version, ld, path = out.splitlines()[-6:]
    assert prefix == "/opt/venv" and exe == "/opt/venv/bin/scalelab"
    assert module.startswith("/opt/venv/lib/python3.11/site-packages/scalelab/")
    assert version.startswith("2.13.0") and ld == "/opt/venv/lib"
    assert path == str(linked)
    tree = charliecloud.image_dir(linked, cpu_image["sha256"])
    env = dict(line.split("=", 1) for line in podman.env_file(tree).read_text().splitlines())
    assert env["PATH"].startswith("/opt/venv/bin:") and "HOSTNAME" not in env
    # The rank may not write into the shared tree (--read-only).
    bad = pod_exec(linked, ["/bin/sh", "-c", "touch /opt/x"], check=False)
    assert bad.returncode != 0 and "Read-only file system" in bad.stderr


def _staged(root: Path) -> Path:
    data = root / "synthetic"
    run(
        [PY, "-m", "scalelab", "data", "stage", "--source", "synthetic", "--num-samples", "200"]
        + ["--num-classes", "4", "--image-size", "8", "8", "--shards", "2"]
        + ["--out", str(data), "--quiet"],
        timeout=300,
    )
    return data


def _train_config(root: Path, data: Path, backend: str) -> Path:
    cfg = {
        "seed": 5,
        "model": {"name": "cnn"},
        "data": {"source": "staged", "path": str(data)},
        "optim": {"global_batch_size": 32, "lr": 0.05},
        "train": {"epochs": 1, "threads": 1, "deterministic": True},
        "dist": {"backend": backend, "timeout_s": 120},
    }
    path = root / f"train-{backend}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_training_under_podman_equals_apptainer_exec_of_the_same_sif(cpu_image, linked, tmp_path):
    cfg = _train_config(tmp_path, _staged(tmp_path), "none")
    pod_out, app_out = tmp_path / "run-podman", tmp_path / "run-apptainer"
    train = ["scalelab", "train", "--config", str(cfg)]
    pod_exec(linked, [*train, "--out", str(pod_out)], binds=[tmp_path])
    run(
        [require_apptainer(), "exec", "--userns", "--bind", str(tmp_path)]
        + [str(cpu_image["path"]), *train, "--out", str(app_out)],
        env=tool_env(),
        timeout=600,
    )
    s_pod = json.loads((pod_out / "summary.json").read_text())
    s_app = json.loads((app_out / "summary.json").read_text())
    assert s_pod["global_steps"] == s_app["global_steps"] > 0
    assert _sha256(pod_out / "model.pt") == _sha256(app_out / "model.pt")


def _mpirun() -> list[str]:
    """Open MPI's mpirun, 2 local ranks (the venv's, as scalelab's own local launches)."""
    exe = shutil.which("mpirun", path=str(VENV_BIN)) or shutil.which("mpirun")
    if exe is None:
        pytest.fail("no mpirun (the venv's Open MPI)")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return [exe, "-n", "2", "--bind-to", "none", "--oversubscribe", *root]


def test_two_ranks_each_in_its_own_podman_run_equal_two_ranks_under_apptainer(
    cpu_image, linked, tmp_path
):
    """mpirun -n 2, each rank `podman run --rootfs TREE scalelab train` (DDP over gloo on the
    host network), and the same 2 ranks each in `apptainer exec`: the same model.pt."""
    cfg = _train_config(tmp_path, _staged(tmp_path), "ddp")
    pod_out, app_out = tmp_path / "run2-podman", tmp_path / "run2-apptainer"
    train = ["scalelab", "train", "--config", str(cfg)]
    pod_exec(linked, ["/bin/true"])  # derive the tree once, not in two ranks at once
    per_rank = [SCALELAB, "container", "exec", "--runtime", "podman", "--no-nv"]
    per_rank += ["--image", str(linked), f"--bind={tmp_path}", "--", *train]
    proc = run([*_mpirun(), *per_rank, "--out", str(pod_out)], env=tool_env(), timeout=900)
    app = [require_apptainer(), "exec", "--userns", "--bind", str(tmp_path), str(linked)]
    run([*_mpirun(), *app, *train, "--out", str(app_out)], env=tool_env(), timeout=900)
    s_pod = json.loads((pod_out / "summary.json").read_text())
    s_app = json.loads((app_out / "summary.json").read_text())
    assert s_pod["world_size"] == s_app["world_size"] == 2, proc.stdout + proc.stderr
    assert s_pod["global_steps"] == s_app["global_steps"] > 0
    assert _sha256(pod_out / "model.pt") == _sha256(app_out / "model.pt")


def test_a_tampered_sif_is_refused_before_podman_runs_anything(cpu_image, tmp_path):
    image = tmp_path / "img" / "scalelab-cpu.sif"
    image.parent.mkdir()
    shutil.copyfile(cpu_image["path"], image)
    with open(image, "r+b") as f:  # one byte inside the SquashFS partition
        f.seek(image.stat().st_size // 2)
        byte = f.read(1)
        f.seek(image.stat().st_size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    config = tmp_path / "c.yaml"
    section = {"image": str(image), "sha256": cpu_image["sha256"], "runtime": "podman"}
    config.write_text(yaml.safe_dump({"container": {**section, "nv": False}}))
    marker = tmp_path / "ran"
    proc = run(
        [SCALELAB, "container", "exec", "--config", str(config), "--", "touch", str(marker)],
        env=tool_env(),
        check=False,
    )
    assert proc.returncode != 0 and "sha256 mismatch" in proc.stderr, proc.stderr
    assert sorted(p.name for p in image.parent.iterdir()) == ["scalelab-cpu.sif"]
    assert not marker.exists()
