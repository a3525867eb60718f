"""`scalelab container ...` end to end with the real apptainer and the session's CPU image.

Bad input (missing image, digest mismatch, no apptainer at all) is one clear error line
with a non-zero exit. The one STAND-IN run (tests/container_standin.py, named so) is
`--nv` under srun: no GPU, no driver here; it records the argv and runs nothing. The error
tests put recording stand-ins on PATH only as tripwires: they prove no runtime was called.
"""

import hashlib
import json
import os
import subprocess

import pytest
from conftest import REPO, VENV_BIN
from container_image import require_apptainer, session_image
from container_standin import make_standins, read_log, standin_env

SCALELAB = str(VENV_BIN / "scalelab")
pytestmark = pytest.mark.timeout(2400)  # the first test to ask may wait for a cold image build


@pytest.fixture(scope="session")
def cpu_image() -> dict:
    return session_image()


@pytest.fixture
def sandbox(tmp_path):
    """(stand-in bindir, its log, a small non-image file and its sha256) for error paths."""
    bindir = make_standins(tmp_path / "bin", ("apptainer", "srun"))
    image = tmp_path / "scalelab-gpu.sif"
    image.write_bytes(b"not really a SIF, but bytes to hash\n" * 100)
    return bindir, tmp_path / "calls.jsonl", image, hashlib.sha256(image.read_bytes()).hexdigest()


def scalelab(args, env=None, cwd=REPO, timeout=300):
    return subprocess.run(
        [SCALELAB, "container", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def real_env() -> dict:
    require_apptainer()
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}


def one_error_line(proc, *words, code=2):
    """One `scalelab container: error:` line; exit 2 (bad usage) or 1 (a check failed)."""
    assert proc.returncode == code, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("scalelab container: error: ")
    for w in words:
        assert w in lines[0]
    return lines[0]


def test_exec_runs_the_command_in_the_image(cpu_image, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.txt").write_text("from the host\n")
    proc = scalelab(
        [
            "exec",
            "--image",
            str(cpu_image["path"]),
            "--no-nv",
            "--bind",
            f"{data}:/data:ro",
            "--",
            "bash",
            "-c",
            "cat /data/x.txt; grep VERSION_CODENAME /etc/os-release; command -v python",
        ],
        real_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "from",
        "the",
        "host",
        "VERSION_CODENAME=bookworm",
        "/opt/venv/bin/python",
    ]


def test_exec_exit_status_is_the_containers(cpu_image):
    proc = scalelab(
        ["exec", "--image", str(cpu_image["path"]), "--no-nv", "--", "sh", "-c", "exit 3"],
        real_env(),
    )
    assert proc.returncode == 3


def test_exec_without_userns_fails_where_root_lacks_capabilities(cpu_image):
    """Why `userns: auto` exists: the same exec without --userns fails here as root."""
    from scalelab.container.runtime import root_lacks_capabilities

    args = ["exec", "--image", str(cpu_image["path"]), "--no-nv", "--userns", "false", "--", "true"]
    proc = scalelab(args, real_env())
    if root_lacks_capabilities():
        assert proc.returncode != 0 and "capabilit" in proc.stderr.lower(), proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr


def test_STANDIN_exec_with_nv_under_srun_puts_the_container_call_inside(sandbox, tmp_path):
    """STAND-IN: `srun` and `apptainer` record their argv; no GPU or driver exists here."""
    bindir, log, image, _ = sandbox
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "container": {"image": str(image), "binds": ["/scratch"], "userns": "true"},
                "launch": {"extra_srun_args": ["--cpu-bind=cores"]},
            }
        )
    )
    proc = scalelab(
        [
            "exec",
            "--config",
            str(config),
            "--srun",
            "--nodes",
            "2",
            "--ntasks-per-node",
            "2",
            "--",
            "scalelab",
            "train",
        ],
        standin_env(bindir, log),
    )
    assert proc.returncode == 0, proc.stderr
    assert read_log(log) == [
        {
            "prog": "srun",
            "cwd": str(REPO),
            "argv": [
                "--mpi=pmix",
                "--nodes=2",
                "--ntasks-per-node=2",
                "--ntasks=4",
                "--cpu-bind=cores",
                "apptainer",
                "exec",
                "--nv",
                "--bind",
                "/scratch",
                "--userns",
                str(image),
                "scalelab",
                "train",
            ],
        }
    ]


def test_exec_dry_run_prints_and_runs_nothing(sandbox):
    bindir, log, image, _ = sandbox
    proc = scalelab(
        [
            "exec",
            "--dry-run",
            "--no-nv",
            "--userns",
            "false",
            "--image",
            str(image),
            "--srun",
            "--srun-mpi",
            "pmi2",
            "--",
            "python",
            "-c",
            "print(1)",
        ],
        standin_env(bindir, log),
    )
    assert proc.returncode == 0
    assert proc.stdout.strip() == (
        f"srun --mpi=pmi2 --nodes=1 --ntasks-per-node=1 --ntasks=1 "
        f"apptainer exec {image} python -c 'print(1)'"
    )
    assert read_log(log) == []


def test_build_with_a_definition_prints_the_apptainer_command(tmp_path):
    out = tmp_path / "out" / "gpu.sif"
    out.parent.mkdir()
    proc = scalelab(
        [
            "build",
            "--def",
            "containers/scalelab-gpu.def",
            "--image",
            str(out),
            "--commit",
            "1f7f634",
            "--dry-run",
        ],
        real_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "apptainer",
        "build",
        "--fakeroot",
        "--build-arg",
        "SOURCE_COMMIT=1f7f634",
        str(out),
        str(REPO / "containers" / "scalelab-gpu.def"),
    ]
    assert not out.exists()


def test_build_refuses_to_overwrite_and_missing_def(sandbox):
    bindir, log, image, _ = sandbox
    one_error_line(
        scalelab(["build", "--image", str(image)], standin_env(bindir, log)), "exists", "--force"
    )
    one_error_line(
        scalelab(["build", "--def", "nope.def"], standin_env(bindir, log)),
        "definition file not found: nope.def",
    )
    assert read_log(log) == []


def test_pull_needs_a_pin_and_a_uri(sandbox, tmp_path):
    bindir, log, _, sha = sandbox
    proc = scalelab(
        ["pull", "oras://ghcr.io/lab/scalelab-gpu:0.1.0", "--sha256", sha, "--dry-run"],
        standin_env(bindir, log),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.split()
    assert argv[:3] == ["apptainer", "pull", "--force"] and argv[-1].startswith("oras://")
    assert argv[3].startswith(str(tmp_path / ".scalelab-gpu_0.1.0.sif.pull."))
    one_error_line(
        scalelab(["pull", "https://example.invalid/x.sif"], standin_env(bindir, log)),
        "no pin",
        "--sha256",
    )
    one_error_line(
        scalelab(
            ["pull", "https://example.invalid/x.sif", "--sha256", "12"], standin_env(bindir, log)
        ),
        "--sha256",
        "64 hex",
    )
    one_error_line(scalelab(["pull", "/shared/x.sif"], standin_env(bindir, log)), "not a URI")
    assert read_log(log) == []


def test_inspect_prints_the_images_labels(cpu_image):
    proc = scalelab(["inspect", str(cpu_image["path"])], real_env())
    assert proc.returncode == 0, proc.stderr
    labels = dict(line.split(None, 1) for line in proc.stdout.splitlines())
    assert labels["org.scalelab.horovod"] == "0.28.1"
    assert labels["org.scalelab.torch"] == "2.13.0+cpu"
    assert labels["org.scalelab.deps-key"] == cpu_image["record"]["deps_key"]


def test_verify_sha256_and_signature(cpu_image, tmp_path):
    image, sha = str(cpu_image["path"]), cpu_image["sha256"]
    # sha256 only: needs no apptainer at all
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = scalelab(["verify", image, "--sha256", sha, "--signature", "skip"], {"PATH": str(empty)})
    assert proc.returncode == 0 and "matches the pin; signature skipped" in proc.stdout
    # The built image is unsigned: the real `apptainer verify` says so; auto accepts it.
    proc = scalelab(["verify", image, "--sha256", sha], real_env())
    assert proc.returncode == 0 and "signature unsigned" in proc.stdout, proc.stderr
    one_error_line(
        scalelab(["verify", image, "--sha256", sha, "--signature", "require"], real_env()),
        "signature check failed",
        code=1,
    )


def test_verify_reads_the_pin_from_the_config(sandbox, tmp_path):
    bindir, log, image, sha = sandbox
    config = tmp_path / "config.yaml"
    config.write_text(f"container:\n  image: {image}\n  sha256: {sha}\n")
    proc = scalelab(
        ["verify", "--config", str(config), "--signature", "skip"], standin_env(bindir, log)
    )
    assert proc.returncode == 0, proc.stderr
    config.write_text(f"container:\n  image: {image}\n  sha256: {'f' * 64}\n")
    line = one_error_line(
        scalelab(["verify", "--config", str(config)], standin_env(bindir, log)),
        "sha256 mismatch",
        str(image),
        code=1,
    )
    assert f"file has {sha}" in line
    assert all(c["argv"][0] != "verify" for c in read_log(log))  # no signature check after it


def test_verify_json_carries_the_verdict_and_the_exit_code(sandbox, tmp_path):
    bindir, log, image, sha = sandbox
    args = ["verify", str(image), "--signature", "skip"]
    proc = scalelab([*args, "--sha256", sha, "--json"], standin_env(bindir, log))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "ok": True,
        "image": str(image),
        "sha256": sha,
        "signature": "skipped",
    }
    human = scalelab([*args, "--sha256", "f" * 64], standin_env(bindir, log))
    proc = scalelab([*args, "--sha256", "f" * 64, "--json"], standin_env(bindir, log))
    verdict = json.loads(proc.stdout)
    assert proc.returncode == human.returncode == verdict["exit_code"] == 1
    assert (verdict["ok"], verdict["sha256"], verdict["pinned"]) == (False, sha, "f" * 64)
    assert (
        one_error_line(proc, "sha256 mismatch", code=1)
        == f"scalelab container: error: {verdict['error']}"
    )
    assert read_log(log) == []  # no runtime was asked


@pytest.mark.parametrize("action", ["exec", "verify", "inspect"])
def test_missing_image_is_one_error(sandbox, tmp_path, action):
    bindir, log, _, sha = sandbox
    missing = str(tmp_path / "nowhere.sif")
    args = {
        "exec": ["exec", "--image", missing, "--", "true"],
        "verify": ["verify", missing, "--sha256", sha],
        "inspect": ["inspect", missing],
    }[action]
    one_error_line(scalelab(args, standin_env(bindir, log)), "image not found", missing)
    assert read_log(log) == []


@pytest.mark.parametrize(
    "args",
    [
        ["exec", "--image", "IMAGE", "--", "true"],
        ["exec", "--image", "IMAGE", "--srun", "--nodes", "2", "--", "scalelab", "train"],
        ["build", "--def", "containers/scalelab-gpu.def", "--image", "OUT"],
        ["pull", "oras://ghcr.io/lab/scalelab-gpu:0.1.0", "--image", "OUT", "--sha256", "SHA"],
        ["verify", "IMAGE", "--sha256", "SHA"],
        ["inspect", "IMAGE"],
    ],
)
def test_no_apptainer_is_one_error(sandbox, tmp_path, args):
    _, log, image, sha = sandbox
    empty = tmp_path / "empty-bin"  # PATH with nothing: no apptainer, no singularity, no srun
    empty.mkdir()
    args = [
        {"IMAGE": str(image), "SHA": sha, "OUT": str(tmp_path / "new.sif")}.get(a, a) for a in args
    ]
    proc = scalelab(args, standin_env(empty, log))
    one_error_line(proc, "no apptainer or singularity on PATH", "apptainer.org")
    assert proc.stdout == ""
    assert not (tmp_path / "new.sif").exists()


def test_generate_check_and_lint_pass_on_the_committed_files():
    env = {"PATH": str(VENV_BIN)}
    assert scalelab(["generate", "--check"], env).returncode == 0
    assert scalelab(["lint"], env).returncode == 0


def test_generate_to_stdout_with_recipe_options():
    proc = scalelab(
        ["generate", "--out", "-", "--cuda", "13.0.2", "--allow-unpinned"], {"PATH": str(VENV_BIN)}
    )
    assert proc.returncode == 0, proc.stderr
    assert "cuda:13.0.2-devel" in proc.stdout and "download.pytorch.org/whl/cu130" in proc.stdout
    one_error_line(scalelab(["generate", "--cuda", "13.0.2"], {"PATH": str(VENV_BIN)}), "--out")
    one_error_line(
        scalelab(["generate", "--out", "-", "--cuda", "11"], {"PATH": str(VENV_BIN)}),
        "cuda:11-devel",
        "not in the lock",
    )
