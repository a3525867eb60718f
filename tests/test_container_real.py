"""The real CPU image, run for real: built by `scalelab container build`, %test, its own
scalelab inside, 2-node training in the hybrid model on the test cluster (equal to the
same runs on the host), the pull over HTTP onto the nodes, the content pin.

No stand-in anywhere in this file: `apptainer` is the binary installed by
envs/install_apptainer.sh. CI (SCALELAB_REQUIRE_CLUSTER=1) fails, never skips, without it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import VENV_BIN, run, tool_env, two_nodes
from container_image import SCALELAB, require_apptainer, session_image

PY = str(VENV_BIN / "python")
pytestmark = pytest.mark.timeout(2400)  # the first test may wait for a cold image build


@pytest.fixture(scope="session")
def cpu_image() -> dict:
    return session_image()


def apptainer_exec(
    image: Path, cmd: list[str], env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return run(
        [require_apptainer(), "exec", "--userns", str(image), *cmd], env=env, timeout=timeout
    )


# ---- the image itself ---------------------------------------------------------------------


def test_build_records_the_sha256_and_the_image_passes_its_test(cpu_image):
    image = cpu_image["path"]
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    assert cpu_image["sha256"] == digest
    assert image.with_name(image.name + ".sha256").read_text() == f"{digest}  {image.name}\n"
    rec = cpu_image["record"]
    assert "torch==2.13.0+cpu" in rec["pins"]  # from envs/lock-cpu.txt, as the venv has it
    assert rec["horovod_wheel"].startswith("horovod-0.28.1-")
    assert not any(p.startswith(("snakemake", "pytest", "ruff")) for p in rec["pins"])
    # %test again, on the finished image: one Horovod step through Open MPI.
    proc = run([require_apptainer(), "test", "--userns", str(image)], timeout=300)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["horovod"] == "0.28.1", result
    assert result["torch"].startswith("2.13.0") and "Open MPI" in result["mpi_library"]
    labels = run([SCALELAB, "container", "inspect", str(image)]).stdout
    assert "org.scalelab.torch" in labels and "2.13.0+cpu" in labels
    assert "debian:bookworm (debootstrap)" in labels


def test_image_runs_its_own_scalelab_not_the_hosts(cpu_image):
    # The host's venv first on PATH (as Snakemake's shell has it): the image must still win.
    probe = (
        "import sys, scalelab, shutil; print(sys.prefix); print(scalelab.__file__); "
        "print(shutil.which('scalelab')); print(open('/etc/os-release').read())"
    )
    out = apptainer_exec(cpu_image["path"], ["python", "-c", probe], env=tool_env()).stdout
    prefix, module, exe = out.splitlines()[:3]
    assert prefix == "/opt/venv"
    assert module.startswith("/opt/venv/lib/python3.11/site-packages/scalelab/")
    assert exe == "/opt/venv/bin/scalelab"
    assert "VERSION_CODENAME=bookworm" in out


def test_cached_build_is_reused(cpu_image):
    proc = run(
        [SCALELAB, "container", "build", "--dry-run", "--image", str(cpu_image["path"]), "--force"]
    )
    assert "(cached)" in proc.stdout, proc.stdout  # the deps stage is not rebuilt


# ---- the content pin (issue 11) --------------------------------------------------------------


def test_modified_image_with_same_size_and_mtime_is_refused_before_any_job(cpu_image, tmp_path):
    from test_workflow import copy_workflow, snakemake

    image = tmp_path / "img" / "scalelab-cpu.sif"
    image.parent.mkdir()
    shutil.copyfile(cpu_image["path"], image)
    wd = copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wd / ".test" / "config.yaml").read_text())
    cfg["container"] = {
        "enabled": True,
        "image": str(image),
        "nv": False,
        "sha256": cpu_image["sha256"],
    }
    (wd / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert snakemake(wd, ["-n", "--configfile", "c.yaml"]).returncode == 0
    # Flip one byte in the middle, keep the size and the mtime.
    st = image.stat()
    with open(image, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert image.stat().st_size == st.st_size and image.stat().st_mtime_ns == st.st_mtime_ns
    proc = snakemake(wd, ["--cores", "1", "--configfile", "c.yaml"], check=False)
    assert proc.returncode != 0
    assert "sha256 mismatch" in proc.stderr and cpu_image["sha256"] in proc.stderr
    assert not (wd / "results").exists()


# ---- the hybrid model on the test cluster ------------------------------------------------------


@pytest.fixture(scope="module")
def staged(cluster) -> Path:
    data = cluster.shared_dir / "container-synthetic"
    if not (data / "index.json").exists():
        run(
            [
                PY,
                "-m",
                "scalelab",
                "data",
                "stage",
                "--source",
                "synthetic",
                "--num-samples",
                "400",
                "--num-classes",
                "4",
                "--image-size",
                "8",
                "8",
                "--shards",
                "2",
                "--out",
                str(data),
                "--quiet",
            ]
        )
    return data


def _train_config(cluster, staged: Path, backend: str, tag: str) -> Path:
    cfg = {
        "seed": 5,
        "model": {"name": "cnn"},
        "data": {"source": "staged", "path": str(staged)},
        "optim": {"global_batch_size": 32, "lr": 0.05},
        "train": {"epochs": 1, "threads": 1, "deterministic": True},
        "dist": {"backend": backend, "timeout_s": 120},
    }
    path = cluster.shared_dir / f"container-{backend}-{tag}-{os.getpid()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.cluster
@pytest.mark.horovod
@pytest.mark.parametrize("backend", ["ddp", "horovod"])
def test_two_node_training_inside_the_image_equals_the_host(cluster, staged, cpu_image, backend):
    image = cpu_image["path"]
    inside = cluster.shared_dir / f"run-img-{backend}-{os.getpid()}"
    host = cluster.shared_dir / f"run-host-{backend}-{os.getpid()}"
    cfg = _train_config(cluster, staged, backend, "x")
    env = cluster.env(tool_env({"SCALELAB_IMAGE_SHA256": cpu_image["sha256"]}))
    # srun --mpi=pmix ... apptainer exec --userns IMAGE scalelab train: the container call
    # inside srun, through scalelab's own command line.
    proc = run(
        [
            SCALELAB,
            "container",
            "exec",
            "--image",
            str(image),
            "--no-nv",
            "--srun",
            "--bind",
            str(cluster.shared_dir),  # data, config and run dir: not bound by default
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
            str(inside),
        ],
        env=env,
        timeout=600,
    )
    assert (inside / "summary.json").exists(), proc.stdout + proc.stderr
    # The same run on the host's venv, same nodes, same launcher.
    cluster.srun(
        [
            "--mpi=pmix",
            "-N2",
            "-n2",
            PY,
            "-m",
            "scalelab",
            "train",
            "--config",
            str(cfg),
            "--out",
            str(host),
        ],
        timeout=600,
        extra_env={"LD_LIBRARY_PATH": str(VENV_BIN.parent / "lib")},
    )
    info = json.loads((inside / "run_info.json").read_text())
    assert two_nodes(info["hostnames"])
    proof = info["container"]
    assert proof["image"] == str(image) and proof["image_sha256"] == cpu_image["sha256"]
    assert proof["os_release"]["VERSION_CODENAME"] == "bookworm"
    assert proof["sys_prefix"] == "/opt/venv"
    assert proof["scalelab_path"].startswith("/opt/venv/lib/python3.11/site-packages/")
    assert json.loads((host / "run_info.json").read_text())["container"] is None
    # The provenance manifest of a run inside the image validates and pins the image.
    from scalelab.provenance import FILE, validate

    manifest = json.loads((inside / FILE).read_text())
    validate(manifest, str(inside / FILE))
    assert manifest["must_match"]["image_sha256"] == cpu_image["sha256"]
    assert json.loads((host / FILE).read_text())["must_match"]["image_sha256"] is None
    got = torch.load(inside / "model.pt", map_location="cpu")
    want = torch.load(host / "model.pt", map_location="cpu")
    assert got.keys() == want.keys()
    worst = max(float((got[k].double() - want[k].double()).abs().max()) for k in got)
    assert worst <= 1e-5, worst
    s_in = json.loads((inside / "summary.json").read_text())
    s_host = json.loads((host / "summary.json").read_text())
    assert s_in["global_steps"] == s_host["global_steps"] > 0 and s_in["world_size"] == 2


def _exec_srun(image: Path, shared: Path, runtime_args: list[str], train: list[str]) -> list[str]:
    """`scalelab container exec --srun` of `scalelab train` on 2 nodes x 1 rank."""
    return [
        SCALELAB,
        "container",
        "exec",
        *runtime_args,
        "--image",
        str(image),
        "--no-nv",
        "--srun",
        "--bind",
        str(shared),
        "--nodes",
        "2",
        "--ntasks-per-node",
        "1",
        "--",
        "scalelab",
        *train,
    ]


@pytest.mark.cluster
def test_two_node_training_under_charliecloud_equals_apptainer(cluster, staged, cpu_image):
    """srun --mpi=pmix -N2 -n2 ch-run TREE -- scalelab train (DDP): the tree derived from the
    verified SIF, two nodes, and the same model.pt as the same run under apptainer exec."""
    from scalelab.container import charliecloud

    if shutil.which("ch-run") is None:
        pytest.fail("ch-run not installed (envs/test_env.sh installs charliecloud-runtime)")
    image = cpu_image["path"]
    cfg = _train_config(cluster, staged, "ddp", "ch")
    ch_out = cluster.shared_dir / f"run-ch-{os.getpid()}"
    app_out = cluster.shared_dir / f"run-app-{os.getpid()}"
    env = cluster.env(charliecloud.ch_env(tool_env()))
    shared = cluster.shared_dir
    proc = run(
        _exec_srun(image, shared, ["--runtime", "charliecloud"], ["train", "--config", str(cfg)])
        + ["--out", str(ch_out)],
        env=env,
        timeout=900,
    )
    assert (ch_out / "summary.json").exists(), proc.stdout + proc.stderr
    run(
        _exec_srun(image, shared, [], ["train", "--config", str(cfg)]) + ["--out", str(app_out)],
        env=cluster.env(tool_env()),
        timeout=600,
    )
    info = json.loads((ch_out / "run_info.json").read_text())
    assert two_nodes(info["hostnames"])
    proof = info["container"]
    assert proof["image"] == str(image) and proof["image_sha256"] == cpu_image["sha256"]
    assert proof["sys_prefix"] == "/opt/venv"
    assert charliecloud.image_dir(image, cpu_image["sha256"]).is_dir()
    s_ch = json.loads((ch_out / "summary.json").read_text())
    s_app = json.loads((app_out / "summary.json").read_text())
    assert s_ch["global_steps"] == s_app["global_steps"] > 0 and s_ch["world_size"] == 2
    digest = [hashlib.sha256((d / "model.pt").read_bytes()).hexdigest() for d in (ch_out, app_out)]
    assert digest[0] == digest[1]


@pytest.mark.cluster
def test_two_node_training_under_podman_equals_apptainer(cluster, staged, cpu_image):
    """srun --mpi=pmix -N2 -n2 podman run --rootfs TREE scalelab train (DDP): each rank in its
    own podman run on the host network, and the same model.pt as under apptainer exec."""
    from scalelab.container import charliecloud

    if shutil.which("podman") is None:
        pytest.fail("podman not installed (envs/test_env.sh installs it)")
    image = cpu_image["path"]
    cfg = _train_config(cluster, staged, "ddp", "podman")
    pod_out = cluster.shared_dir / f"run-podman-{os.getpid()}"
    app_out = cluster.shared_dir / f"run-app-pod-{os.getpid()}"
    shared = cluster.shared_dir
    proc = run(
        _exec_srun(image, shared, ["--runtime", "podman"], ["train", "--config", str(cfg)])
        + ["--out", str(pod_out)],
        env=cluster.env(tool_env()),
        timeout=900,
    )
    assert (pod_out / "summary.json").exists(), proc.stdout + proc.stderr
    run(
        _exec_srun(image, shared, [], ["train", "--config", str(cfg)]) + ["--out", str(app_out)],
        env=cluster.env(tool_env()),
        timeout=600,
    )
    info = json.loads((pod_out / "run_info.json").read_text())
    assert two_nodes(info["hostnames"])
    proof = info["container"]
    assert proof["image"] == str(image) and proof["sys_prefix"] == "/opt/venv"
    assert charliecloud.image_dir(image, cpu_image["sha256"]).is_dir()
    s_pod = json.loads((pod_out / "summary.json").read_text())
    s_app = json.loads((app_out / "summary.json").read_text())
    assert s_pod["global_steps"] == s_app["global_steps"] > 0 and s_pod["world_size"] == 2
    digest = [hashlib.sha256((d / "model.pt").read_bytes()).hexdigest() for d in (pod_out, app_out)]
    assert digest[0] == digest[1]


# ---- the pull onto the cluster, over HTTP on the cluster's own network ------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output readable
        pass


@pytest.fixture
def http_server(cluster, tmp_path):
    """An HTTP server on the test cluster's host address only, alive for this test (<= 10 min)."""
    served = cluster.shared_dir / f"served-{os.getpid()}"
    served.mkdir(exist_ok=True)
    host = cluster.cluster.spec.host_addr
    with socket.socket() as s:  # a free port on that address
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = http.server.ThreadingHTTPServer(
        (host, port), functools.partial(_Quiet, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    deadline = threading.Timer(600, server.shutdown)
    deadline.start()
    try:
        yield served, f"http://{host}:{port}"
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()
        shutil.rmtree(served, ignore_errors=True)


@pytest.mark.cluster
def test_pull_onto_a_node_verifies_sha256_and_refuses_another_image(
    cluster, cpu_image, http_server
):
    served, url = http_server
    shutil.copyfile(cpu_image["path"], served / "scalelab-cpu.sif")
    dest = cluster.shared_dir / f"pulled-{os.getpid()}" / "scalelab-cpu.sif"
    env = cluster.env(tool_env())
    pull = [
        SCALELAB,
        "container",
        "pull",
        f"{url}/scalelab-cpu.sif",
        "--image",
        str(dest),
        "--sha256",
        cpu_image["sha256"],
    ]
    t0 = time.monotonic()
    proc = cluster.srun(["-N1", "-w", "n2", *pull], timeout=300)  # run on a node
    assert "matches the pin" in proc.stdout
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == cpu_image["sha256"]
    print(f"pull of {dest.stat().st_size >> 20} MiB onto n2: {time.monotonic() - t0:.1f} s")
    # A job uses it: both nodes run the pulled image.
    out = cluster.srun(
        [
            "-N2",
            "-n2",
            require_apptainer(),
            "exec",
            "--userns",
            str(dest),
            "bash",
            "-c",
            'echo "$(hostname) $APPTAINER_CONTAINER"',
        ],
        timeout=120,
    )
    lines = out.stdout.split("\n")[:-1]
    assert two_nodes(x.split()[0] for x in lines) and all(x.endswith(f" {dest}") for x in lines)
    # Someone replaces the served image by another one under the same name.
    other = served / "scalelab-cpu.sif"
    with open(other, "ab") as f:
        f.write(b"\0" * 4096)
    before = dest.stat().st_mtime_ns
    proc = run([*pull, "--force"], env=env, check=False, timeout=300)
    assert proc.returncode == 1  # a failed check (the pin), not bad usage
    assert "refused" in proc.stderr and cpu_image["sha256"] in proc.stderr
    assert dest.stat().st_mtime_ns == before
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == cpu_image["sha256"]
    assert not list(dest.parent.glob(".*.pull.*"))  # no partial file left behind
    # A different local image under the destination's name is refused too.
    proc = run([*pull[:-2], "--sha256", "f" * 64], env=env, check=False, timeout=300)
    assert proc.returncode == 2 and "holds a different image" in proc.stderr


# ---- Snakemake's --sdm apptainer: the image's own scalelab, no shell injection ----------------


def _sdm_args() -> list[str]:
    return ["--sdm", "apptainer", "--apptainer-args=--userns"]


def _full_config(image: Path, sha: str, **sweep) -> dict:
    from conftest import REPO

    cfg = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    cfg["sweep"].update(sweep)
    cfg["commbench"] = {"enabled": False}
    cfg["container"] = {"enabled": True, "image": str(image), "nv": False, "sha256": sha}
    return cfg


def test_sdm_jobs_run_the_images_scalelab_even_with_the_host_venv_visible(cpu_image, tmp_path):
    """common.smk's shell prefix must not put the host venv before the image's scalelab."""
    from conftest import REPO
    from test_workflow import snakemake

    wd = tmp_path / "wf"
    wd.mkdir()
    (wd / "c.yaml").write_text(yaml.safe_dump(_full_config(cpu_image["path"], cpu_image["sha256"])))
    (wd / "Snakefile").write_text(
        'configfile: "c.yaml"\n'
        f'include: "{REPO}/workflow/rules/common.smk"\n\n'
        "rule whoami:\n"
        '    output: "whoami.txt"\n'
        "    container: job_image\n"
        "    shell: \"{{ command -v scalelab; python -c 'import sys; print(sys.prefix)'; "
        'echo $APPTAINER_CONTAINER; }} > {output}"\n'
    )
    # The host venv bound inside at its own path: the old prefix would have run it.
    env = tool_env({"APPTAINER_BIND": str(VENV_BIN.parent)})
    snakemake(wd, ["--cores", "1", *_sdm_args(), "whoami.txt"], env=env, timeout=300)
    exe, prefix, image = (wd / "whoami.txt").read_text().split()
    assert exe == "/opt/venv/bin/scalelab" and prefix == "/opt/venv"
    assert image.endswith(f".snakemake/scalelab/images/sha256-{cpu_image['sha256']}.sif")


def test_injection_through_the_image_path_runs_nothing_end_to_end(cpu_image, tmp_path):
    """A container.image carrying $(...) under --sdm apptainer: nothing is executed.

    The image file really exists under that name (a copy of the real image), so only the
    plan-time validator or the quoting can stop it; whichever does, the marker must stay
    absent and no job may run the payload.
    """
    from test_workflow import copy_workflow, snakemake

    evil = tmp_path / "imgs" / "img$(touch PWNED).sif"  # relative: a job's shell runs in wd
    evil.parent.mkdir()
    os.link(cpu_image["path"], evil)
    wd = copy_workflow(tmp_path / "wf")
    marker = wd / "PWNED"
    cfg = _full_config(evil, cpu_image["sha256"], backends=["ddp"], nodes=[1], tasks_per_node=[1])
    (wd / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(
        wd,
        ["results/data", "--cores", "2", *_sdm_args(), "--configfile", "c.yaml"],
        check=False,
        timeout=600,
    )
    assert not marker.exists(), proc.stdout + proc.stderr
    if proc.returncode != 0:  # refused at plan time (sweep.validate's character check)
        assert "container.image" in proc.stderr and not (wd / "results").exists()
    else:  # planned: the stage job ran inside the image through the digest-named alias
        assert (wd / "results" / "data" / "index.json").exists()


def test_sdm_image_alias_defeats_the_shell_even_without_the_validator(cpu_image, tmp_path):
    """Bypassing the validator: the path goes straight to workflow_image, then into
    Snakemake's own --sdm command builder, which pastes the image path unquoted."""
    from snakemake.deployment.singularity import Singularity, shellcmd

    from scalelab.container.wiring import workflow_image

    Singularity().check()  # as Snakemake does before any --sdm job: finds apptainer

    marker = tmp_path / "PWNED"
    evil = tmp_path / "img$(touch PWNED).sif"  # the shell below runs in tmp_path
    os.link(cpu_image["path"], evil)

    def sh(cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", cmd],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    # The test can fail: Snakemake with the raw path executes the payload.
    raw = sh(shellcmd(str(evil), "true", args="--userns", shell_executable="bash"))
    assert marker.exists(), raw.stderr
    marker.unlink()
    alias, pin, _ = workflow_image(
        {"image": str(evil), "sha256": cpu_image["sha256"]},
        submit_host=True,
        state_dir=tmp_path / "state",
    )
    assert pin.sha256 == cpu_image["sha256"] and Path(alias).resolve() == evil
    proc = sh(
        shellcmd(
            alias, "echo inside $APPTAINER_CONTAINER", args="--userns", shell_executable="bash"
        )
    )
    assert proc.returncode == 0, proc.stderr
    assert f"inside {alias}" in proc.stdout and not marker.exists()


# ---- the whole workflow under the shipped profile on the test cluster -------------------------


@pytest.fixture
def cluster_registry(cluster):
    """A real registry (Debian's docker-registry, TLS from a CA made here, htpasswd) on the
    test cluster's host address, its files and trust bundle on the shared directory."""
    from registry_server import start_registry

    d = cluster.shared_dir / f"registry-{os.getpid()}"
    reg = start_registry(
        d, addr=cluster.cluster.spec.host_addr, user="lab", password="Cluster-s3cret-pw"
    )
    try:
        yield reg
    finally:
        reg.stop()
        shutil.rmtree(d, ignore_errors=True)


_CLIENT_VARS = ("SSL_CERT_FILE", "APPTAINER_CONFIGDIR", "APPTAINER_CACHEDIR")


@pytest.mark.cluster
def test_nodes_pull_anonymously_and_an_auth_registry_refuses_a_node_without_a_login(
    cluster, cluster_registry
):
    """Issue 28's other half of the node pull: a registry that wants no credentials (an
    open site mirror) serves a node with an empty login store, pin and signature checked
    there; the credentialed registry refuses a node without a login in one line, and
    nothing lands on the shared path."""
    from registry_server import build_tiny_sif, client_env, login, make_key_pair, start_registry

    d = cluster.shared_dir / f"anon-{os.getpid()}"
    anon = start_registry(d / "registry", addr=cluster.cluster.spec.host_addr)
    try:
        key, pub = make_key_pair(d / "keys", "lab")
        tiny = build_tiny_sif(d / "tiny", require_apptainer())
        pusher = client_env(anon, d / "pusher", cluster.env(tool_env()))  # no login at all
        ref = anon.ref("mirror/tiny:1")
        sha, digest = _signed_pushed(tiny, key, ref, pusher)
        node = client_env(anon, d / "node", cluster.env(tool_env()))  # an empty login store
        assert not any((d / "node" / "apptainer").iterdir())
        pulled = d / "images" / "tiny.sif"
        out = cluster.srun(
            ["-N1", "-w", "n1", SCALELAB, "container", "pull", f"{ref}@{digest}", "--image",
             str(pulled), "--sha256", sha, "--key", str(pub)],
            timeout=300, extra_env={k: node[k] for k in _CLIENT_VARS},
        ).stdout  # fmt: skip
        assert f"signed by {pub}" in out and _sha256_of(pulled) == sha
    finally:
        anon.stop()

    # The credentialed registry: the submit host logs in and pushes, a node without a
    # login is refused.
    reg = cluster_registry
    owner = client_env(reg, d / "owner", cluster.env(tool_env()))
    login(owner, reg)
    ref = reg.ref("lab/tiny:1")
    sha, digest = _signed_pushed(tiny, key, ref, owner)
    stranger = client_env(reg, d / "stranger", cluster.env(tool_env()))
    dest = d / "images" / "refused.sif"
    proc = cluster.srun(
        ["-N1", "-w", "n2", SCALELAB, "container", "pull", f"{ref}@{digest}", "--image",
         str(dest), "--sha256", sha, "--key", str(pub)],
        timeout=300, check=False, extra_env={k: stranger[k] for k in _CLIENT_VARS},
    )  # fmt: skip
    errors = [x for x in proc.stderr.splitlines() if x.startswith("scalelab container: error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stdout + proc.stderr
    assert reg.host in errors[0] and any(
        w in errors[0].lower() for w in ("401", "unauthorized", "authentication", "login")
    ), errors[0]
    assert not dest.exists() and not list(dest.parent.glob("*.tmp*"))


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _signed_pushed(image: Path, key: Path, ref: str, env: dict) -> tuple[str, str]:
    """Sign ``image`` in place, push it to ``ref``: (the file's sha256, manifest digest)."""
    run([SCALELAB, "container", "sign", str(image), "--key", str(key)], env=env, timeout=600)
    out = run([SCALELAB, "container", "push", str(image), ref], env=env, timeout=900).stdout
    digest = next(x for x in out.splitlines() if "container.registry:" in x).split("@", 1)[1]
    return _sha256_of(image), digest.strip()


def _refused_before_any_job(wd: Path, cfg: dict, env: dict, *words: str) -> None:
    """The study under the profile stops at the submit host's check: one line, no job."""
    from test_workflow import copy_workflow, snakemake

    wd = copy_workflow(wd)
    (wd / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(
        wd, ["--profile", "profiles/slurm-apptainer", "--configfile", "c.yaml"], env=env,
        check=False, timeout=900,
    )  # fmt: skip
    said = proc.stdout + proc.stderr
    lines = [line for line in said.splitlines() if line.startswith("container: ")]
    assert proc.returncode != 0 and len(lines) == 1, said[-3000:]
    assert all(w in lines[0] for w in words), lines[0]
    assert not (wd / "results").exists() and not (wd / ".snakemake" / "slurm_logs").exists()
    assert not Path(cfg["container"]["image"]).exists()  # nothing landed on the shared path


@pytest.mark.cluster
@pytest.mark.horovod
def test_workflow_under_slurm_apptainer_profile_on_the_test_cluster(
    cluster, cpu_image, cluster_registry, tmp_path
):
    """The container study, its image from a registry (issue 28): the CPU image signed with
    a key made here, pushed to a TLS registry with credentials on the cluster's network,
    named in the config by reference, pin and public key; the submit host pulls and
    verifies it once onto the shared filesystem, the nodes train in it. Then a tampered
    re-push is refused at the digest and another key's image at the signature, each in
    one line before any job."""
    from registry_server import client_env, login, make_key_pair
    from test_workflow import copy_workflow, snakemake

    reg, pid = cluster_registry, os.getpid()
    keys = cluster.shared_dir / f"keys-{pid}"
    lab_key, lab_pub = make_key_pair(keys, "lab")
    other_key, _ = make_key_pair(keys, "other")
    client = cluster.shared_dir / f"client-{pid}"
    env = client_env(reg, client, cluster.env(tool_env()))
    login(env, reg)  # Apptainer's login store, on the shared path the nodes see too
    signed = client / "scalelab-cpu.sif"
    shutil.copyfile(cpu_image["path"], signed)
    ref = reg.ref("lab/scalelab-cpu:ci")
    sha, digest = _signed_pushed(signed, lab_key, ref, env)
    assert sha != cpu_image["sha256"]  # signing changed the bytes: this is the pin
    images = cluster.shared_dir / f"images-{pid}"
    # A node pulls it with the stored credentials, checks the pin and the signature.
    pulled = images / "node-pull.sif"
    out = cluster.srun(
        ["-N1", "-w", "n2", SCALELAB, "container", "pull", f"{ref}@{digest}", "--image",
         str(pulled), "--sha256", sha, "--key", str(lab_pub)],
        timeout=900, extra_env={k: env[k] for k in ("SSL_CERT_FILE", "APPTAINER_CONFIGDIR",
                                                    "APPTAINER_CACHEDIR")},
    ).stdout  # fmt: skip
    assert f"signed by {lab_pub}" in out and _sha256_of(pulled) == sha
    pulled.unlink()

    image = images / "scalelab-cpu.sif"  # not there yet: the workflow pulls it
    wd = copy_workflow(cluster.shared_dir / f"wf-container-{pid}")
    cfg = _full_config(image, sha, nodes=[2], tasks_per_node=[1])
    cfg["container"].update(registry=f"{ref}@{digest}", trusted_keys=[str(lab_pub)])
    (wd / "c.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.monotonic()
    proc = snakemake(
        wd,
        [
            "--profile",
            "profiles/slurm-apptainer",
            "--configfile",
            "c.yaml",
            "--slurm-init-seconds-before-status-checks",
            "3",
            "--retries",
            "0",
            "--slurm-keep-successful-logs",
        ],  # the proof below reads the job logs
        env=env,
        timeout=1500,
    )
    print(f"workflow under slurm-apptainer, image from the registry: {time.monotonic() - t0:.0f} s")
    assert _sha256_of(image) == sha
    for backend in ("ddp", "horovod"):
        run_dir = wd / "results" / "runs" / f"{backend}-strong-n2-t1-g0-r0"
        info = json.loads((run_dir / "run_info.json").read_text())
        assert two_nodes(info["hostnames"])
        proof = info["container"]
        assert proof["image_sha256"] == sha and proof["sys_prefix"] == "/opt/venv"
        assert proof["os_release"]["VERSION_CODENAME"] == "bookworm"
        record = json.loads((run_dir / "container.json").read_text())
        assert record["sha256"] == sha and record["hashed_by"].startswith("submit host")
        assert record["signed_by"] == str(lab_pub) and record["registry"] == f"{ref}@{digest}"
        from scalelab.provenance import FILE, validate

        manifest = json.loads((run_dir / FILE).read_text())
        validate(manifest, str(run_dir / FILE))  # issue 17: every workflow run, in the image too
        assert manifest["must_match"]["image_sha256"] == sha
        log = (wd / "logs" / "train" / f"{backend}-strong-n2-t1-g0-r0.log").read_text()
        launched = next(line for line in log.splitlines() if line.startswith("scalelab launch:"))
        assert "apptainer exec" in launched and "--userns" in launched
        assert "--mpi=pmix" in launched and f"SCALELAB_IMAGE_SHA256={sha}" in launched
        assert (run_dir / "evaluation.json").exists()
    assert (wd / "results" / "analysis" / "scaling.csv").exists()
    # Stage, evaluate and analyze ran as Slurm jobs inside the image (Snakemake's --sdm).
    alias = f".snakemake/scalelab/images/sha256-{sha}.sif"
    for rule in ("stage", "evaluate", "analyze"):
        logs = list((wd / ".snakemake" / "slurm_logs").glob(f"rule_{rule}/**/*.log"))
        assert logs, rule
        assert any(alias in p.read_text() for p in logs), (rule, logs[0].read_text()[-2000:])
    # The registry password is in no output and no log of the study.
    said = proc.stdout + proc.stderr + reg.log.read_text()
    said += "".join(p.read_text(errors="replace") for p in wd.rglob("*.log"))
    auth = base64.b64encode(f"{reg.user}:{reg.password}".encode()).decode()
    assert reg.password not in said and auth.rstrip("=") not in said

    # The same SIF with one data object added, re-pushed under the same tag: refused at
    # the digest (the config names the tag and the file's pin).
    tampered = client / "tampered.sif"
    shutil.copyfile(signed, tampered)
    (client / "payload.txt").write_text("not what the lab signed\n")
    run([require_apptainer(), "sif", "add", "--datatype", "7", str(tampered),
         str(client / "payload.txt")], env=env)  # fmt: skip
    run([SCALELAB, "container", "push", str(tampered), ref], env=env, timeout=900)
    bad = dict(cfg, container=dict(cfg["container"], registry=ref, image=str(images / "t.sif")))
    _refused_before_any_job(
        cluster.shared_dir / f"wf-tampered-{pid}", bad, env,
        f"has sha256 {_sha256_of(tampered)}", f"pinned {sha}",
    )  # fmt: skip
    # An image signed by another key, pinned correctly: refused at the signature.
    other = client / "other.sif"
    shutil.copyfile(cpu_image["path"], other)
    other_ref = reg.ref("lab/scalelab-cpu:other")
    other_sha, _ = _signed_pushed(other, other_key, other_ref, env)
    bad = dict(
        cfg,
        container=dict(
            cfg["container"], registry=other_ref, sha256=other_sha, image=str(images / "o.sif")
        ),
    )
    _refused_before_any_job(
        cluster.shared_dir / f"wf-otherkey-{pid}", bad, env,
        f"signature refused for {other_ref}", "by none of the trusted keys", str(lab_pub),
    )  # fmt: skip
