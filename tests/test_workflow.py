"""The Snakemake workflow for real: lint, bad config, a local run, reruns, and the
same workflow through `--profile slurm` on the 2-node test cluster."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, VENV_BIN, tool_env, two_nodes

PY = str(VENV_BIN / "python")
WORKFLOW_FILES = ["Snakefile", "workflow", "config", "profiles", "slurm", ".test"]


def copy_workflow(dest: Path) -> Path:
    """The pipeline as a user would send it to a collaborator: workflow files only."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_symlink():
            (dest / name).symlink_to(src.readlink())
        elif src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True)
        else:
            shutil.copy2(src, dest / name)
    # The schema link points into the package; resolve it for the copy.
    schema = dest / "workflow" / "schemas" / "config.schema.yaml"
    schema.unlink()
    shutil.copy2(REPO / "workflow" / "schemas" / "config.schema.yaml", schema)
    return dest


def snakemake(
    wd: Path, args: list[str], env: dict | None = None, timeout: float = 900, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [PY, "-m", "snakemake", *args],
        cwd=wd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or tool_env(),
    )
    if check and proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in (wd / "logs").rglob("*.log"))
        raise AssertionError(
            f"snakemake {args} exited {proc.returncode}\n{proc.stderr[-5000:]}\n{logs}"
        )
    return proc


def planned_jobs(wd: Path, args: list[str]) -> dict[str, int]:
    """Rule -> count of the jobs a dry run would execute."""
    out = snakemake(wd, ["-n", "--cores", "2", *args]).stdout
    counts: dict[str, int] = {}
    if "Job stats:" not in out:
        return counts
    table = out.split("Job stats:")[1].split("\n\n")[0].splitlines()[3:]
    for line in table:
        name, n = line.split()
        if name not in ("total", "all"):
            counts[name] = int(n)
    return counts


def test_lint_and_format_clean():
    lint = subprocess.run(
        [PY, "-m", "snakemake", "--lint", "--configfile", ".test/config.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=tool_env(),
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Lints for" not in lint.stdout + lint.stderr
    files = ["Snakefile", *map(str, sorted((REPO / "workflow" / "rules").glob("*.smk")))]
    fmt = subprocess.run(
        [str(VENV_BIN / "snakefmt"), "--check", *files],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


@pytest.mark.parametrize(
    "change, field",
    [
        ({"sweep": {"nodes": [0]}}, "sweep.nodes[0]"),
        ({"sweep": {"backends": ["mpich"]}}, "sweep.backends[0]"),
        (
            {"sweep": {"tasks_per_node": [3]}, "cluster": {"cpus_per_node": 2}},
            "sweep.tasks_per_node[0]",
        ),
        ({"sweep": {"nodes": ["two"]}}, "sweep.nodes[0]"),
        ({"colour": "blue"}, "colour: unknown key"),
    ],
)
def test_invalid_config_stops_before_any_job(tmp_path, change, field):
    wd = copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wd / ".test" / "config.yaml").read_text())
    for key, value in change.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    (wd / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(wd, ["--cores", "1", "--configfile", "bad.yaml"], check=False)
    assert proc.returncode != 0
    assert field in proc.stderr
    assert not (wd / "results").exists() and not (wd / "logs").exists()


TIMED = ("train", "commbench")


def job_events(log: str) -> list[tuple[str, str, str]]:
    """(start|end, rule, jobid) in the order Snakemake's scheduler reported them."""
    events, rule = [], None
    for line in log.splitlines():
        start = re.match(r"^(?:local)?rule (\w+):$", line)
        if start:
            rule = start.group(1)
            continue
        jobid = re.match(r"^\s+jobid: (\d+)$", line)
        if jobid and rule:
            events.append(("start", rule, jobid.group(1)))
            rule = None
            continue
        done = re.match(r"^Finished jobid: (\d+) \(Rule: (\w+)\)", line)
        if done:
            events.append(("end", done.group(2), done.group(1)))
    return events


def assert_timed_jobs_ran_alone(log: str) -> int:
    """No job ran beside a training or commbench job (issue 15: timed jobs never share
    cores). Checks the order of the scheduler's start/finish records, not timings."""
    running: dict[str, str] = {}
    timed = 0
    for kind, rule, jobid in job_events(log):
        if kind == "start":
            others = {r for j, r in running.items() if r != "all"}
            assert not (rule in TIMED and others), f"{rule} {jobid} started beside {others}"
            assert not any(r in TIMED for r in others), f"{rule} started beside {others}"
            running[jobid] = rule
            timed += rule in TIMED
        else:
            running.pop(jobid, None)
    return timed


def test_exclusivity_check_catches_overlap():
    """The checker used on the real run below fails on a timed job beside another job."""
    ok = (
        "rule stage:\n    jobid: 2\nFinished jobid: 2 (Rule: stage)\n"
        "rule train:\n    jobid: 3\nFinished jobid: 3 (Rule: train)\n"
    )
    assert assert_timed_jobs_ran_alone(ok) == 1
    overlap = (
        "rule evaluate:\n    jobid: 5\nrule train:\n    jobid: 3\n"
        "Finished jobid: 5 (Rule: evaluate)\nFinished jobid: 3 (Rule: train)\n"
    )
    with pytest.raises(AssertionError, match="started beside"):
        assert_timed_jobs_ran_alone(overlap)


def test_local_run_end_to_end_then_rerun_nothing_then_one_change(tmp_path):
    wd = copy_workflow(tmp_path / "wf")
    proc = snakemake(wd, ["--cores", "2", "--configfile", ".test/config.yaml"])
    assert assert_timed_jobs_ran_alone(proc.stderr) == 5  # 4 training jobs + commbench
    res = wd / "results"
    runs = sorted(p.name for p in (res / "runs").iterdir())
    assert runs == [
        "ddp-strong-n1-t1-g0-r0",
        "ddp-strong-n1-t2-g0-r0",
        "horovod-strong-n1-t1-g0-r0",
        "horovod-strong-n1-t2-g0-r0",
    ]
    for run in runs:
        summary = json.loads((res / "runs" / run / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert summary["world_size"] == int(run.split("-t")[1][0])
        evaluation = json.loads((res / "runs" / run / "evaluation.json").read_text())
        assert evaluation["split"] == "test" and 0 <= evaluation["accuracy"] <= 1
        assert (wd / "logs" / "train" / f"{run}.log").stat().st_size > 0
        assert (res / "benchmarks" / "train" / f"{run}.tsv").exists()
    # N ranks compute what 1 rank computes, and both backends agree (deterministic, CPU).
    weights = {run: torch.load(res / "runs" / run / "model.pt", weights_only=True) for run in runs}
    ref = weights["ddp-strong-n1-t1-g0-r0"]
    for run, state in weights.items():
        for name, tensor in ref.items():
            assert torch.allclose(state[name], tensor, atol=1e-5), (run, name)
    table = (res / "analysis" / "scaling.csv").read_text()
    assert "efficiency" in table.splitlines()[0]
    assert (res / "predict" / "ddp" / "prediction.csv").exists()
    assert (res / "commbench" / "torch").is_dir()

    # A finished workflow has nothing left to do.
    assert planned_jobs(wd, ["--configfile", ".test/config.yaml"]) == {}

    # One more sweep value: only its jobs (and the analysis over all runs) run.
    cfg = yaml.safe_load((wd / ".test" / "config.yaml").read_text())
    cfg["sweep"]["modes"] = ["strong", "weak"]
    (wd / "more.yaml").write_text(yaml.safe_dump(cfg))
    plan = planned_jobs(wd, ["--configfile", "more.yaml"])
    assert plan == {"train": 4, "evaluate": 4, "analyze": 1, "predict": 1, "effective_config": 1}

    # The report bundles the analysis.
    snakemake(wd, ["--cores", "1", "--configfile", ".test/config.yaml", "--report", "report.html"])
    html = (wd / "report.html").read_text(errors="replace")
    assert "throughput.png" in html and "scaling.csv" in html and "config.yaml" in html
    effective = yaml.safe_load((res / "config.yaml").read_text())
    assert effective["sweep"]["backends"] == ["ddp", "horovod"]
    assert effective["resources"]["runtime"] == 60  # a schema default, filled in


def test_failing_training_job_leaves_no_complete_output(tmp_path):
    wd = copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wd / ".test" / "config.yaml").read_text())
    cfg["sweep"].update(backends=["ddp"], tasks_per_node=[1])
    # A split the staged data does not have: only the job can know (plan time does not read
    # the dataset), so the job fails.
    cfg["train"]["data"] = {"val_split": "no_such_split"}
    (wd / "fail.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(wd, ["--cores", "1", "--configfile", "fail.yaml"], check=False)
    assert proc.returncode != 0
    run_dir = wd / "results" / "runs" / "ddp-strong-n1-t1-g0-r0"
    assert not (run_dir / "summary.json").exists()
    assert not (run_dir / "model.pt").exists()
    log = (wd / "logs" / "train" / "ddp-strong-n1-t1-g0-r0.log").read_text()
    assert "no_such_split" in log


def _final_metrics(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return {k: s[k] for k in ("train_loss", "val_loss", "val_acc", "global_steps")}


def test_slurm_profile_on_test_cluster_matches_local(cluster, tmp_path):
    """`snakemake --profile slurm` as users type it: real sbatch, 2-node srun --mpi=pmix jobs."""
    cfg = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    cfg["sweep"].update(nodes=[2], tasks_per_node=[1])
    cfg["commbench"] = {"enabled": False}

    # Local reference: the same 2-rank runs with mpirun on this machine.
    local = copy_workflow(tmp_path / "local")
    (local / "two.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(local, ["--cores", "2", "--configfile", "two.yaml"])

    wd = copy_workflow(cluster.shared_dir / f"wf-{tmp_path.name}")
    (wd / "two.yaml").write_text(yaml.safe_dump(cfg))
    env = cluster.env()
    before = subprocess.run(
        ["squeue", "--states=all", "-h", "-o", "%i"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    snakemake(
        wd,
        [
            "--profile",
            "slurm",
            "--configfile",
            "two.yaml",
            "--slurm-init-seconds-before-status-checks",
            "3",
        ],
        env=env,
        timeout=900,
    )
    for backend in ("ddp", "horovod"):
        run = f"{backend}-strong-n2-t1-g0-r0"
        info = json.loads((wd / "results" / "runs" / run / "run_info.json").read_text())
        assert two_nodes(info["hostnames"]), info
        assert info["layout"]["launcher"] == "slurm"
        log = (wd / "logs" / "train" / f"{run}.log").read_text()
        assert "srun --mpi=pmix --nodes=2 --ntasks=2" in log.replace(
            shutil.which("srun", path=env["PATH"]) or "srun", "srun"
        )
        got = _final_metrics(wd / "results" / "runs" / run)
        want = _final_metrics(local / "results" / "runs" / run)
        assert got["global_steps"] == want["global_steps"]
        for key in ("train_loss", "val_loss", "val_acc"):
            assert abs(got[key] - want[key]) <= 1e-4 * max(1.0, abs(want[key])), (key, got, want)
    # Slurm really ran every job: the controller still lists them (MinJobAge=3600 s).
    jobs = subprocess.run(
        ["squeue", "--states=all", "-h", "-o", "%i|%T|%D|%N"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    rows = [job.split("|") for job in jobs if job.split("|")[0] not in before]
    assert len(rows) >= 6 and all(state == "COMPLETED" for _, state, _, _ in rows), rows
    assert sum(nodes == "2" for _, _, nodes, _ in rows) == 2, rows  # the 2 training jobs


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
