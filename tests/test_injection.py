"""No config value, and not the checkout path, reaches a shell unquoted.

Payloads `$(...)`, backticks, `;` and a newline, each of which would create a marker
file if a shell ran it, are planted in every config string that can reach sbatch, srun,
apptainer or a job's shell:

* in-process, through `sweep.validate` (what common.smk calls): each is refused at plan
  time with one line naming the field and the character;
* the checkout path cannot be restricted: the slurm plugin's sbatch line is run by a
  shell exactly as the plugin runs it, with and without `pass_command_as_script`;
* end to end, a workflow in a directory named with payloads runs through the slurm
  executor on the test cluster (1-rank and 2-rank jobs, both job-step paths).

No planted command may run.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO
from reliability import tally_fixtures
from test_workflow import copy_workflow, snakemake

from scalelab import sweep
from scalelab.errors import UsageError

BASE = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
MARK = "PWNED"
PAYLOADS = {
    "dollar": f"x$(touch {MARK}-dollar)",
    "backtick": f"x`touch {MARK}-tick`",
    "semicolon": f"x;touch {MARK}-semi",
    "newline": f"x\ntouch {MARK}-newline",
}
CHAR = {"dollar": "'$'", "backtick": "'`'", "semicolon": "';'", "newline": "'\\n'"}

# Every config string that can reach a command line, and how to plant a value there.
FIELDS = {
    "results": lambda c, v: c.update(results=v),
    "data.path": lambda c, v: c["data"].update(source="npz", path=v),
    "data.scratch": lambda c, v: c["data"].update(scratch=v),
    "analysis.from_csv[0]": lambda c, v: c.setdefault("analysis", {}).update(from_csv=[v]),
    "container.image": lambda c, v: c.setdefault("container", {}).update(image=v),
    "container.binds[0]": lambda c, v: c.setdefault("container", {}).update(binds=[v]),
    "container.exec_flags[0]": lambda c, v: c.setdefault("container", {}).update(
        exec_flags=[f"--cleanenv={v}"]),
    "resources.slurm_partition": lambda c, v: c.setdefault("resources", {}).update(
        slurm_partition=v),
    "resources.slurm_account": lambda c, v: c.setdefault("resources", {}).update(
        slurm_account=v),
    "resources.constraint": lambda c, v: c.setdefault("resources", {}).update(constraint=v),
    "resources.qos": lambda c, v: c.setdefault("resources", {}).update(qos=v),
    "resources.slurm_extra[0]": lambda c, v: c.setdefault("resources", {}).update(
        slurm_extra=[f"--comment-x={v}"]),
    "resources.rules.train.slurm_partition": lambda c, v: c.setdefault("resources", {}).update(
        rules={"train": {"slurm_partition": v}}),
    "launch.extra_srun_args[0]": lambda c, v: c["launch"].update(
        extra_srun_args=[f"--cpu-bind={v}"]),
    "launch.socket_ifname": lambda c, v: c["launch"].update(socket_ifname=v),
    "launch.srun_mpi": lambda c, v: c["launch"].update(srun_mpi=v),
    "train.data.val_split": lambda c, v: c["train"].setdefault("data", {}).update(val_split=v),
}

tally, _count = tally_fixtures("injection-vectors", "cases_tried",
                                "planted_commands_not_executed")



@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("field", sorted(FIELDS))
def test_planted_value_is_refused_at_plan_time(tmp_path, monkeypatch, field, payload):
    monkeypatch.chdir(tmp_path)
    cfg = copy.deepcopy(BASE)
    FIELDS[field](cfg, PAYLOADS[payload])
    with pytest.raises(UsageError) as err:
        sweep.validate(cfg)
    message = str(err.value)
    assert "\n" not in message
    if field == "launch.srun_mpi":  # a schema pattern: [A-Za-z0-9_]+
        assert "launch.srun_mpi" in message and "does not match" in message
    elif field == "train.data.val_split":  # the workflow owns the data section of a run
        assert "train.data" in message
    else:
        assert f"{field}: character {CHAR[payload]}" in message, message
    assert not list(tmp_path.glob(f"{MARK}*"))


def _plugin_sbatch_line(workdir: str, script: bool) -> tuple[str, str | None]:
    """The sbatch shell line (and stdin) the slurm plugin 2.x builds, from its own code."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command

    class Resources(dict):
        __getattr__ = dict.__getitem__

    job = SimpleNamespace(resources=Resources(tasks=1, cpus_per_task=1, runtime=5), threads=1)
    call = get_submit_command(job, {"run_uuid": "u", "slurm_logfile": "log", "comment_str": "c",
                                    "account": "", "partition": "", "workdir": workdir})
    # What the plugin does with the job's command (format_job_exec quotes the workdir
    # with shlex, as Snakemake does for --snakefile and --directory):
    exec_job = f"python -m snakemake --directory '{workdir}' --target-jobs 'x:'"
    if script:
        return call + " /dev/stdin", "\n".join(["#!/bin/sh", exec_job])
    return call + ' --wrap="{}"'.format(exec_job.replace('"', '\\"')), None


@pytest.mark.parametrize("script", [True, False], ids=["pass-command-as-script", "wrap"])
def test_checkout_path_through_the_plugin_sbatch_line(tmp_path, script):
    """The plugin runs its sbatch line with shell=True; an `sbatch` that only records its
    arguments stands in for the real one here (the end-to-end test below uses the real)."""
    workdir = tmp_path / f"wf-$(touch {MARK}-dollar)-`touch {MARK}-tick`"
    workdir.mkdir()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$ARGS\"\ncat >/dev/null\n")
    (fake / "sbatch").chmod(0o755)
    line, stdin = _plugin_sbatch_line(str(workdir), script)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "ARGS": str(tmp_path / "a")}
    subprocess.run(line, shell=True, cwd=tmp_path, env=env, input=stdin, text=True, check=True)
    planted = sorted(p.name for p in tmp_path.rglob(f"{MARK}*"))
    if script:
        assert planted == []  # what profiles/slurm uses
        assert str(workdir) in (tmp_path / "a").read_text().splitlines()  # -D intact
    else:
        # The upstream bug (see docs): --wrap="..." lets the submitting shell run them.
        assert planted == [f"{MARK}-dollar", f"{MARK}-tick"]


def test_profiles_pass_the_command_as_a_script():
    for profile in ("slurm", "slurm-apptainer"):
        cfg = yaml.safe_load((REPO / "profiles" / profile / "config.yaml").read_text())
        assert cfg["slurm-pass-command-as-script"] is True, profile


def test_checkout_path_with_payloads_end_to_end(cluster):
    """A workflow whose directory name plants commands, through --profile slurm and the real
    sbatch: the 1-rank job (plugin's srun -n1 step) and the 2-rank job (batch script +
    srun) complete, and nothing planted runs on the submit host or a node."""
    root = cluster.shared_dir / f"inj-{os.getpid()}"
    wd = copy_workflow(root / f"wf-$(touch {MARK}-dollar)-`touch {MARK}-tick`;x")
    cfg = copy.deepcopy(BASE)
    cfg["sweep"].update(backends=["ddp"], nodes=[1], tasks_per_node=[1, 2])
    cfg["train"]["train"]["epochs"] = 1
    (wd / "inj.yaml").write_text(yaml.safe_dump(cfg))
    targets = [f"results/runs/ddp-strong-n1-t{t}-g0-r0/summary.json" for t in (1, 2)]
    snakemake(wd, [*targets, "--profile", "slurm", "--configfile", "inj.yaml",
                   "--slurm-init-seconds-before-status-checks", "2"], env=cluster.env(),
              timeout=900)
    for t in (1, 2):
        assert (wd / targets[t - 1]).exists()
    planted = [p for p in Path(root).rglob(f"{MARK}*")] + list(Path("/").glob(f"{MARK}*"))
    assert planted == []
