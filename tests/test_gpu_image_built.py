"""The GPU image, built here for real (`scalelab container build --gpu`, Debian + PyPI's CUDA
wheels) and run without a GPU: its %test, its labels, the build log's nvcc, and a 2-node
training on the test cluster (CPU, gloo; DDP under srun --mpi=pmix, and Horovod) equal to
the CPU image's within 1e-5: the image's MPI, PMIx and Python stack, proven without a GPU.

Marker gpu_image: selected by name only (`-m gpu_image`; never in .ci/run). A cold build
needs ~24 GB and ~13 min on 2 shared cores; a cached one (~/.cache/scalelab/images/gpu-*) is
found in seconds. The GPU itself is checked by benchmarks/gpu_check.sh on a GPU machine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time

import pytest
import torch
from conftest import REPO, VENV_BIN, run, tool_env, two_nodes
from container_image import SCALELAB, image_dir, require_apptainer, session_image
from test_container_real import _train_config, staged  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.gpu_image, pytest.mark.timeout(3600)]
BUILD_TIMEOUT_S = 3000


@functools.cache
def gpu_session_image() -> dict:
    require_apptainer()
    checkout = hashlib.sha256(str(REPO).encode()).hexdigest()[:12]
    out = image_dir() / "test-session" / checkout / "scalelab-gpu.sif"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    proc = run(
        [SCALELAB, "container", "build", "--gpu", "--image", str(out), "--force"],
        timeout=BUILD_TIMEOUT_S,
    )
    record = json.loads(out.with_name(out.name + ".build.json").read_text())
    print(f"gpu image ready in {time.monotonic() - t0:.1f} s:\n{proc.stdout}")
    return {"path": out, "sha256": record["sha256"], "record": record, "log": proc.stdout}


@pytest.fixture(scope="session")
def gpu_image() -> dict:
    return gpu_session_image()


def test_gpu_image_passes_its_test_and_says_what_went_in(gpu_image):
    image = gpu_image["path"]
    rec = gpu_image["record"]
    assert rec["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert rec["versions"]["torch"] == "2.13.0" and rec["versions"]["nccl"] == "2.29.7"
    assert "torch==2.13.0" in rec["pins"] and "nvidia-ml-py==13.615.71" in rec["pins"]
    proc = run([require_apptainer(), "test", "--userns", str(image)], timeout=1200)
    out = proc.stdout + proc.stderr
    for expected in (
        "ldd: every library under /opt/scalelab/venv resolves",
        "horovod nccl_built: True",
        "CUDA 13.0 NCCL 2.29.7",
        "THREAD_MULTIPLE",
        "clean-up: ok under /usr/bin/python3.11",
    ):
        assert expected in out, (expected, out[-3000:])
    selftest = json.loads(proc.stdout.strip().splitlines()[-1])
    assert selftest["ok"] and selftest["torch_cuda"] == "13.0" and selftest["nccl_built"]
    labels = run([SCALELAB, "container", "inspect", str(image)]).stdout
    for needle in (
        "org.scalelab.torch.version",
        "2.13.0",
        "org.scalelab.nccl.version",
        "2.29.7",
        "org.scalelab.mpi.version",
        "5.0.11",
        "org.scalelab.horovod.version",
        "0.28.1",
        "org.scalelab.version",
        "org.scalelab.lock.pypi",
        rec["lock_pypi_sha256"],
        "R580",
    ):
        assert needle in labels, needle


def test_horovod_was_built_with_the_wheels_nvcc(gpu_image):
    log = run(
        [
            require_apptainer(),
            "exec",
            "--userns",
            str(gpu_image["path"]),
            "cat",
            "/opt/scalelab/build-logs/horovod-build.log",
        ]
    ).stdout
    assert "/var/tmp/cuda-build/lib/python3.11/site-packages/nvidia/cu13/bin/nvcc" in log
    assert "/usr/local/cuda" not in log
    assert "Linking against shared NCCL library" in log or "libnccl" in log


@pytest.mark.horovod
@pytest.mark.parametrize("backend", ["ddp", "horovod"])
def test_two_node_training_in_the_gpu_image_equals_the_cpu_image(
    cluster,
    staged,  # noqa: F811
    gpu_image,
    backend,
):
    cpu = session_image()
    cfg = _train_config(cluster, staged, backend, "gpuimg")
    runs = {}
    for name, img in (("gpu", gpu_image), ("cpu", cpu)):
        out = cluster.shared_dir / f"run-{name}img-{backend}-{os.getpid()}"
        env = cluster.env(tool_env({"SCALELAB_IMAGE_SHA256": img["sha256"]}))
        proc = run(
            [
                SCALELAB,
                "container",
                "exec",
                "--image",
                str(img["path"]),
                "--no-nv",
                "--srun",
                "--bind",
                str(cluster.shared_dir),
                "--nodes",
                "2",
                "--ntasks-per-node",
                "1",
                "--",
                "scalelab",
                "train",
                "--config",
                str(cfg),
                "--out",
                str(out),
            ],
            env=env,
            timeout=900,
        )
        assert (out / "summary.json").exists(), proc.stdout + proc.stderr
        runs[name] = out
    info = json.loads((runs["gpu"] / "run_info.json").read_text())
    assert two_nodes(info["hostnames"])
    assert info["container"]["sys_prefix"] == "/opt/scalelab/venv"
    assert info["container"]["image_sha256"] == gpu_image["sha256"]
    got = torch.load(runs["gpu"] / "model.pt", map_location="cpu")
    want = torch.load(runs["cpu"] / "model.pt", map_location="cpu")
    assert got.keys() == want.keys()
    worst = max(float((got[k].double() - want[k].double()).abs().max()) for k in got)
    print(f"{backend}: GPU image vs CPU image, largest weight difference {worst:.3g}")
    assert worst <= 1e-5, worst
    s_gpu = json.loads((runs["gpu"] / "summary.json").read_text())
    s_cpu = json.loads((runs["cpu"] / "summary.json").read_text())
    assert s_gpu["global_steps"] == s_cpu["global_steps"] > 0 and s_gpu["world_size"] == 2
    assert VENV_BIN.is_dir()
