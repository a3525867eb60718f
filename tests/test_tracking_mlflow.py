"""scalelab against a real ``mlflow server`` (sqlite store, local artifact root, served
artifacts), started here from a venv of its own (tests/mlflow_server.py). Everything is
read back through MLflow's own client and compared with what the run directories say:
the workflow's study (parent and children, params, per-epoch metrics, artifacts), a
server stopped after the first epoch and ``track sync`` afterwards (twice: the second
sends nothing), planted secrets found nowhere, and a 2-rank run of which only rank 0
sends. Then plain ``scalelab train --tracking FILE`` runs, and MLflow's basic-auth app
(``mlflow server --app-name basic-auth``): a user and password reach it, a wrong password
is refused in one line with nothing lost or leaked, and a bearer token, which that app
does not take, is refused the same way."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, run, tool_env
from mlflow_server import MlflowServer, ensure_venv, read_back, running
from test_workflow import copy_workflow, snakemake
from train_support import PY, TINY, deep_update

import scalelab.train
from scalelab import launcher
from scalelab.rundir import RunDir
from scalelab.study import config as study_config
from scalelab.study import tracking as study_tracking
from scalelab.study.plan import plan
from scalelab.tracking import sender
from scalelab.tracking.config import for_run, for_run_dir, load_file
from scalelab.tracking.mlflow import PARENT_TAG, MlflowClient, TrackerError
from scalelab.tracking.sync import merge_parents

NOT_METRICS = {"kind", "epoch", "epochs", "time"}
EPOCHS = 2


@pytest.fixture(scope="session")
def mlflow_venv() -> Path:
    return ensure_venv()


@pytest.fixture(scope="module")
def server(mlflow_venv, tmp_path_factory):
    with running(mlflow_venv, tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv


def study_dict(results: str, uri: str, experiment: str, **extra: Any) -> dict[str, Any]:
    """A tiny study: a GPT on generated tokens (nothing staged), backend none, 2 epochs."""
    base = yaml.safe_load((REPO / ".test" / "sharding.yaml").read_text())
    base["results"] = results
    base["train"]["train"]["epochs"] = EPOCHS
    base["sweep"] = {
        "backends": ["none"],
        "nodes": [1],
        "tasks_per_node": [1],
        "modes": ["strong"],
        "repeats": 2,
    }
    # Generous timeouts: two runs and the server share a loaded 2-core machine in CI.
    mlflow = {"uri": uri, "experiment": experiment, "timeout_s": 30, "flush_s": 120}
    base["tracking"] = {"mlflow": mlflow, "tensorboard": True}
    for key, value in extra.items():
        base[key] = value
    return base


# --------------------------------------------------------------------------- expectations


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def expected_params(config: dict[str, Any]) -> dict[str, str]:
    """The run config's leaves: strings as written, anything else as JSON."""
    return {
        k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        for k, v in _leaves(config).items()
    }


def expected_metrics(run_dir: RunDir) -> dict[str, list[tuple[int, float]]]:
    """Per metric: (epoch, value) of every epoch record of metrics.jsonl."""
    out: dict[str, list[tuple[int, float]]] = {}
    for rec in run_dir.metrics():
        if rec.get("kind") != "epoch":
            continue
        for key, value in rec.items():
            if key in NOT_METRICS or isinstance(value, bool):
                continue
            if isinstance(value, int | float) and math.isfinite(value):
                out.setdefault(key, []).append((rec["epoch"], float(value)))
    return out


def check_child(child: dict[str, Any], run_dir: RunDir, downloads: Path) -> None:
    """A child run equals its run directory: params, metric histories, artifacts."""
    assert child["status"] == "FINISHED"
    assert child["params"] == expected_params(run_dir.config())
    want = expected_metrics(run_dir)
    assert len(want["train_loss"]) == EPOCHS
    epoch_keys = {k for k in child["metrics"] if not k.startswith("summary.")}
    assert epoch_keys == set(want)
    for key, points in want.items():
        got = sorted((h["step"], h["value"]) for h in child["metrics"][key])
        assert got == points, key
    summary = run_dir.summary()
    for key in ("samples_per_s", "train_loss", "global_steps"):
        assert child["metrics"][f"summary.{key}"][0]["value"] == pytest.approx(summary[key])
    arts = downloads / child["run_id"]
    assert {RunDir.SUMMARY, RunDir.PROVENANCE, RunDir.METRICS, RunDir.CONFIG} <= set(
        child["artifacts"]
    )
    assert json.loads((arts / RunDir.SUMMARY).read_text()) == summary
    lines = (arts / RunDir.METRICS).read_text().splitlines()
    assert [json.loads(x) for x in lines] == list(run_dir.metrics())
    assert yaml.safe_load((arts / RunDir.CONFIG).read_text()) == run_dir.config()


def snapshot(doc: dict[str, Any]) -> dict[str, Any]:
    """What a sync could add to: runs, params, tags, metric points, artifacts."""
    return {
        r["run_id"]: (
            r["status"],
            r["deleted"],
            sorted(r["params"].items()),
            sorted(r["tags"].items()),
            {k: sorted((h["step"], h["value"]) for h in v) for k, v in r["metrics"].items()},
            r["artifacts"],
        )
        for r in doc["runs"]
    }


def sync(results: Path, uri: str, experiment: str, env: dict | None = None) -> dict:
    proc = run(
        [PY, "-m", "scalelab", "track", "sync", str(results), "--mlflow", uri]
        + ["--experiment", experiment, "--json"],
        timeout=300,
        env=env,
    )
    return json.loads(proc.stdout)


# --------------------------------------------------------------------------- secrets

SECRETS = {
    "MLFLOW_TRACKING_TOKEN": "mlflow-tok-5b1e77",
    "HF_TOKEN": "hf-tok-9c3d21",
    "AWS_SECRET_ACCESS_KEY": "aws-sec-44f0aa",
    "NCCL_PLANTED_URL": "http://nccl-user:nccl-pw-71b2@example.invalid/x",
}
NETRC_PW = "netrc-pw-1d9e"
REGISTRY_PW = "registry-pw-6a0c"


def plant_secrets(home: Path) -> tuple[dict[str, str], list[bytes]]:
    """Environment variables, a ~/.netrc and registry logins in the Docker config files
    Apptainer and Docker keep (base64 user:password): the environment to run in, and
    every form (clear and base64) that must be found nowhere."""
    home.mkdir(parents=True, exist_ok=True)
    (home / ".netrc").write_text(f"machine 127.0.0.1 login alice password {NETRC_PW}\n")
    (home / ".netrc").chmod(0o600)
    auth = base64.b64encode(f"bob:{REGISTRY_PW}".encode()).decode()
    docker = json.dumps({"auths": {"registry.invalid:5000": {"auth": auth}}})
    for rel in (".docker/config.json", ".apptainer/docker-config.json"):
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_text(docker)
    env = {**SECRETS, "HOME": str(home)}
    clear = [*SECRETS.values(), "nccl-pw-71b2", NETRC_PW, REGISTRY_PW]
    forms = [c.encode() for c in clear]
    forms += [base64.b64encode(c.encode()) for c in clear]
    forms += [base64.b64encode(f"{u}:{p}".encode()) for u, p in (("alice", NETRC_PW),)]
    forms.append(auth.encode())
    return env, forms


def assert_no_secret(forms: list[bytes], where: str, data: bytes) -> None:
    for form in forms:
        assert form not in data, f"{form!r} found in {where}"


def assert_nowhere(forms: list[bytes], doc: dict, downloads: Path, logs: list[Path]) -> int:
    """No planted secret in any param, tag or artifact of the experiment, nor in a log.
    Returns how many places were searched."""
    searched = 0
    for r in doc["runs"]:
        for kind in ("params", "tags"):
            assert_no_secret(forms, f"{kind} of {r['name']}", json.dumps(r[kind]).encode())
            searched += 1
    for path in [*downloads.rglob("*"), *logs]:
        if path.is_file():
            assert_no_secret(forms, str(path), path.read_bytes())
            searched += 1
    return searched


# --------------------------------------------------------------------------- the tests


def test_the_workflow_sends_its_study_and_a_second_sync_adds_nothing(server, mlflow_venv, tmp_path):
    wd = copy_workflow(tmp_path / "wf")
    (wd / "track.yaml").write_text(yaml.safe_dump(study_dict("results", server.uri, "workflow")))
    env, forms = plant_secrets(tmp_path / "home")
    proc = snakemake(wd, ["--cores", "2", "--configfile", "track.yaml"], env=tool_env(env))
    results = wd / "results"
    record = json.loads((results / "tracking" / "mlflow.json").read_text())
    doc = read_back(mlflow_venv, server.uri, "workflow", tmp_path / "dl")

    parents = [r for r in doc["runs"] if r["tags"].get("scalelab.kind") == "study"]
    children = [r for r in doc["runs"] if r["tags"].get("scalelab.kind") == "run"]
    assert [p["deleted"] for p in parents] == [False]
    (parent,) = parents
    assert parent["run_id"] == record["parent_run_id"] and parent["status"] == "FINISHED"
    assert sorted(c["name"] for c in children) == [
        "none-strong-n1-t1-g0-r0",
        "none-strong-n1-t1-g0-r1",
    ]
    for child in children:
        assert child["tags"][PARENT_TAG] == parent["run_id"]
        run_dir = RunDir(results / "runs" / child["name"])
        check_child(child, run_dir, tmp_path / "dl")
        assert RunDir.EVALUATION in child["artifacts"]  # sent by the track rule
        assert any(run_dir.tensorboard.iterdir())
        assert not run_dir.unsent_path.exists()  # the live tracker sent everything
    cfg = yaml.safe_load((results / "config.yaml").read_text())
    assert parent["params"]["sweep.repeats"] == "2"
    assert parent["params"]["train.train.epochs"] == str(EPOCHS)
    assert parent["tags"]["scalelab.key"] == study_tracking.study_key(cfg, results)
    for art in ("config.yaml", "sweep.json", "analysis/scaling.csv", "analysis/plots/fits.png"):
        assert art in parent["artifacts"], art
    got = (tmp_path / "dl" / parent["run_id"] / "analysis" / "plots" / "fits.png").read_bytes()
    assert got == (results / "analysis" / "plots" / "fits.png").read_bytes()
    assert "analysis/plots/fits.svg" not in parent["artifacts"]

    # The track rule ran after the runs had sent themselves live: it sent what they could
    # not (evaluations, the parent's params and artifacts), and no run twice.
    assert record["sent"]["runs"] == 0 and record["sent"]["artifacts"] >= 2 + 4
    again = sync(results, server.uri, "workflow", tool_env(env))
    assert again["sent"] == {"runs": 0, "params": 0, "metrics": 0, "artifacts": 0, "statuses": 0}
    doc2 = read_back(mlflow_venv, server.uri, "workflow", tmp_path / "dl2")
    assert snapshot(doc2) == snapshot(doc)

    logs = [*(wd / "logs").rglob("*.log"), server.root / "server.log"]
    (tmp_path / "snakemake.out").write_text(proc.stdout + proc.stderr + json.dumps(again))
    logs.append(tmp_path / "snakemake.out")
    assert assert_nowhere(forms, doc, tmp_path / "dl", logs) > 20
    provenance = (tmp_path / "dl" / children[0]["run_id"] / RunDir.PROVENANCE).read_text()
    assert "NCCL_PLANTED_URL" in provenance  # the allow-listed name is there, its password not


def test_a_server_stopped_after_the_first_epoch_then_track_sync(mlflow_venv, tmp_path, capfd):
    """The server stops (from the lane's hook, once epoch 1 is on it): training completes,
    says once what was not sent, and records it; track sync sends it, a second sync
    nothing."""
    root = tmp_path / "server"
    srv = MlflowServer(mlflow_venv, root).start()
    results = tmp_path / "results"
    cfg = study_config.validate(study_dict(str(results), srv.uri, "stopped"))
    results.mkdir()
    (results / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    point = next(p for p in plan(cfg)[0] if p.repeat == 0)
    run_dir = RunDir(results / "runs" / point.run_id)
    run_dir.mark()
    run_dir.set_tracking(
        for_run(study_tracking.settings(cfg, results), point.run_id).model_dump(mode="json")
    )
    run_cfg = launcher.run_config(cfg, point, results / "data")

    def stop_after_first_epoch(name: str, item: sender.Item) -> None:
        if item.what.startswith("epoch 1 metrics"):
            srv.stop()

    sender.OBSERVERS.append(stop_after_first_epoch)
    try:
        summary = scalelab.train.run(run_cfg, run_dir.path)
    finally:
        sender.OBSERVERS.remove(stop_after_first_epoch)
        srv.stop()
    assert summary["status"] == "completed" and run_dir.is_complete()
    lines = [x for x in capfd.readouterr().err.splitlines() if "tracking:" in x]
    assert len(lines) == 1, lines
    assert "not sent: epoch 2 metrics" in lines[0] and "track sync" in lines[0]
    (entry,) = run_dir.unsent()
    assert entry["not_sent"][0].startswith("epoch 2 metrics")
    assert {"artifact summary.json", "final status"} <= set(entry["not_sent"])

    srv = MlflowServer(mlflow_venv, root, port=srv.port).start()  # same store, same port
    try:
        before = read_back(mlflow_venv, srv.uri, "stopped", tmp_path / "dl0")
        (child,) = [r for r in before["runs"] if r["name"] == point.run_id]
        assert [h["step"] for h in child["metrics"]["train_loss"]] == [0]
        assert child["status"] == "RUNNING" and child["artifacts"] == []

        first = sync(results, srv.uri, "stopped")
        assert first["sent"]["runs"] == 0  # the live parent and child are found again
        assert first["sent"]["metrics"] > 0 and first["sent"]["statuses"] == 2
        doc = read_back(mlflow_venv, srv.uri, "stopped", tmp_path / "dl")
        (child,) = [r for r in doc["runs"] if r["name"] == point.run_id]
        check_child(child, run_dir, tmp_path / "dl")

        second = sync(results, srv.uri, "stopped")
        assert sum(second["sent"].values()) == 0
        assert snapshot(read_back(mlflow_venv, srv.uri, "stopped", tmp_path / "dl2")) == (
            snapshot(doc)
        )
    finally:
        srv.stop()


def test_only_rank_0_sends_in_a_two_rank_run(server, mlflow_venv, tmp_path):
    results = tmp_path / "results"
    study = study_dict(str(results), server.uri, "two-ranks")
    study["sweep"].update(backends=["ddp"], tasks_per_node=[2], repeats=1)
    study["launch"] = {"local": "torchrun", "timeout_s": 60}
    cfg = study_config.validate(study)
    (point,) = plan(cfg)[0]
    env: dict[str, str] = {}
    study_tracking.export(cfg, env)
    spec = json.dumps(launcher.job_spec(cfg, point.run_id, results / "data"))
    out = results / "runs" / point.run_id
    run(
        [PY, "-m", "scalelab", "launch", "--spec", spec, "--out", str(out)],
        timeout=600,
        env=tool_env(env),
    )
    run_dir = RunDir(out)
    assert run_dir.summary()["world_size"] == 2
    assert run_dir.tracking()["run_id"] == point.run_id
    doc = read_back(mlflow_venv, server.uri, "two-ranks", tmp_path / "dl")
    kinds = sorted(r["tags"].get("scalelab.kind") for r in doc["runs"])
    assert kinds == ["run", "study"]  # one child: rank 1 created none
    (child,) = [r for r in doc["runs"] if r["tags"]["scalelab.kind"] == "run"]
    check_child(child, run_dir, tmp_path / "dl")  # each epoch once: rank 1 sent nothing


def test_duplicate_parents_merge_into_the_oldest(server):
    client = MlflowClient(server.uri, 10.0, environ={})
    exp = client.experiment_id("merge")
    key = "00000000deadbeef"
    tags = {"scalelab.key": key, "scalelab.kind": "study"}
    old = client.create_run(exp, "p1", tags, 1000)["info"]["run_id"]
    young = client.create_run(exp, "p2", tags, 2000)["info"]["run_id"]
    child = client.create_run(exp, "c", {PARENT_TAG: young, "scalelab.key": "k"}, 3000)
    assert merge_parents(client, exp, key) == 1
    assert [r["info"]["run_id"] for r in client.find_runs(exp, "scalelab.key", key)] == [old]
    moved = client.get_run(child["info"]["run_id"])
    assert {t["key"]: t["value"] for t in moved["data"]["tags"]}[PARENT_TAG] == old
    assert merge_parents(client, exp, key) == 0


def test_track_sync_refuses_bad_input_in_one_line(tmp_path):
    (tmp_path / "results").mkdir()
    proc = run(
        [PY, "-m", "scalelab", "track", "sync", str(tmp_path / "results"), "--mlflow", "x"],
        check=False,
    )
    assert proc.returncode == 2 and "config.yaml: missing" in proc.stderr
    results = tmp_path / "results"
    cfg = study_config.validate(study_dict(str(results), "http://127.0.0.1:1", "e"))
    (results / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = run(
        [PY, "-m", "scalelab", "track", "sync", str(results), "--mlflow", "http://u:pw@h"],
        check=False,
    )
    assert proc.returncode == 2 and "--mlflow" in proc.stderr and "pw" not in proc.stderr
    proc = run(
        [PY, "-m", "scalelab", "track", "sync", str(results), "--mlflow", "http://127.0.0.1:1"],
        check=False,
        env=tool_env({k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}),
    )
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "http://127.0.0.1:1" in proc.stderr


def test_the_server_venv_is_made_once_and_outside_the_project(mlflow_venv):
    assert (mlflow_venv / "scalelab-complete").is_file()
    assert Path.home() / ".cache" / "scalelab" in mlflow_venv.parents
    assert shutil.which("mlflow", path=str(Path(PY).parent)) is None  # not in our venv
    probe = run([PY, "-c", "import mlflow"], check=False)
    assert probe.returncode != 0 and "No module named 'mlflow'" in probe.stderr


# --------------------------------------------------------------------------- plain train


def tracking_file(path: Path, uri: str, experiment: str) -> Path:
    """A ``--tracking`` file: the ``tracking:`` section a study would hold (generous
    timeouts: the auth app checks a password hash on every request of a loaded CI box)."""
    mlflow = {"uri": uri, "experiment": experiment, "timeout_s": 30, "flush_s": 180}
    path.write_text(yaml.safe_dump({"tracking": {"mlflow": mlflow, "tensorboard": True}}))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """The test environment without any MLflow variable of the caller's, plus ``extra``."""
    env = {k: v for k, v in tool_env().items() if not k.startswith("MLFLOW_")}
    return {**env, **extra}


def train_tracked(tmp_path: Path, out: Path, tracking: Path, env: dict[str, str]):
    """``scalelab train`` of a tiny CNN (EPOCHS epochs) with ``--tracking``."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(deep_update(TINY, {"train": {"epochs": EPOCHS}})))
    argv = [PY, "-m", "scalelab", "train", "--config", str(cfg), "--out", str(out)]
    return run([*argv, "--tracking", str(tracking)], timeout=600, env=env)


def check_plain_run(doc: dict[str, Any], run_dir: RunDir, downloads: Path) -> None:
    """A plain run on the server: a finished parent for its directory, one child equal to
    the run directory."""
    settings = run_dir.tracking()
    assert settings is not None and settings["standalone"] is True
    (parent,) = [r for r in doc["runs"] if r["tags"].get("scalelab.kind") == "study"]
    (child,) = [r for r in doc["runs"] if r["tags"].get("scalelab.kind") == "run"]
    assert parent["tags"]["scalelab.key"] == settings["study_key"]
    assert parent["status"] == "FINISHED" and not parent["deleted"]
    assert child["name"] == run_dir.path.name == settings["run_id"]
    assert child["tags"][PARENT_TAG] == parent["run_id"]
    check_child(child, run_dir, downloads)


def test_plain_train_with_tracking_sends_its_run_and_writes_tensorboard(
    server, mlflow_venv, tmp_path
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "plain-run"
    trk = tracking_file(tmp_path / "trk.yaml", server.uri, "plain")
    proc = train_tracked(tmp_path, out, trk, clean_env())
    assert "tracking:" not in proc.stderr, proc.stderr  # nothing to say: all sent
    run_dir = RunDir(out)
    assert run_dir.is_complete() and not run_dir.unsent_path.exists()
    assert run_dir.tracking() == for_run_dir(load_file(trk), out).model_dump(mode="json")
    check_plain_run(
        read_back(mlflow_venv, server.uri, "plain", tmp_path / "dl"), run_dir, tmp_path / "dl"
    )

    events = list(run_dir.tensorboard.glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    acc = EventAccumulator(str(run_dir.tensorboard))
    acc.Reload()
    want = expected_metrics(run_dir)
    assert set(acc.Tags()["scalars"]) == set(want)
    for key, points in want.items():  # float32 in the event file
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in points], key
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), key


# --------------------------------------------------------------------------- basic-auth

USER = "trainer"
#: The auth app wants 12 characters or more.
PASSWORD = "trainer-pw-3f9a61c2"
WRONG = "wrong-pw-8d41e07b55"
TOKEN = "bearer-tok-c04e9a12"


@pytest.fixture(scope="module")
def auth_server(mlflow_venv, tmp_path_factory):
    with running(mlflow_venv, tmp_path_factory.mktemp("mlflow-auth"), auth=True) as srv:
        srv.create_user(USER, PASSWORD)
        yield srv


def user_env(password: str, **extra: str) -> dict[str, str]:
    return clean_env(MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=password, **extra)


def secret_forms(*secrets: str) -> list[bytes]:
    """Each secret in clear, in base64, and as the Basic header's base64 of user:secret."""
    forms = [s.encode() for s in secrets]
    forms += [base64.b64encode(s.encode()) for s in secrets]
    forms += [base64.b64encode(f"{USER}:{s}".encode()) for s in secrets]
    return forms


def assert_not_leaked(forms: list[bytes], texts: list[str], run_dir: RunDir) -> int:
    """No form in any output, nor in any file of the run directory; places searched."""
    searched = 0
    for i, text in enumerate(texts):
        assert_no_secret(forms, f"output {i}", text.encode())
        searched += 1
    for path in run_dir.path.rglob("*"):
        if path.is_file():
            assert_no_secret(forms, str(path), path.read_bytes())
            searched += 1
    return searched


def sync_cli(target: Path, uri: str, env: dict[str, str], check: bool = True):
    """``track sync``: its JSON record when it must succeed, its plain lines otherwise."""
    argv = [PY, "-m", "scalelab", "track", "sync", str(target), "--mlflow", uri]
    return run(argv + (["--json"] if check else []), timeout=600, env=env, check=check)


def test_an_auth_server_takes_a_run_from_a_user_and_password(auth_server, mlflow_venv, tmp_path):
    """The user and password reach the basic-auth app; a token set beside them is not
    sent (MLflow's client prefers the user and password too), so the run gets through."""
    out = tmp_path / "auth-run"
    trk = tracking_file(tmp_path / "trk.yaml", auth_server.uri, "authed")
    proc = train_tracked(tmp_path, out, trk, user_env(PASSWORD, MLFLOW_TRACKING_TOKEN=TOKEN))
    assert "tracking:" not in proc.stderr, proc.stderr
    run_dir = RunDir(out)
    assert not run_dir.unsent_path.exists()
    doc = read_back(mlflow_venv, auth_server.uri, "authed", tmp_path / "dl", auth_server.admin)
    check_plain_run(doc, run_dir, tmp_path / "dl")
    again = json.loads(sync_cli(out, auth_server.uri, user_env(PASSWORD)).stdout)
    assert sum(again["sent"].values()) == 0  # the live run sent everything
    assert assert_not_leaked(secret_forms(PASSWORD, TOKEN), [proc.stdout, proc.stderr], run_dir) > 5


def test_a_wrong_password_is_refused_in_one_line_and_nothing_is_lost(
    auth_server, mlflow_venv, tmp_path
):
    out = tmp_path / "wrong-run"
    trk = tracking_file(tmp_path / "trk.yaml", auth_server.uri, "refused")
    proc = train_tracked(tmp_path, out, trk, user_env(WRONG))
    run_dir = RunDir(out)
    assert run_dir.is_complete()  # training does not care
    lines = [x for x in proc.stderr.splitlines() if "tracking:" in x]
    assert len(lines) == 1, proc.stderr
    assert auth_server.uri in lines[0] and "HTTP 401" in lines[0]
    assert "$MLFLOW_TRACKING_USERNAME" in lines[0] and f"track sync {out}" in lines[0]
    (entry,) = run_dir.unsent()
    assert entry["not_sent"][0].startswith("run start")
    assert f"epoch {EPOCHS} metrics" in " ".join(entry["not_sent"])
    assert "final status" in entry["not_sent"]
    empty = read_back(mlflow_venv, auth_server.uri, "refused", tmp_path / "dl0", auth_server.admin)
    assert empty["runs"] == []  # nothing looks sent

    refused = sync_cli(out, auth_server.uri, user_env(WRONG), check=False)
    assert refused.returncode == 1 and refused.stdout == ""
    (line,) = refused.stderr.strip().splitlines()
    assert auth_server.uri in line and "HTTP 401" in line
    texts = [proc.stdout, proc.stderr, refused.stdout, refused.stderr]
    assert assert_not_leaked(secret_forms(WRONG), texts, run_dir) > 5
    again = read_back(mlflow_venv, auth_server.uri, "refused", tmp_path / "dl1", auth_server.admin)
    assert again["runs"] == []

    first = json.loads(sync_cli(out, auth_server.uri, user_env(PASSWORD)).stdout)
    assert first["sent"]["runs"] == 2 and first["sent"]["statuses"] == 2
    doc = read_back(mlflow_venv, auth_server.uri, "refused", tmp_path / "dl", auth_server.admin)
    check_plain_run(doc, run_dir, tmp_path / "dl")
    second = json.loads(sync_cli(out, auth_server.uri, user_env(PASSWORD)).stdout)
    assert sum(second["sent"].values()) == 0


def test_a_bearer_token_is_refused_by_the_basic_auth_app(auth_server, mlflow_venv, tmp_path):
    """MLflow's basic-auth app knows users and passwords only: a token (even the user's
    password given as one) is refused, in one line that names the variable, not its value."""
    for token in (TOKEN, PASSWORD):
        client = MlflowClient(auth_server.uri, 30.0, environ={"MLFLOW_TRACKING_TOKEN": token})
        with pytest.raises(TrackerError) as err:
            client.experiment_id("token")
        assert "HTTP 401" in str(err.value) and "$MLFLOW_TRACKING_TOKEN" in str(err.value)
        assert token not in str(err.value)
    out = tmp_path / "token-run"
    trk = tracking_file(tmp_path / "trk.yaml", auth_server.uri, "token")
    run_dir = RunDir(out)
    run_dir.mark()
    run_dir.set_tracking(for_run_dir(load_file(trk), out).model_dump(mode="json"))
    proc = sync_cli(out, auth_server.uri, clean_env(MLFLOW_TRACKING_TOKEN=TOKEN), check=False)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert auth_server.uri in line and "HTTP 401" in line and "bearer token" in line
    assert_not_leaked(secret_forms(TOKEN), [proc.stdout, proc.stderr], run_dir)
    doc = read_back(mlflow_venv, auth_server.uri, "token", tmp_path / "dl", auth_server.admin)
    assert doc["runs"] == []
