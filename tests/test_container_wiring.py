"""Exact command lines (exec, build, pull, srun-wrapped exec) and provenance, without apptainer."""

import hashlib
import json

import pytest
from container_standin import make_standins

from scalelab.container import runtime
from scalelab.container.config import ContainerConfig
from scalelab.container.wiring import container_prefix, image_provenance, parse_inspect_labels
from scalelab.errors import UsageError

CFG = {
    "image": "/shared/images/scalelab-gpu.sif",
    "binds": ["/scratch/data:/data:ro", "/scratch/$USER"],
    "env": {"NCCL_SOCKET_IFNAME": "ib0"},
    "srun_flags": ["--cpu-bind=cores"],
}


@pytest.fixture
def standin_path(tmp_path):
    """A PATH holding only a stand-in `apptainer` (see tests/container_standin.py)."""
    return str(make_standins(tmp_path / "bin"))


def test_exec_argv():
    assert runtime.exec_argv("apptainer", "img.sif", ["scalelab", "train", "--config", "c.yaml"],
                             binds=["/data:/data:ro", "/scratch"],
                             env=[("OMP_NUM_THREADS", "1")]) == [
        "apptainer", "exec", "--nv", "--bind", "/data:/data:ro", "--bind", "/scratch",
        "--env", "OMP_NUM_THREADS=1", "img.sif", "scalelab", "train", "--config", "c.yaml"]
    assert runtime.exec_argv("singularity", "img.sif", ["true"], nv=False,
                             flags=["--cleanenv"], pwd="/work") == [
        "singularity", "exec", "--cleanenv", "--pwd", "/work", "img.sif", "true"]


def test_build_and_pull_argv():
    assert runtime.build_argv("apptainer", "out.sif", "containers/scalelab-gpu.def",
                              build_args={"SOURCE_COMMIT": "abc1234"}) == [
        "apptainer", "build", "--fakeroot", "--build-arg", "SOURCE_COMMIT=abc1234",
        "out.sif", "containers/scalelab-gpu.def"]
    assert runtime.build_argv("apptainer", "o.sif", "d.def", fakeroot=False, force=True,
                              notest=True) == ["apptainer", "build", "--force", "--notest",
                                               "o.sif", "d.def"]
    assert runtime.pull_argv("apptainer", "o.sif", "oras://ghcr.io/lab/scalelab-gpu:0.1.0") == [
        "apptainer", "pull", "o.sif", "oras://ghcr.io/lab/scalelab-gpu:0.1.0"]
    assert runtime.inspect_argv("apptainer", "o.sif") == ["apptainer", "inspect", "--json", "o.sif"]
    assert runtime.verify_argv("apptainer", "o.sif") == ["apptainer", "verify", "o.sif"]


def test_container_prefix_wraps_the_container_call_inside_srun(standin_path):
    prefix = container_prefix(CFG, nodes=2, tasks_per_node=4, path=standin_path)
    assert prefix == [
        "srun", "--mpi=pmix", "--nodes=2", "--ntasks-per-node=4", "--ntasks=8", "--cpu-bind=cores",
        "apptainer", "exec", "--nv", "--bind", "/scratch/data:/data:ro", "--bind", "/scratch/$USER",
        "--env", "NCCL_SOCKET_IFNAME=ib0", "/shared/images/scalelab-gpu.sif"]
    assert prefix.index("srun") < prefix.index("apptainer") < prefix.index(CFG["image"])


def test_container_prefix_variants(standin_path):
    cpu = {**CFG, "nv": False, "srun_mpi": "pmi2", "srun_flags": []}
    assert container_prefix(cpu, 1, 2, cpus_per_task=4, srun_flags=["--exclusive"],
                            extra_binds=["/results"], path=standin_path) == [
        "srun", "--mpi=pmi2", "--nodes=1", "--ntasks-per-node=2", "--ntasks=2",
        "--cpus-per-task=4", "--exclusive", "apptainer", "exec", "--bind", "/scratch/data:/data:ro",
        "--bind", "/scratch/$USER", "--bind", "/results", "--env", "NCCL_SOCKET_IFNAME=ib0",
        CFG["image"]]
    assert container_prefix(CFG, launcher="none", path=standin_path)[:3] == ["apptainer", "exec",
                                                                             "--nv"]
    assert container_prefix({**CFG, "enabled": False}, 4, 4) == []
    with pytest.raises(UsageError, match="launcher none runs one process"):
        container_prefix(CFG, 2, 1, launcher="none", path=standin_path)
    with pytest.raises(UsageError, match=">= 1"):
        container_prefix(CFG, 0, 1, path=standin_path)


def test_container_prefix_without_runtime_is_one_error(tmp_path):
    with pytest.raises(UsageError, match="no apptainer or singularity on PATH"):
        container_prefix(CFG, 2, 2, path=str(tmp_path))
    with pytest.raises(UsageError, match="singularity not found on PATH"):
        container_prefix({**CFG, "runtime": "singularity"}, 1, 1, path=str(tmp_path))


def test_detect_prefers_apptainer(tmp_path):
    bindir = make_standins(tmp_path / "bin", ("singularity",))
    assert runtime.detect(path=str(bindir)).name == "singularity"
    make_standins(bindir, ("apptainer",))
    found = runtime.detect(path=str(bindir))
    assert found == runtime.Runtime("apptainer", str(bindir / "apptainer"))
    assert runtime.detect("singularity", path=str(bindir)).name == "singularity"
    assert runtime.detect(path=str(tmp_path)) is None


@pytest.mark.parametrize("data, message", [
    ({}, r"container\.image"),
    ({"image": "a.sif", "sha256": "abc"}, r"container\.sha256: expected 64 hex"),
    ({"image": "a.sif", "sha256": 0}, r"container\.sha256: .* quoted string"),
    ({"image": "a.sif", "runtime": "docker"}, r"container\.runtime"),
    ({"image": "a.sif", "binds": "/data"}, r"container\.binds: must be a list"),
    ({"image": "a.sif", "nv": "yes"}, r"container\.nv: must be true or false"),
    ({"image": "a.sif", "env": {"1X": "y"}}, r"container\.env"),
    ({"image": "a.sif", "imagee": "b"}, r"container\.imagee: unknown key"),
    ({"image": "a.sif", "srun_mpi": "--mpi=pmix"}, r"container\.srun_mpi"),
])
def test_config_errors_name_the_field(data, message):
    with pytest.raises(UsageError, match=message):
        ContainerConfig.from_mapping(data)


def test_config_accepts_whole_config_and_sha_prefix():
    sha = "ab" * 32
    cfg = ContainerConfig.from_mapping({"container": {"image": "x.sif", "sha256": f"sha256:{sha}"}})
    assert cfg.sha256 == sha and cfg.nv and cfg.srun_mpi == "pmix"


def test_image_provenance(tmp_path, monkeypatch):
    image = tmp_path / "img.sif"
    image.write_bytes(b"SIF stand-in bytes " * 1000)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    bindir = make_standins(tmp_path / "bin")
    inspect_json = json.dumps({"data": {"attributes": {"labels": {
        "org.scalelab.torch.version": "2.13.0", "org.scalelab.source-commit": "abc1234"}}},
        "type": "container"})
    monkeypatch.setenv("STANDIN_LOG", str(tmp_path / "log"))
    monkeypatch.setenv("STANDIN_STDOUT", inspect_json)
    record = image_provenance({"image": str(image), "sha256": digest}, path=str(bindir))
    assert record["sha256"] == digest and record["pinned_sha256"] == digest
    assert record["runtime"] == "apptainer" and record["size_bytes"] == 19000
    assert record["labels"]["org.scalelab.source-commit"] == "abc1234"
    cache = json.loads((tmp_path / "img.sif.sha256.json").read_text())
    assert cache["sha256"] == digest
    # unpinned: recorded, not refused; no runtime: no labels
    record = image_provenance({"image": str(image)}, path=str(tmp_path / "empty"))
    assert record["pinned_sha256"] is None and record["runtime"] is None and record["labels"] == {}
    with pytest.raises(UsageError, match="sha256 mismatch"):
        image_provenance({"image": str(image), "sha256": "0" * 64}, path=str(bindir))
    with pytest.raises(UsageError, match="image not found"):
        image_provenance({"image": str(tmp_path / "missing.sif")})
    with pytest.raises(UsageError, match="is a URI"):
        image_provenance({"image": "oras://ghcr.io/lab/scalelab-gpu:0.1.0"})


def test_provenance_cache_follows_the_file(tmp_path):
    image = tmp_path / "img.sif"
    image.write_bytes(b"one")
    first = image_provenance({"image": str(image)}, labels=False, path=str(tmp_path))["sha256"]
    image.write_bytes(b"two, longer")
    second = image_provenance({"image": str(image)}, labels=False, path=str(tmp_path))["sha256"]
    assert first == hashlib.sha256(b"one").hexdigest()
    assert second == hashlib.sha256(b"two, longer").hexdigest()


def test_parse_inspect_labels():
    assert parse_inspect_labels('{"data": {"attributes": {"labels": {"a": 1}}}}') == {"a": "1"}
    assert parse_inspect_labels("not json") == {}
    assert parse_inspect_labels('{"data": []}') == {}
