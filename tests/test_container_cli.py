"""`scalelab container ...` end to end, against a STAND-IN apptainer (tests/container_standin.py).

The stand-in records the argv it is called with; these tests check that the CLI
calls it with exactly the documented arguments, and that bad input (missing
image, digest mismatch, no apptainer at all) is one clear error line with a
non-zero exit and no runtime call.
"""

import hashlib
import json
import subprocess

import pytest
from conftest import REPO, VENV_BIN
from container_standin import make_standins, read_log, standin_env

SCALELAB = str(VENV_BIN / "scalelab")


@pytest.fixture
def sandbox(tmp_path):
    """(bindir with stand-in apptainer and srun, log file, an image file and its sha256)."""
    bindir = make_standins(tmp_path / "bin", ("apptainer", "srun"))
    image = tmp_path / "scalelab-gpu.sif"
    image.write_bytes(b"not really a SIF, but bytes to hash\n" * 100)
    return bindir, tmp_path / "calls.jsonl", image, hashlib.sha256(image.read_bytes()).hexdigest()


def scalelab(args, env, cwd=REPO):
    return subprocess.run([SCALELAB, "container", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False)


def one_error_line(proc, *words):
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("scalelab container: error: ")
    for w in words:
        assert w in lines[0]
    return lines[0]


def test_exec_calls_apptainer_with_exact_argv(sandbox):
    bindir, log, image, _ = sandbox
    proc = scalelab(["exec", "--image", str(image), "--bind", "/scratch/data:/data:ro", "--",
                     "scalelab", "train", "--config", "run.yaml"], standin_env(bindir, log))
    assert proc.returncode == 0, proc.stderr
    assert read_log(log) == [{"prog": "apptainer", "cwd": str(REPO), "argv": [
        "exec", "--nv", "--bind", "/scratch/data:/data:ro", str(image),
        "scalelab", "train", "--config", "run.yaml"]}]


def test_exec_exit_status_is_the_containers(sandbox):
    bindir, log, image, _ = sandbox
    proc = scalelab(["exec", "--image", str(image), "--", "false"],
                    standin_env(bindir, log, {"STANDIN_RC": "3"}))
    assert proc.returncode == 3


def test_exec_under_srun_puts_the_container_call_inside(sandbox, tmp_path):
    bindir, log, image, _ = sandbox
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"container": {
        "image": str(image), "binds": ["/scratch"], "srun_flags": ["--cpu-bind=cores"]}}))
    proc = scalelab(["exec", "--config", str(config), "--srun", "--nodes", "2",
                     "--ntasks-per-node", "2", "--", "scalelab", "train"], standin_env(bindir, log))
    assert proc.returncode == 0, proc.stderr
    assert read_log(log) == [{"prog": "srun", "cwd": str(REPO), "argv": [
        "--mpi=pmix", "--nodes=2", "--ntasks-per-node=2", "--ntasks=4", "--cpu-bind=cores",
        "apptainer", "exec", "--nv", "--bind", "/scratch", str(image), "scalelab", "train"]}]


def test_exec_dry_run_prints_and_runs_nothing(sandbox):
    bindir, log, image, _ = sandbox
    proc = scalelab(["exec", "--dry-run", "--no-nv", "--image", str(image), "--srun",
                     "--srun-mpi", "pmi2", "--", "python", "-c", "print(1)"],
                    standin_env(bindir, log))
    assert proc.returncode == 0
    assert proc.stdout.strip() == (f"srun --mpi=pmi2 --nodes=1 --ntasks-per-node=1 --ntasks=1 "
                                   f"apptainer exec {image} python -c 'print(1)'")
    assert read_log(log) == []


def test_build_calls_apptainer_from_the_repo_root(sandbox, tmp_path):
    bindir, log, _, _ = sandbox
    out = tmp_path / "out" / "cpu.sif"
    out.parent.mkdir()
    proc = scalelab(["build", "--def", "containers/scalelab-cpu.def", "--image", str(out),
                     "--commit", "1f7f634"], standin_env(bindir, log), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert read_log(log) == [{"prog": "apptainer", "cwd": str(REPO), "argv": [
        "build", "--fakeroot", "--build-arg", "SOURCE_COMMIT=1f7f634", str(out),
        str(REPO / "containers" / "scalelab-cpu.def")]}]


def test_build_refuses_to_overwrite_and_missing_def(sandbox):
    bindir, log, image, _ = sandbox
    one_error_line(scalelab(["build", "--image", str(image)], standin_env(bindir, log)),
                   "exists", "--force")
    one_error_line(scalelab(["build", "--def", "nope.def"], standin_env(bindir, log)),
                   "definition file not found: nope.def")
    assert read_log(log) == []


def test_pull_calls_apptainer(sandbox, tmp_path):
    bindir, log, _, _ = sandbox
    proc = scalelab(["pull", "oras://ghcr.io/lab/scalelab-gpu:0.1.0"], standin_env(bindir, log),
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert read_log(log)[0]["argv"] == ["pull", str(tmp_path / "scalelab-gpu_0.1.0.sif"),
                                        "oras://ghcr.io/lab/scalelab-gpu:0.1.0"]
    one_error_line(scalelab(["pull", "/shared/x.sif"], standin_env(bindir, log)), "not a URI")


def test_inspect_prints_the_labels(sandbox):
    bindir, log, image, _ = sandbox
    labels = {"org.scalelab.torch.version": "2.13.0", "org.scalelab.mpi.flavour": "openmpi"}
    canned = json.dumps({"data": {"attributes": {"labels": labels}}, "type": "container"})
    proc = scalelab(["inspect", str(image)], standin_env(bindir, log, {"STANDIN_STDOUT": canned}))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["org.scalelab.mpi.flavour    openmpi",
                                        "org.scalelab.torch.version  2.13.0"]
    assert read_log(log)[0]["argv"] == ["inspect", "--json", str(image)]


def test_verify_sha256_and_signature(sandbox, tmp_path):
    bindir, log, image, sha = sandbox
    # sha256 only: needs no apptainer at all
    proc = scalelab(["verify", str(image), "--sha256", sha, "--signature", "skip"],
                    standin_env(tmp_path / "empty", log))
    assert proc.returncode == 0 and "matches the pin; signature skipped" in proc.stdout
    # unsigned image: `apptainer verify` says so; auto mode accepts it
    unsigned = {"STANDIN_RC": "255", "STANDIN_STDERR":
                "FATAL:   Failed to verify container: signature not found for object group 1\n"}
    proc = scalelab(["verify", str(image), "--sha256", sha], standin_env(bindir, log, unsigned))
    assert proc.returncode == 0 and "signature unsigned" in proc.stdout
    assert read_log(log)[-1]["argv"] == ["verify", str(image)]
    one_error_line(scalelab(["verify", str(image), "--sha256", sha, "--signature", "require"],
                            standin_env(bindir, log, unsigned)), "signature check failed")
    proc = scalelab(["verify", str(image), "--sha256", sha], standin_env(bindir, log))
    assert proc.returncode == 0 and "signature verified" in proc.stdout


def test_verify_reads_the_pin_from_the_config(sandbox, tmp_path):
    bindir, log, image, sha = sandbox
    config = tmp_path / "config.yaml"
    config.write_text(f"container:\n  image: {image}\n  sha256: {sha}\n")
    proc = scalelab(["verify", "--config", str(config), "--signature", "skip"],
                    standin_env(bindir, log))
    assert proc.returncode == 0, proc.stderr
    config.write_text(f"container:\n  image: {image}\n  sha256: {'f' * 64}\n")
    line = one_error_line(scalelab(["verify", "--config", str(config)], standin_env(bindir, log)),
                          "sha256 mismatch", str(image))
    assert f"file has {sha}" in line
    assert all(c["argv"][0] != "verify" for c in read_log(log))  # no signature check after it


@pytest.mark.parametrize("action", ["exec", "verify", "inspect"])
def test_missing_image_is_one_error(sandbox, tmp_path, action):
    bindir, log, _, sha = sandbox
    missing = str(tmp_path / "nowhere.sif")
    args = {"exec": ["exec", "--image", missing, "--", "true"],
            "verify": ["verify", missing, "--sha256", sha],
            "inspect": ["inspect", missing]}[action]
    one_error_line(scalelab(args, standin_env(bindir, log)), "image not found", missing)
    assert read_log(log) == []


@pytest.mark.parametrize("args", [
    ["exec", "--image", "IMAGE", "--", "true"],
    ["exec", "--image", "IMAGE", "--srun", "--nodes", "2", "--", "scalelab", "train"],
    ["build", "--def", "containers/scalelab-gpu.def", "--image", "OUT"],
    ["pull", "oras://ghcr.io/lab/scalelab-gpu:0.1.0", "--image", "OUT"],
    ["verify", "IMAGE", "--sha256", "SHA"],
    ["inspect", "IMAGE"],
])
def test_no_apptainer_is_one_error(sandbox, tmp_path, args):
    _, log, image, sha = sandbox
    empty = tmp_path / "empty-bin"  # PATH with nothing: no apptainer, no singularity, no srun
    empty.mkdir()
    args = [{"IMAGE": str(image), "SHA": sha, "OUT": str(tmp_path / "new.sif")}.get(a, a)
            for a in args]
    proc = scalelab(args, standin_env(empty, log))
    one_error_line(proc, "no apptainer or singularity on PATH", "apptainer.org")
    assert proc.stdout == ""
    assert not (tmp_path / "new.sif").exists()


def test_generate_check_and_lint_pass_on_the_committed_files():
    env = {"PATH": str(VENV_BIN)}
    assert scalelab(["generate", "--check"], env).returncode == 0
    assert scalelab(["lint"], env).returncode == 0


def test_generate_to_stdout_with_recipe_options():
    proc = scalelab(["generate", "--out", "-", "--mpi", "mpich", "--cuda", "none"],
                    {"PATH": str(VENV_BIN)})
    assert proc.returncode == 0, proc.stderr
    assert "org.scalelab.mpi.flavour mpich" in proc.stdout
    one_error_line(scalelab(["generate", "--mpi", "mpich"], {"PATH": str(VENV_BIN)}), "--out")
    one_error_line(scalelab(["generate", "--out", "-", "--cuda", "11"], {"PATH": str(VENV_BIN)}),
                   "cuda:11-devel", "not in the lock")
