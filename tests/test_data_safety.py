"""No command deletes or replaces what it did not create (issue 10's reproducers).

Every reproducer that once lost data is run as a user would run it, with real
processes where timing matters (two writers at once), and checks two things:
every pre-existing file is intact (same bytes, same listing), and the command
exits non-zero with exactly one ``scalelab CMD: error:`` line.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from reliability import tally_fixtures
from train_support import TINY, env, ok, run, write_config

from scalelab import output_guard
from scalelab.errors import UsageError

SCALELAB = [sys.executable, "-m", "scalelab"]


def snapshot(root: Path) -> dict[str, str]:
    """path -> sha256 of every file under ``root`` (or of ``root`` itself)."""
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def one_error_line(proc: subprocess.CompletedProcess, command: str, code: int = 2) -> str:
    """The command failed with ``code`` and said so in one line, with no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"scalelab {command}: error: "), lines[0]
    return lines[0]


def cli(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    return run([*SCALELAB, *map(str, args)], timeout=timeout)


tally, _count = tally_fixtures(
    "data-loss-reproducers", "reproducers_tried", "all_files_intact_and_one_error_line"
)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One real single-process training run, shared by the reproducers."""
    root = tmp_path_factory.mktemp("safety")
    cfg = write_config(root / "tiny.yaml", TINY)
    out = root / "run"
    ok(cli("train", "--config", cfg, "--out", out))
    assert (out / "summary.json").exists() and (out / output_guard.MARKER).exists()
    return out


@pytest.fixture()
def good_csv(tmp_path) -> Path:
    path = tmp_path / "good.csv"
    path.write_text("ranks,throughput\n1,100\n2,190\n4,350\n")
    return path


@pytest.fixture()
def victim(tmp_path) -> Path:
    """An unrelated user directory with a thesis in it."""
    d = tmp_path / "victim"
    (d / "chapter").mkdir(parents=True)
    (d / "thesis.tex").write_text("\\section{Results}\n")
    (d / "chapter" / "data.bin").write_bytes(os.urandom(512))
    return d


# ---- analyze / predict / commbench ------------------------------------------------------


def test_analyze_out_equal_to_its_run_keeps_the_run(trained_run):
    before = snapshot(trained_run)
    line = one_error_line(cli("analyze", trained_run, "--out", trained_run), "analyze")
    assert "overlaps the input" in line
    assert snapshot(trained_run) == before


def test_analyze_out_holding_its_run_is_refused(trained_run):
    parent = trained_run.parent
    before = snapshot(parent)
    one_error_line(cli("analyze", trained_run, "--out", parent), "analyze")
    assert snapshot(parent) == before


def test_analyze_out_unrelated_file_and_directory_survive(tmp_path, good_csv, victim):
    lone = tmp_path / "notes.txt"
    lone.write_text("do not delete\n")
    for target in (lone, victim):
        before = snapshot(target)
        line = one_error_line(cli("analyze", "--from-csv", good_csv, "--out", target), "analyze")
        assert str(target) in line
        assert snapshot(target) == before


def test_analyze_out_equal_to_its_csv_keeps_the_csv(good_csv):
    before = snapshot(good_csv)
    one_error_line(cli("analyze", "--from-csv", good_csv, "--out", good_csv), "analyze")
    assert snapshot(good_csv) == before


def test_analyze_replaces_only_its_own_earlier_output(tmp_path, good_csv):
    out = tmp_path / "analysis"
    ok(cli("analyze", "--from-csv", good_csv, "--out", out))
    assert output_guard.marker_kind(out) == "analysis"
    (out / "scaling.md").write_text("stale\n")
    ok(cli("analyze", "--from-csv", good_csv, "--out", out))
    assert (out / "scaling.md").read_text() != "stale\n"
    # an analysis directory is not a commbench or predict output
    one_error_line(
        cli(
            "predict",
            "--commbench",
            good_csv,
            "--compute-time",
            "0.1",
            "--grad-bytes",
            "1M",
            "--global-batch",
            "32",
            "--out",
            out,
        ),
        "predict",
    )
    assert output_guard.marker_kind(out) == "analysis"


def test_predict_and_commbench_out_leave_a_foreign_directory(victim, good_csv):
    before = snapshot(victim)
    one_error_line(
        cli(
            "predict",
            "--commbench",
            good_csv,
            "--compute-time",
            "0.1",
            "--grad-bytes",
            "1M",
            "--global-batch",
            "32",
            "--out",
            victim,
        ),
        "predict",
    )
    one_error_line(
        cli("commbench", "--lib", "torch", "--max-bytes", "4K", "--iters", "1", "--out", victim),
        "commbench",
    )
    assert snapshot(victim) == before


def test_predict_out_equal_to_an_input_is_refused(tmp_path, trained_run):
    before = snapshot(trained_run)
    one_error_line(
        cli(
            "predict",
            "--commbench",
            tmp_path / "none.csv",
            "--run",
            trained_run,
            "--out",
            trained_run,
        ),
        "predict",
    )
    assert snapshot(trained_run) == before


# ---- launch ---------------------------------------------------------------------------


def _spec(data_dir: Path) -> str:
    point = {
        "backend": "ddp",
        "mode": "strong",
        "nodes": 1,
        "tasks_per_node": 1,
        "gpus_per_task": 0,
        "repeat": 0,
    }
    run_cfg = {**TINY, "data": {"source": "staged", "path": str(data_dir)}}
    return json.dumps(
        {
            "point": point,
            "run_config": run_cfg,
            "launch": {"local": "mpirun", "srun_mpi": "pmix", "cpus_per_task": 1, "timeout_s": 60},
        }
    )


def test_launch_dry_run_touches_nothing(tmp_path, victim):
    data = tmp_path / "data"
    data.mkdir()
    (data / "index.json").write_text("{}")
    fresh = tmp_path / "fresh-run"
    proc = cli("launch", "--spec", _spec(data), "--out", fresh, "--dry-run")
    ok(proc)
    assert "scalelab launch:" in proc.stdout
    assert not fresh.exists() and not output_guard.lock_path(fresh).exists()
    before = snapshot(victim)
    one_error_line(cli("launch", "--spec", _spec(data), "--out", victim, "--dry-run"), "launch")
    assert snapshot(victim) == before


# ---- one guard for every output command (issue 23): a user's file is never lost --------


def _with_notes(src: Path, dest: Path) -> Path:
    """A copy of the finished run ``src`` in which a user keeps notes."""
    import shutil

    shutil.copytree(src, dest)
    (dest / "notes.md").write_text("the lr sweep looked odd at 4 ranks\n")
    return dest


def test_stage_force_keeps_a_users_file_beside_any_manifest(tmp_path):
    fake = tmp_path / "fake"  # a manifest.json by name alone is not scalelab's marker
    fake.mkdir()
    (fake / "manifest.json").write_text("{}\n")
    (fake / "notes.txt").write_text("mine\n")
    real = tmp_path / "real"  # a real staged dataset a user then wrote into
    ok(cli(*_stage_args(real, 200)))
    ok(cli(*_stage_args(real, 200), "--force"))  # its own earlier output: replaced
    (real / "notes.txt").write_text("mine too\n")
    for target in (fake, real):
        before = snapshot(target)
        line = one_error_line(cli(*_stage_args(target, 200), "--force"), "data")
        assert str(target) in line
        assert snapshot(target) == before


def test_container_generate_out_keeps_a_users_file(tmp_path):
    mine = tmp_path / "my.def"
    mine.write_text("Bootstrap: docker\nFrom: debian:12\n")
    before = snapshot(mine)
    one_error_line(cli("container", "generate", "--out", mine), "container")
    assert snapshot(mine) == before
    out = tmp_path / "gen.def"
    ok(cli("container", "generate", "--out", out))
    ok(cli("container", "generate", "--out", out))  # its own earlier output: replaced
    with out.open("a") as fh:
        fh.write("# my edit\n")  # edited by the user: no longer only scalelab's
    before = snapshot(out)
    one_error_line(cli("container", "generate", "--out", out), "container")
    assert snapshot(out) == before


def test_reproduce_out_keeps_another_run_with_a_users_notes(tmp_path, trained_run):
    other = _with_notes(trained_run, tmp_path / "other")
    before = snapshot(other)
    line = one_error_line(cli("reproduce", trained_run, "--out", other, timeout=240), "reproduce")
    assert "notes.md" in line
    assert snapshot(other) == before


def test_launch_out_keeps_a_train_run_with_a_users_file(tmp_path, trained_run):
    data = tmp_path / "data"  # real data: without the guard, launch wipes and retrains
    ok(cli(*_stage_args(data, 256)))
    run_dir = _with_notes(trained_run, tmp_path / "run")
    before = snapshot(run_dir)
    line = one_error_line(cli("launch", "--spec", _spec(data), "--out", run_dir), "launch")
    assert "notes.md" in line
    assert snapshot(run_dir) == before
    one_error_line(
        cli("train", "--config", run_dir / "config.yaml", "--out", run_dir), "train"
    )  # train refuses it too: one rule
    assert snapshot(run_dir) == before


def test_workflow_rerun_of_stage_keeps_a_users_file_in_data(tmp_path):
    from test_workflow import copy_workflow, snakemake

    wd = copy_workflow(tmp_path / "wf")
    args = ["stage", "--cores", "1", "--configfile", ".test/config.yaml"]
    snakemake(wd, args)
    snakemake(wd, [*args, "-R", "stage"])  # a dataset of only scalelab's files: restaged
    data = wd / "results" / "data"
    notes = data / "notes.txt"
    notes.write_text("which seed did I use?\n")
    shards = {k: v for k, v in snapshot(data).items() if k.endswith(".npy")}
    proc = snakemake(wd, [*args, "-R", "stage"], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]  # Snakemake: a job failed
    log = (wd / "logs" / "stage.log").read_text()
    lines = [ln for ln in log.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("scalelab data: error: "), log
    assert "notes.txt" in lines[0]  # scalelab data stage exited 2 and touched nothing
    assert notes.read_text() == "which seed did I use?\n"
    assert {k: v for k, v in snapshot(data).items() if k.endswith(".npy")} == shards


# ---- one writer at a time --------------------------------------------------------------


def _stage_args(out: Path, n: int = 4000) -> list[str]:
    return [
        "data",
        "stage",
        "--source",
        "synthetic",
        "--num-samples",
        str(n),
        "--image-size",
        "16",
        "16",
        "--num-classes",
        "4",
        "--seed",
        "1",
        "--quiet",
        "--out",
        str(out),
    ]


def test_stage_into_a_directory_another_writer_holds_is_refused(tmp_path):
    out = tmp_path / "data"
    with output_guard.writer_lock(out):
        line = one_error_line(cli(*_stage_args(out, 200)), "data")
    assert f"pid {os.getpid()}" in line and socket.gethostname() in line
    assert not out.exists()


def test_two_concurrent_stages_one_wins_one_is_refused(tmp_path):
    out = tmp_path / "data"
    procs = [
        subprocess.Popen(
            [*SCALELAB, *_stage_args(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert loser.count("\n") == 1 and "scalelab data: error:" in loser
    ok(cli("data", "verify", out))


def test_two_trainings_into_one_run_directory(tmp_path):
    cfg = write_config(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "run"
    with output_guard.writer_lock(out):
        one_error_line(cli("train", "--config", cfg, "--out", out), "train")
    assert not out.exists()
    procs = [
        subprocess.Popen(
            [*SCALELAB, "train", "--config", str(cfg), "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    # Either the second is refused while the first trains, or it starts after the first
    # finished and finds a completed run ("nothing to do"): never two writers at once.
    assert codes in ([0, 2], [0, 0]), results
    if codes == [0, 2]:
        assert "another writer holds its lock" in next(e for c, e in results if c == 2)
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_train_into_a_foreign_directory_is_refused(tmp_path, victim):
    cfg = write_config(tmp_path / "tiny.yaml", TINY)
    before = snapshot(victim)
    line = one_error_line(cli("train", "--config", cfg, "--out", victim), "train")
    assert "not scalelab run output" in line  # not "another writer" (the lock is its own)
    assert snapshot(victim) == before


def test_stale_lock_of_a_dead_writer_is_reported_and_taken_over(tmp_path):
    out = tmp_path / "x"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    output_guard.lock_path(out).write_text(
        json.dumps(
            {"pid": int(dead.stdout), "host": socket.gethostname(), "command": "scalelab stage"}
        )
    )
    with output_guard.writer_lock(out) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not output_guard.lock_path(out).exists()


def test_stale_lock_from_another_host_needs_force(tmp_path, capsys):
    out = tmp_path / "x"
    output_guard.lock_path(out).write_text(json.dumps({"pid": 1, "host": "elsewhere-n9"}))
    for _ in range(2):  # a refusal keeps the evidence: refused again
        with (
            pytest.raises(UsageError, match="stale lock .* elsewhere-n9.*--force"),
            output_guard.writer_lock(out),
        ):
            pass
    with output_guard.writer_lock(out, force=True):
        pass
    assert "taking over the stale lock" in capsys.readouterr().err


def test_run_lock_is_passed_to_the_ranks_of_launch(tmp_path):
    out = tmp_path / "run"
    with output_guard.writer_lock(out, token="abc") as lock:
        assert lock.exists()
        assert output_guard.held_for(out, "abc") and not output_guard.held_for(out, "other")
    assert not output_guard.held_for(out, "abc")


# ---- file modes ------------------------------------------------------------------------


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_files_follow_the_umask(tmp_path, mask, mode):
    script = (
        f"import os; os.umask({mask}); from scalelab import fsio, output_guard; "
        f"fsio.atomic_write_text({str(tmp_path / 'f.txt')!r}, 'x'); "
        f"import pathlib; d = pathlib.Path({str(tmp_path / 'd')!r}); "
        "ctx = output_guard.atomic_dir(d, 'analysis'); t = ctx.__enter__(); "
        "(t / 'a').write_text('y'); ctx.__exit__(None, None, None)"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=env())
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == mode
    assert (tmp_path / "d").stat().st_mode & 0o777 == mode | ((mode & 0o444) >> 2)


def test_a_skeleton_of_empty_directories_is_not_data(tmp_path):
    """Snakemake makes an output's parent directories before the job: they hold nothing
    to lose, so they may be replaced; one empty file in them is data and is kept."""
    skeleton = tmp_path / "analysis"
    (skeleton / "plots" / "deeper").mkdir(parents=True)
    assert output_guard.check_target(skeleton, "analysis") == skeleton
    (skeleton / "plots" / "keep.txt").write_text("")
    with pytest.raises(UsageError, match="not scalelab analysis output"):
        output_guard.check_target(skeleton, "analysis")
