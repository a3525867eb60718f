"""No config value, and not the checkout path, reaches a shell unquoted.

Payloads `$(...)`, backticks, `;` and a newline, each of which would create a marker
file if a shell ran it, are planted in every config string that can reach sbatch, srun,
apptainer or a job's shell:

* in-process, through `study_config.validate` (what common.smk calls): each is refused at plan
  time with one line naming the field and the character;
* the slurm plugin's sbatch line is run by a shell exactly as the plugin runs it, with
  and without `pass_command_as_script`, from a directory named with payloads;
* the study's own path is checked like every config path at plan time (Snakemake
  writes it into `--sdm apptainer` job scripts with Python's repr: a `'` lets `$(...)`
  run; docs/upstream/snakemake-home-quoting.md): a study directory named with
  `'$(touch ...)` is refused in one line by `snakemake -n`, `--plan`, and end to end on
  the test cluster before anything is submitted;
* a config that turns on `__use_yte__` (Snakemake runs its Python) is refused by the
  workflow, `--plan` and `import` unless the user opts in.

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

from scalelab.errors import UsageError
from scalelab.study import config as study_config

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
    "container.trusted_keys[0]": lambda c, v: c.setdefault("container", {}).update(
        trusted_keys=[v]
    ),
    "container.exec_flags[0]": lambda c, v: c.setdefault("container", {}).update(
        exec_flags=[f"--cleanenv={v}"]
    ),
    "resources.slurm_partition": lambda c, v: c.setdefault("resources", {}).update(
        slurm_partition=v
    ),
    "resources.slurm_account": lambda c, v: c.setdefault("resources", {}).update(slurm_account=v),
    "resources.constraint": lambda c, v: c.setdefault("resources", {}).update(constraint=v),
    "resources.qos": lambda c, v: c.setdefault("resources", {}).update(qos=v),
    "resources.slurm_extra[0]": lambda c, v: c.setdefault("resources", {}).update(
        slurm_extra=[f"--comment-x={v}"]
    ),
    "resources.rules.train.slurm_partition": lambda c, v: c.setdefault("resources", {}).update(
        rules={"train": {"slurm_partition": v}}
    ),
    "launch.extra_srun_args[0]": lambda c, v: c["launch"].update(
        extra_srun_args=[f"--cpu-bind={v}"]
    ),
    "launch.socket_ifname": lambda c, v: c["launch"].update(socket_ifname=v),
    "launch.srun_mpi": lambda c, v: c["launch"].update(srun_mpi=v),
    "train.data.val_split": lambda c, v: c["train"].setdefault("data", {}).update(val_split=v),
}

tally, _count = tally_fixtures("injection-vectors", "cases_tried", "planted_commands_not_executed")


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("field", sorted(FIELDS))
def test_planted_value_is_refused_at_plan_time(tmp_path, monkeypatch, field, payload):
    monkeypatch.chdir(tmp_path)
    cfg = copy.deepcopy(BASE)
    FIELDS[field](cfg, PAYLOADS[payload])
    with pytest.raises(UsageError) as err:
        study_config.validate(cfg)
    message = str(err.value)
    assert "\n" not in message
    if field == "launch.srun_mpi":  # a schema pattern: [A-Za-z0-9_]+
        assert "launch.srun_mpi" in message and "does not match ^[A-Za-z0-9_]+$" in message
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
    call = get_submit_command(
        job,
        {
            "run_uuid": "u",
            "slurm_logfile": "log",
            "comment_str": "c",
            "account": "",
            "partition": "",
            "workdir": workdir,
        },
    )
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
    (fake / "sbatch").write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" > "$ARGS"\ncat >/dev/null\n')
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
    sbatch: refused at plan time in one line (exit 2), nothing submitted, nothing planted
    runs on the submit host or a node."""
    root = cluster.shared_dir / f"inj-{os.getpid()}"
    wd = copy_workflow(root / f"wf-'$(touch {MARK}-dollar)'-`touch {MARK}-tick`;x")
    cfg = copy.deepcopy(BASE)
    cfg["sweep"].update(backends=["ddp"], nodes=[1], tasks_per_node=[1, 2])
    (wd / "inj.yaml").write_text(yaml.safe_dump(cfg))
    env = cluster.env()
    before = subprocess.run(
        ["squeue", "--states=all", "-h", "-o", "%i"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    proc = snakemake(
        wd, ["--profile", "slurm", "--configfile", "inj.yaml"], env=env, check=False, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "study directory" in proc.stderr and "Traceback" not in proc.stderr
    after = subprocess.run(
        ["squeue", "--states=all", "-h", "-o", "%i"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert after == before
    planted = [p for p in Path(root).rglob(f"{MARK}*")] + list(Path("/").glob(f"{MARK}*"))
    assert planted == []


# -- issue 23: the study's own path, and YTE configs. Each plants
# `touch $TMP/PWNED-<uuid>` and asserts the file never appears.


def _pwned(tmp_path: Path) -> tuple[Path, str]:
    """A marker path unique to this test, and the command that would create it (``$TMP``
    is ``tmp_path`` in :func:`_env`)."""
    import uuid

    name = f"{MARK}-{uuid.uuid4().hex}"
    return tmp_path / name, f"touch $TMP/{name}"


def _env(tmp_path: Path) -> dict:
    from conftest import tool_env

    return {**tool_env(), "TMP": str(tmp_path)}


def test_study_directory_with_quote_and_command_is_refused_by_the_workflow(tmp_path):
    marker, command = _pwned(tmp_path)
    wd = copy_workflow(tmp_path / f"study-'$({command})'")
    proc = snakemake(
        wd,
        ["-n", "--cores", "1", "--configfile", str(REPO / ".test" / "config.yaml")],
        env=_env(tmp_path),
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(
        "scalelab workflow: error: workflow: study directory "
    ), errors
    assert 'character "\'" is not allowed in a path' in errors[0], errors
    assert not marker.exists()


def test_study_directory_with_quote_and_command_is_refused_by_plan(tmp_path):
    import sys

    marker, command = _pwned(tmp_path)
    study = tmp_path / f"study-'$({command})'"
    study.mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-m", "scalelab", "plan", str(REPO / ".test" / "config.yaml")],
        cwd=study,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "study directory" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def _yte_config(tmp_path: Path, command: str) -> str:
    """The test config as a YTE template whose `results` runs `command` when evaluated."""
    return "__use_yte__: true\n" + (REPO / ".test" / "config.yaml").read_text().replace(
        "results: results", f"results: ?__import__('os').system({command!r}) or 'results'"
    )


def test_use_yte_config_is_refused_by_the_workflow(tmp_path):
    """As config/config.yaml, checked before Snakemake reads (and evaluates) it."""
    marker, command = _pwned(tmp_path)
    wd = copy_workflow(tmp_path / "wf")
    (wd / "config" / "config.yaml").write_text(_yte_config(tmp_path, command))
    proc = snakemake(wd, ["-n", "--cores", "1"], env=_env(tmp_path), check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "__use_yte__: true makes Snakemake run the Python" in errors[0]
    assert "SCALELAB_ALLOW_YTE=1" in errors[0]
    assert not marker.exists()


def test_use_yte_config_is_refused_by_plan_unless_allowed(tmp_path):
    import sys

    marker, command = _pwned(tmp_path)
    cfg = tmp_path / "yte.yaml"
    cfg.write_text(_yte_config(tmp_path, command))
    proc = subprocess.run(
        [sys.executable, "-m", "scalelab", "plan", str(cfg)],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "pass --allow-yte if you trust its author" in proc.stderr
    assert not marker.exists()
    # The opt-in evaluates the template (here a harmless one) as Snakemake would.
    cfg.write_text(_yte_config(tmp_path, "true"))
    proc = subprocess.run(
        [sys.executable, "-m", "scalelab", "plan", str(cfg), "--allow-yte"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "training run(s)" in proc.stdout, proc.stderr


def test_use_yte_config_is_refused_by_import(tmp_path, monkeypatch):
    """A bundle holding a YTE config: `import` refuses it in one line, exit 2, unless
    --allow-yte; the bundle is otherwise intact (its inventory matches)."""
    from scalelab import bundle
    from scalelab.cli import main

    marker, command = _pwned(tmp_path)
    root = tmp_path / "b"
    (root / "study" / "config").mkdir(parents=True)
    (root / "study" / "config" / "config.yaml").write_text(_yte_config(tmp_path, command))
    files = bundle.inventory(root)
    meta = {
        "format": bundle.FORMAT,
        "version": bundle.VERSION,
        "study": "study",
        "results": "results",
        "files": files,
        "runs": [],
        "images": [],
    }
    monkeypatch.setattr(bundle, "verify", lambda path: meta)  # the inventory is not tested here
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMP", str(tmp_path))
    code = main(["import", str(root), "--out", str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out").exists()
    assert not marker.exists()
