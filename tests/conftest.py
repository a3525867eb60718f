"""Shared fixtures: the repository, the venv's tools, and the Slurm test cluster."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SCRIPTS = REPO / "tests" / "scripts"


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ with the venv's bin (mpirun, horovodrun, scalelab) first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def run(
    cmd: list[str], timeout: float = 120, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env or tool_env(), check=False
        )
    except subprocess.TimeoutExpired as exc:
        # What each process printed before it hung is the only clue to which one did.
        raise AssertionError(
            f"{cmd} still running after {timeout} s\nstdout:\n{_text(exc.stdout)}\n"
            f"stderr:\n{_text(exc.stderr)}"
        ) from None
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def scalelab_main(*argv: object) -> tuple[int, str, str]:
    """``scalelab ARGV`` in this process: (exit code, stdout, stderr). Fast enough for the
    validation matrices; the subprocess tests keep the real entry point covered."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from scalelab import cli

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def mpirun(
    n: int, args: list[str], timeout: float = 120, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "mpirun"), "--allow-run-as-root", "--oversubscribe", "-n", str(n), *args]
    return run(cmd, timeout=timeout, env=env, check=check)


def require(ok: bool, reason: str) -> None:
    """Skip only where the thing truly cannot exist; in CI (SCALELAB_REQUIRE_CLUSTER=1, the
    project's own machine kind) a missing piece is a failure, never a skip."""
    if ok:
        return
    if os.environ.get("SCALELAB_REQUIRE_CLUSTER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def require_cluster() -> None:
    """Skip only where the cluster truly cannot exist; CI sets SCALELAB_REQUIRE_CLUSTER=1."""
    from scalelab.testcluster.spec import missing_requirements

    problems = missing_requirements()
    require(not problems, "test cluster unavailable: " + "; ".join(problems))


class ClusterHandle:
    """The running test cluster as tests use it."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.shared_dir: Path = cluster.shared_dir

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return self.cluster.env(tool_env(extra))

    def srun(
        self,
        args: list[str],
        timeout: float = 180,
        check: bool = True,
        extra_env: dict | None = None,
    ) -> subprocess.CompletedProcess:
        return run(["srun", *args], timeout=timeout, env=self.env(extra_env), check=check)


@pytest.fixture(scope="session")
def cluster():
    require_cluster()
    from scalelab.testcluster.cluster import TestCluster
    from scalelab.testcluster.spec import ClusterSpec

    # 3 nodes: studies with 1-, 2- and 3-node points (test_slurm_profile). 4 CPUs and 4
    # stand-in GPUs (null devices as GRES) per node: the GPU example's 4 ranks x 1 GPU per
    # node fit, and the scheduler accepts or refuses GPU geometry for real.
    spec = ClusterSpec.from_env(
        nodes=3, cpus_per_node=4, gpus_per_node=4, shared=[REPO, Path(sys.prefix)]
    )
    tc = TestCluster(spec)
    tc.up()
    yield ClusterHandle(tc)
    tc.down()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item (``item.rep_call``) for fixtures that tally."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def pytest_collection_modifyitems(config, items):
    """Tests that kill or remount a node of the session's cluster run last, so that a
    node they leave changed (fresh slurmd, new mounts) cannot disturb any other test."""
    for item in items:  # the `cluster` tier is whatever uses the cluster, marked or not
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
    # The GPU image's tier (a cold build: ~24 GB, ~13 min) runs only when a -m expression
    # names it (`-m gpu_image`); any other run, .ci/run's included, deselects it.
    if "gpu_image" not in (config.option.markexpr or ""):
        chosen = [i for i in items if i.get_closest_marker("gpu_image") is None]
        if len(chosen) != len(items):
            config.hook.pytest_deselected(items=[i for i in items if i not in chosen])
            items[:] = chosen
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)


def two_nodes(hosts) -> bool:
    """Whether ``hosts`` (per rank, in rank order) name exactly two distinct test-cluster
    nodes. Slurm picks which two of the session cluster's nodes a 2-node job gets."""
    hosts = list(hosts)
    return len(set(hosts)) == 2 and all(re.fullmatch(r"n\d+", h) for h in hosts)
