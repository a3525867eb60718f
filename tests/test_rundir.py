"""The run directory has one owner: :class:`scalelab.rundir.RunDir`.

(a) Every run-directory file name is a string constant in rundir.py only (an AST walk
of every module under src/, docstrings left out). (b) RunDir's behaviour: a fresh run
vs a resume, the guard that refuses a foreign directory, completeness, "stopped after a
checkpoint", and the trained data spec, on tiny real trainings in this process.
"""

from __future__ import annotations

import ast
import json
import re
import signal
from pathlib import Path

import pytest
import yaml
from train_support import TINY, deep_update

import scalelab
import scalelab.train
from scalelab import output_guard
from scalelab.data.spec import DataSpec
from scalelab.errors import UsageError
from scalelab.rundir import KIND, RunDir

SRC = Path(scalelab.__file__).parent
NAMES = tuple(name.rstrip("/") for name in RunDir.FILES)
QUICK = deep_update(
    TINY,
    {"train": {"steps_per_epoch": 2, "deterministic": True}, "checkpoint": {"every_epochs": 0}},
)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module, its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        # A string that is a statement of its own is documentation: a docstring, or the
        # attribute docstring under a config field (pydantic's use_attribute_docstrings).
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            found.add(id(node.value))
    return found


def names_used(text: str) -> set[str]:
    """Run-directory file names that a module's string constants use as a file name: the
    whole constant, a leading path part (``checkpoints/``), or a part after a ``/`` (a
    piece of an f-string path). Prose that mentions a file, and docstrings, do not count."""
    tree = ast.parse(text)
    skip = _docstrings(tree)
    used = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in skip:
            continue
        s = node.value
        for name in NAMES:
            if (
                s == name
                or s.startswith(name + "/")
                or re.search("/" + re.escape(name) + r"(?![\w.])", s)
            ):
                used.add(name)
    return used


def test_names_used_sees_literals_and_path_pieces_not_docstrings_or_prose():
    text = (
        '"""Writes summary.json."""\n'
        'A = "summary.json"\n'
        'B = f"{d}/run_info.json is missing"\n'
        'C = "checkpoints/"\n'
        'D = "holds checkpoints of a run (metrics.jsonl)"\n'
        'def f():\n    """model.pt"""\n    return "x"\n'
        'class K:\n    x: int = 1\n    """provenance.json"""\n'
    )
    assert names_used(text) == {"summary.json", "run_info.json", "checkpoints"}


#: Another file of the same name, not a run directory's: (module, name) -> what it is.
NOT_RUN_FILES = {
    ("launcher.py", "config.yaml"): "the workflow's config/config.yaml (--help)",
    ("study/cli.py", "config.yaml"): "the workflow's config/config.yaml (plan's usage line)",
    ("study/tracking.py", "config.yaml"): "the study's effective config, RESULTS/config.yaml",
    ("study/tracking.py", "sweep.json"): "the study's plan, RESULTS/sweep.json",
}


def test_every_run_file_name_is_written_in_rundir_only():
    where: dict[str, list[str]] = {name: [] for name in NAMES}
    for path in sorted(SRC.rglob("*.py")):
        module = path.relative_to(SRC).as_posix()
        for name in names_used(path.read_text()):
            if (module, name) not in NOT_RUN_FILES:
                where[name].append(module)
    assert where == {name: ["rundir.py"] for name in NAMES}


def test_the_names_cover_what_the_trainer_writes(tmp_path):
    """A real run writes nothing beyond RunDir.FILES (and the guard's marker)."""
    out = tmp_path / "run"
    scalelab.train.run(QUICK, out)
    written = {p.name for p in out.iterdir()} - {output_guard.MARKER}
    assert written <= set(NAMES)
    assert {
        RunDir.CONFIG,
        RunDir.RUN_INFO,
        RunDir.PROVENANCE,
        RunDir.METRICS,
        RunDir.MODEL,
        RunDir.SUMMARY,
    } <= written
    assert json.loads((out / output_guard.MARKER).read_text())["owns"] == sorted(RunDir.FILES)


# --------------------------------------------------------------------------- behaviour


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> RunDir:
    out = tmp_path_factory.mktemp("finished") / "run"
    scalelab.train.run(QUICK, out)
    return RunDir(out)


def test_complete_run_reads_back(finished):
    assert finished.is_complete() and not finished.stopped_after_checkpoint()
    summary = finished.summary()
    assert summary["status"] == "completed" and summary["model_file"] == RunDir.MODEL
    assert finished.config()["model"]["name"] == "cnn"
    kinds = [r["kind"] for r in finished.metrics()]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert finished.run_info()["layout"]["world_size"] == 1
    assert finished.data_spec() == DataSpec(4, (3, 16, 16))
    assert finished.sweep() == {} and finished.evaluation() is None
    assert output_guard.marker_kind(finished.path) == KIND


def test_data_spec_round_trip_and_malformed(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.data_spec() is None  # no run_info.json: an older run
    run.path.mkdir()
    spec = DataSpec(32, (16,))
    run.write_run_info({"data_spec": spec.to_dict()})
    assert run.data_spec() == spec
    run.write_run_info({"data_spec": {"num_outputs": 0, "input_shape": [16]}})
    with pytest.raises(UsageError, match=re.escape(str(run.run_info_path))):
        run.data_spec()


def test_missing_summary_and_broken_files_are_one_line_errors(tmp_path):
    run = RunDir(tmp_path)
    assert not run.is_complete()
    with pytest.raises(UsageError, match="did not complete"):
        run.summary()
    assert run.config() == {} and run.run_info() == {} and list(run.metrics()) == []
    with pytest.raises(UsageError, match="missing"):
        run.config(missing_ok=False)
    run.summary_path.write_text("[1]")
    with pytest.raises(UsageError, match="expected a JSON object"):
        run.summary()
    run.metrics_path.write_text('{"kind": "start"}\nnot json\n')
    with pytest.raises(UsageError, match="line 2 is not valid JSON"):
        list(run.metrics())
    run.config_path.write_text("a: [")
    with pytest.raises(UsageError, match="not valid YAML"):
        run.config()


def test_fresh_start_refuses_a_completed_run_and_resume_returns_it(finished):
    with pytest.raises(UsageError, match="holds a completed run"):
        finished.check_start(False, lambda d: [])
    assert finished.check_start(True, lambda d: []) == finished.summary()


def test_fresh_start_refuses_checkpoints_of_an_unfinished_run(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.check_start(False, lambda d: []) is None
    with pytest.raises(UsageError, match="unfinished run; pass --resume"):
        run.check_start(False, lambda d: [d / "x"])
    assert run.check_start(True, lambda d: [d / "x"]) is None


def test_prepare_fresh_drops_old_metrics_and_weights_resume_keeps_them(tmp_path):
    run = RunDir(tmp_path / "r")
    run.prepare(resume=False)
    assert output_guard.marker_kind(run.path) == KIND
    for path in (run.metrics_path, run.model_path, run.config_path):
        path.write_text("old")
    run.prepare(resume=True)
    assert run.metrics_path.exists() and run.model_path.exists()
    run.prepare(resume=False)
    assert not run.metrics_path.exists() and not run.model_path.exists()
    assert run.config_path.exists()  # the trainer rewrites it


def test_prepare_launch_keeps_a_run_of_the_same_config_and_clears_another(tmp_path):
    run = RunDir(tmp_path / "r")
    run.prepare_launch("aaa")
    run.write_sweep({"config_sha256": "aaa"})
    (run.checkpoints).mkdir()
    run.summary_path.write_text("{}")
    run.prepare_launch("aaa")  # a requeued job: keep the checkpoints, drop the summary
    assert run.checkpoints.is_dir() and not run.is_complete()
    run.prepare_launch("bbb")  # another config: nothing of the old run may be resumed
    assert not run.checkpoints.exists() and not run.sweep_path.exists()
    assert output_guard.marker_kind(run.path) == KIND


def test_prepare_rerun_replaces_only_a_finished_rerun(tmp_path):
    run = RunDir(tmp_path / "r")
    run.mark()
    run.checkpoints.mkdir()
    run.prepare_rerun()
    assert run.checkpoints.is_dir()  # unfinished: kept
    run.summary_path.write_text("{}")
    run.prepare_rerun()
    assert not run.checkpoints.exists() and not run.is_complete()
    assert output_guard.marker_kind(run.path) == KIND


def test_guard_refuses_a_foreign_directory(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("a user's file")
    with pytest.raises(UsageError, match="refusing to replace it"):
        RunDir(foreign).check()
    with pytest.raises(UsageError, match="refusing to replace it"), RunDir(foreign).lock():
        pass
    assert (foreign / "notes.txt").read_text() == "a user's file"
    run = RunDir(tmp_path / "run")
    run.mark()
    (run.path / "extra.bin").write_text("not scalelab's")
    with pytest.raises(UsageError, match="extra.bin"), run.guard():
        pass


def test_lock_holds_out_a_second_writer(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.lock():
        assert output_guard.lock_path(run.path).exists()
        with (
            pytest.raises(UsageError, match="another writer holds its lock"),
            RunDir(run.path).guard(),
        ):
            pass
    assert not output_guard.lock_path(run.path).exists()


def test_a_training_into_a_foreign_directory_writes_nothing(tmp_path):
    from scalelab.cli import main

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(QUICK))
    assert main(["train", "--config", str(config), "--out", str(foreign)]) == 2
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_stopped_after_checkpoint(tmp_path):
    """A run stopped on a signal: its last metrics record names a checkpoint that exists."""
    from scalelab.train.signals import Preempted, StopRequest

    out = tmp_path / "run"
    cfg = deep_update(QUICK, {"train": {"epochs": 2}})
    original = StopRequest.install

    def install(self):
        original(self)
        self.signum = signal.SIGTERM  # as if the signal arrived before the first step
        return self

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StopRequest, "install", install)
        with pytest.raises(Preempted):
            scalelab.train.run(cfg, out)
    run = RunDir(out)
    last = list(run.metrics())[-1]
    assert last["kind"] == "preempted" and not run.is_complete()
    assert run.stopped_after_checkpoint()
    (run.checkpoints / last["checkpoint"]).unlink()
    assert not run.stopped_after_checkpoint()  # the checkpoint it names is gone
