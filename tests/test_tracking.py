"""Trackers without a tracking server: the ``tracking:`` section, the study key, what a run
contributes (redacted), the bounded lane against a server that accepts connections and
never answers, what requests carry (no ~/.netrc), and TensorBoard event files read back
with TensorBoard's own reader. The tests against a real ``mlflow server`` are in
tests/test_tracking_mlflow.py."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import scalelab_main
from train_support import TINY, deep_update

import scalelab.train
from scalelab.errors import UsageError
from scalelab.redact import REDACTED
from scalelab.rundir import RunDir
from scalelab.study import config as study_config
from scalelab.study import tracking as study_tracking
from scalelab.tracking import content
from scalelab.tracking.config import TRACKING_ENV, from_environ
from scalelab.tracking.mlflow import MlflowClient, TrackerError
from scalelab.tracking.sender import Item, Sender

STUDY = {
    "results": "results",
    "data": {"source": "tokens"},
    "train": {
        "model": {"name": "gpt", "options": {"size": "tiny"}},
        "data": {"num_samples": 64, "val_samples": 32, "seq_len": 8, "vocab_size": 32},
        "optim": {"global_batch_size": 16},
    },
    "sweep": {"backends": ["none"], "nodes": [1], "tasks_per_node": [1]},
    "commbench": {"enabled": False},
}


def study(**tracking) -> dict:
    return study_config.validate({**STUDY, "tracking": tracking})


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("tracking", "field"),
    [
        ({"mlflow": {"uri": "http://user:pw@host:5000"}}, "tracking.mlflow.uri"),
        ({"mlflow": {"uri": "ftp://host"}}, "tracking.mlflow.uri"),
        ({"mlflow": {"uri": "http://host/?token=x"}}, "tracking.mlflow.uri"),
        ({"mlflow": {"uri": "http://h", "timeout_s": 0}}, "tracking.mlflow.timeout_s"),
        ({"mlflow": {"uri": "http://h", "token": "x"}}, "tracking.mlflow.token"),
        ({"mlflow": {"uri": "http://h", "experiment": "a\nb"}}, "tracking.mlflow.experiment"),
        ({"tensorboard": "yes"}, "tracking.tensorboard"),
    ],
)
def test_bad_tracking_sections_are_one_line_naming_the_field(tracking, field):
    with pytest.raises(UsageError) as err:
        study(**tracking)
    text = str(err.value)
    assert field in text and "\n" not in text
    assert "pw@" not in text and "token=x" not in text.replace(field, "")


def test_tracking_defaults_to_off_and_exports_nothing():
    cfg = study()
    assert cfg["tracking"] == {
        "mlflow": {
            "uri": None,
            "experiment": "scalelab",
            "live": True,
            "timeout_s": 5.0,
            "flush_s": 30.0,
        },
        "tensorboard": False,
    }
    env = {TRACKING_ENV: "stale"}
    assert study_tracking.export(cfg, env) is None and TRACKING_ENV not in env


def test_the_workflow_schema_carries_the_section():
    schema = study_config.json_schema()
    assert set(schema["properties"]["tracking"]["$ref"].split("/")[-1:]) == {"TrackingConfig"}
    assert "mlflow" in schema["$defs"]["TrackingConfig"]["properties"]


def test_study_key_follows_what_is_studied_not_how_it_is_reported(tmp_path):
    cfg = study(mlflow={"uri": "http://127.0.0.1:5000"})
    key = study_tracking.study_key(cfg, tmp_path / "results")
    same = {**cfg, "analysis": {**cfg["analysis"], "threshold": 0.5}}
    same["tracking"] = {**cfg["tracking"], "tensorboard": True}
    assert study_tracking.study_key(same, tmp_path / "results") == key
    more = json.loads(json.dumps(cfg))
    more["sweep"]["repeats"] = 2
    assert study_tracking.study_key(more, tmp_path / "results") != key
    assert study_tracking.study_key(cfg, tmp_path / "elsewhere") != key


def test_exported_settings_reach_a_run_as_the_launcher_reads_them(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = study(mlflow={"uri": "http://127.0.0.1:5000", "experiment": "e1"}, tensorboard=True)
    env: dict[str, str] = {}
    exported = study_tracking.export(cfg, env)
    back = from_environ(env)
    assert back == exported
    assert back.study_key == study_tracking.study_key(cfg, tmp_path / "results")
    assert back.tracking.mlflow.experiment == "e1" and back.tracking.tensorboard
    with pytest.raises(UsageError, match=TRACKING_ENV):
        from_environ({TRACKING_ENV: "{not json"})


# --------------------------------------------------------------------------- content


def test_params_are_flattened_and_redacted():
    config = {
        "optim": {"lr": 0.1, "milestones": [1, 2]},
        "model": {"name": "cnn", "options": {}},
        "data": {"path": "https://user:hunter2@host/data", "api_key": "k-123"},
        "note": "run with HF_TOKEN=abc123 set",
    }
    params = content.params(config)
    assert params["optim.lr"] == "0.1" and params["optim.milestones"] == "[1, 2]"
    assert params["model.name"] == "cnn" and params["model.options"] == "{}"
    assert params["data.api_key"] == REDACTED
    assert "hunter2" not in params["data.path"] and "host/data" in params["data.path"]
    assert "abc123" not in params["note"]


def test_epoch_metrics_are_the_record_values_at_its_epoch():
    record = {
        "kind": "epoch",
        "epoch": 2,
        "epochs": 3,
        "time": 5.0,
        "train_loss": 0.5,
        "val_loss": None,
        "comm_s": float("nan"),
        "global_step": 12,
        "flag": True,
    }
    metrics = content.epoch_metrics(record, 7)
    assert {m["key"]: m["value"] for m in metrics} == {"train_loss": 0.5, "global_step": 12.0}
    assert {m["step"] for m in metrics} == {2} and {m["timestamp"] for m in metrics} == {7}


def test_artifacts_are_redacted_by_kind(tmp_path):
    doc = {"env": {"NCCL_X": "http://u:s3cret@h"}, "password": "p4ss", "n": 1}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    (tmp_path / "a.yaml").write_text("password: p4ss\nurl: http://u:s3cret@h\nn: 1\n")
    (tmp_path / "a.jsonl").write_text(json.dumps(doc) + "\n" + json.dumps({"n": 2}) + "\n")
    (tmp_path / "a.md").write_text("HF_TOKEN=p4ss and http://u:s3cret@h\n")
    png = bytes(range(256))
    (tmp_path / "a.png").write_bytes(png)
    for name in ("a.json", "a.yaml", "a.jsonl", "a.md"):
        text = content.artifact_bytes(tmp_path / name).decode()
        assert "p4ss" not in text and "s3cret" not in text, name
        assert REDACTED in text
    assert json.loads(content.artifact_bytes(tmp_path / "a.json"))["n"] == 1
    assert content.artifact_bytes(tmp_path / "a.png") == png


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def hanging_server():
    """A TCP server that accepts every connection and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(srv.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}", held
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        srv.close()


@contextlib.contextmanager
def capture_server():
    """A TCP server that answers every request ``200 {}`` and keeps the raw requests."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    seen: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn = srv.accept()[0]
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                while len(body) < length:
                    body += conn.recv(65536)
                seen.append(head + b"\r\n\r\n" + body)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
                )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}", seen
    finally:
        stop.set()
        thread.join(5)
        srv.close()


def test_a_request_to_a_hanging_server_ends_at_its_timeout():
    with hanging_server() as (uri, _):
        client = MlflowClient(uri, 0.5, environ={})
        start = time.monotonic()
        with pytest.raises(TrackerError, match="no answer in 0.5 s") as err:
            client.experiment_id("x")
        assert time.monotonic() - start < 3
        assert not err.value.reachable


def test_the_lane_never_blocks_and_returns_within_its_bound():
    """Items put while the server hangs cost the caller nothing; close waits at most its
    bound and names every item not sent."""
    with hanging_server() as (uri, held):
        client = MlflowClient(uri, 30.0, environ={})  # a request alone would wait 30 s
        sender = Sender("test")
        start = time.monotonic()
        for i in range(50):
            sender.put(Item(f"item {i}", 1, lambda: client.experiment_id("x")))
        put_s = time.monotonic() - start
        deadline = time.monotonic() + 10
        while not held and time.monotonic() < deadline:
            time.sleep(0.05)
        unsent = sender.close(1.0)
        close_s = time.monotonic() - start - put_s
    assert put_s < 0.5
    assert close_s < 2.0
    assert sorted(item.what for item in unsent) == sorted(f"item {i}" for i in range(50))
    assert "still busy after 1 s" in (sender.error or "")


def test_a_user_and_password_win_over_a_token_as_in_mlflows_client():
    """MLflow 3.17.2's rest_utils.http_request sends Basic when a user and a password are
    set, a token only without them; a refusal names the variables, never a value."""
    both = {
        "MLFLOW_TRACKING_TOKEN": "tok-77",
        "MLFLOW_TRACKING_USERNAME": "u",
        "MLFLOW_TRACKING_PASSWORD": "pw-77",
    }
    with capture_server() as (uri, seen):
        client = MlflowClient(uri, 5.0, environ=both)
        client.call("GET", "experiments/search", "probe")
    assert b"Authorization: Basic " + base64.b64encode(b"u:pw-77") in seen[0]
    assert b"tok-77" not in seen[0]
    assert "$MLFLOW_TRACKING_USERNAME" in client.sent and "pw-77" not in client.sent


def test_requests_carry_the_token_and_never_a_netrc_password(monkeypatch, tmp_path):
    """The token (MLflow's variable) goes in the Authorization header; a ~/.netrc entry
    for the server's host is not read (requests would send it as Basic auth)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text("machine 127.0.0.1 login alice password netrc-pw-4711\n")
    (home / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    with capture_server() as (uri, seen):
        MlflowClient(uri, 5.0, environ={}).call("GET", "experiments/search", "probe")
        MlflowClient(uri, 5.0, environ={"MLFLOW_TRACKING_TOKEN": "tok-0042"}).call(
            "GET", "experiments/search", "probe"
        )
    assert len(seen) == 2
    netrc_b64 = base64.b64encode(b"alice:netrc-pw-4711")
    for raw in seen:
        assert b"netrc-pw-4711" not in raw and netrc_b64 not in raw
    assert b"authorization" not in seen[0].lower()
    assert b"Authorization: Bearer tok-0042" in seen[1]


# --------------------------------------------------------------------------- training


def _tracked_run(out: Path, settings: dict) -> RunDir:
    """A run directory with the tracking settings a launcher would leave in it."""
    run_dir = RunDir(out)
    run_dir.mark()
    run_dir.set_tracking(settings)
    return run_dir


def _settings(tracking: dict) -> dict:
    return {
        "tracking": tracking,
        "study_key": "0123456789abcdef",
        "study_name": "test",
        "run_id": "none-strong-n1-t1-g0-r0",
    }


#: Epochs of the timed runs: a tracker that waited on the server per epoch would cost
#: at least this many timeouts.
EPOCHS = 3
TIMEOUT_S = 2.0
#: The stated bound (docs/tracking.md): a hanging server costs a run at most
#: tracking.mlflow.timeout_s, at its end; the slack absorbs a loaded machine.
SLACK_S = 3.0


def test_a_hanging_server_slows_training_by_at_most_its_timeout(tmp_path, capfd):
    cfg = deep_update(TINY, {"train": {"epochs": EPOCHS}, "checkpoint": {"every_epochs": 0}})
    scalelab.train.run(deep_update(cfg, {"train": {"epochs": 1}}), tmp_path / "warm-up")
    start = time.monotonic()
    scalelab.train.run(cfg, tmp_path / "plain")
    plain_s = time.monotonic() - start
    with hanging_server() as (uri, held):
        run_dir = _tracked_run(
            tmp_path / "tracked",
            _settings({"mlflow": {"uri": uri, "timeout_s": TIMEOUT_S}}),
        )
        start = time.monotonic()
        summary = scalelab.train.run(cfg, run_dir.path)
        tracked_s = time.monotonic() - start
        assert held, "the tracker never connected"
    assert summary["status"] == "completed"
    assert tracked_s - plain_s < TIMEOUT_S + SLACK_S, (tracked_s, plain_s)
    lines = [x for x in capfd.readouterr().err.splitlines() if "tracking:" in x]
    assert len(lines) == 1, lines
    assert "not sent: run start" in lines[0] and uri in lines[0]
    (entry,) = run_dir.unsent()
    assert entry["not_sent"][0].startswith("run start")
    assert sum(w.startswith("epoch ") for w in entry["not_sent"]) == EPOCHS
    assert "artifact summary.json" in entry["not_sent"] and "final status" in entry["not_sent"]


def test_tensorboard_event_files_read_back_as_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = deep_update(TINY, {"train": {"epochs": 2}, "checkpoint": {"every_epochs": 0}})
    run_dir = _tracked_run(tmp_path / "run", _settings({"tensorboard": True}))
    scalelab.train.run(cfg, run_dir.path)
    acc = EventAccumulator(str(run_dir.tensorboard))
    acc.Reload()
    epochs = [r for r in run_dir.metrics() if r["kind"] == "epoch"]
    assert len(epochs) == 2
    expected: dict[str, list[tuple[int, float]]] = {}
    for rec in epochs:
        for key, value in rec.items():
            if key in ("kind", "epoch", "epochs", "time") or value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            expected.setdefault(key, []).append((rec["epoch"], float(value)))
    assert {"train_loss", "val_acc", "samples_per_s"} <= set(expected)
    assert set(acc.Tags()["scalars"]) == set(expected)
    for key, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in points], key
        for (_, a), (_, b) in zip(got, points, strict=True):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-12), key


def test_a_run_without_settings_tracks_nothing(tmp_path):
    out = tmp_path / "run"
    scalelab.train.run(deep_update(TINY, {"train": {"steps_per_epoch": 2}}), out)
    run_dir = RunDir(out)
    assert not run_dir.tensorboard.exists() and not run_dir.unsent_path.exists()


# --------------------------------------------------------------------------- train --tracking


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("tracking: {mlflow: {uri: 'http://u:pw-9@h'}}", "tracking.mlflow.uri"),
        ("tracking: {mlflow: {urii: 'http://h'}}", "tracking.mlflow.urii"),
        ("tracking: {tensorboard: 'yes'}", "tracking.tensorboard"),
        ("tracking: {mlflow: {uri: 'http://h', timeout_s: 0}}", "tracking.mlflow.timeout_s"),
        ("mlflow: {uri: 'http://h'}", "mlflow"),
        ("tracking: {}", "tracking"),
        ("- a list", None),
        ("tracking: [unclosed", None),
    ],
)
def test_train_refuses_a_bad_tracking_file_in_one_line_before_training(tmp_path, content, field):
    trk = tmp_path / "trk.yaml"
    trk.write_text(content)
    out = tmp_path / "run"
    rc, stdout, stderr = scalelab_main("train", "--out", out, "--tracking", trk)
    assert rc == 2 and stdout == ""
    (line,) = stderr.strip().splitlines()
    assert str(trk) in line and "pw-9" not in line
    if field is not None:
        assert f"field '{field}'" in line
    assert not out.exists()  # nothing written, nothing trained


def test_train_refuses_a_missing_tracking_file(tmp_path):
    rc, _, stderr = scalelab_main("train", "--out", tmp_path / "r", "--tracking", tmp_path / "no")
    assert rc == 2 and str(tmp_path / "no") in stderr and len(stderr.strip().splitlines()) == 1


def test_train_tracking_writes_the_settings_a_resume_keeps(tmp_path):
    """--tracking writes RUN_DIR/tracking.json as a launch does; a resume without it keeps
    them, and TensorBoard follows them."""
    trk = tmp_path / "trk.yaml"
    trk.write_text(yaml.safe_dump({"tracking": {"tensorboard": True}}))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(deep_update(TINY, {"train": {"epochs": 2}})))
    out = tmp_path / "my run"
    rc, _, err = scalelab_main("train", "--config", cfg, "--out", out, "--tracking", trk)
    assert rc == 0, err
    run_dir = RunDir(out)
    saved = run_dir.tracking()
    assert saved["run_id"] == "my-run" and saved["standalone"] is True
    assert saved["tracking"]["tensorboard"] is True and saved["tracking"]["mlflow"]["uri"] is None
    assert any(run_dir.tensorboard.glob("events.out.tfevents.*"))
    rc, out_text, err = scalelab_main("train", "--config", cfg, "--out", out, "--resume")
    assert rc == 0 and "nothing to do" in out_text, err
    assert run_dir.tracking() == saved


def test_train_help_names_the_tracking_file():
    rc, stdout, _ = scalelab_main("train", "--help")
    assert rc == 0 and "--tracking FILE" in stdout and "tracking:" in stdout
