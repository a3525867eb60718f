import json
import re

import pytest
from conftest import VENV_BIN, run, scalelab_main

from scalelab import __version__, cli


def test_version():
    out = run([str(VENV_BIN / "scalelab"), "--version"]).stdout
    assert out.strip() == f"scalelab {__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)


def test_help_lists_subcommands():
    out = run([str(VENV_BIN / "scalelab"), "--help"]).stdout
    for cmd in ("doctor", "testcluster"):
        assert cmd in out


def test_no_command_is_usage_error():
    proc = run([str(VENV_BIN / "scalelab")], check=False)
    assert proc.returncode == 2


# ---- one way to register a command ------------------------------------------------------------


def _registered(modules: list[str]) -> list[str]:
    """The top-level commands the given modules add to a fresh parser, in order."""
    import importlib

    sub = cli.Parser(prog="scalelab").add_subparsers(dest="scalelab_command")
    for name in modules:
        importlib.import_module(name).register(sub)
    return list(sub.choices)


def _expected(modules: set[str]) -> list[str]:
    names = [c for c, m in cli.COMMANDS.items() if m in modules]
    return names + [old for old, new in cli.DEPRECATED.items() if new in names]


@pytest.mark.parametrize("module", cli.COMMAND_MODULES)
def test_each_module_registers_exactly_its_rows_of_the_table(module):
    assert sorted(_registered([module])) == sorted(_expected({module}))


def test_the_table_is_the_parser_in_help_order():
    registered = _registered(cli.COMMAND_MODULES)
    assert [c for c in registered if c not in cli.DEPRECATED] == list(cli.COMMANDS)
    assert set(registered) == set(cli.COMMANDS) | set(cli.DEPRECATED)
    help_text = run([str(VENV_BIN / "scalelab"), "--help"]).stdout
    positions = [help_text.index(f"\n    {c}") for c in cli.COMMANDS]
    assert positions == sorted(positions)


@pytest.mark.parametrize("command", [*cli.COMMANDS, *cli.DEPRECATED])
def test_every_command_has_help(command):
    rc, out, err = scalelab_main(command, "--help")
    assert rc == 0 and f"usage: scalelab {command}" in out, err


# ---- data: one group, the old spellings for one release ----------------------------------------


STAGE = (
    "--source",
    "synthetic",
    "--num-samples",
    "60",
    "--image-size",
    "8",
    "8",
    "--num-classes",
    "3",
    "--quiet",
    "--out",
)


def _deprecation(err: str, old: str, new: str) -> None:
    """Exactly one deprecation line, naming both spellings."""
    lines = [ln for ln in err.splitlines() if "deprecated" in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith("scalelab stage: warning: ")
    assert f"`scalelab {old}`" in lines[0] and f"use `scalelab {new}`" in lines[0]


def test_old_data_spellings_work_and_name_the_new_one(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    rc, out_new, err = scalelab_main("data", "stage", *STAGE, new)
    assert rc == 0 and "deprecated" not in err, err
    rc, out_old, err = scalelab_main("stage", *STAGE, old)
    assert rc == 0, err
    _deprecation(err, "stage", "data stage")
    assert (old / "manifest.json").read_bytes() == (new / "manifest.json").read_bytes()

    rc, out, err = scalelab_main("stage", "verify", old, "--quiet")
    assert rc == 0 and out.startswith(f"OK {old}: "), err
    _deprecation(err, "stage verify", "data verify")
    scratch = tmp_path / "scratch"
    rc, out, err = scalelab_main(
        "stage", "localize", old, "--scratch", scratch, "--reserve", "0", "--quiet"
    )
    assert rc == 0 and out.strip().startswith(str(scratch)), err
    _deprecation(err, "stage localize", "data localize")
    assert (
        scalelab_main("data", "localize", old, "--scratch", scratch, "--reserve", "0", "--quiet")[1]
        == out
    )


def test_old_spelling_keeps_the_exit_code(tmp_path):
    data = tmp_path / "d"
    assert scalelab_main("data", "stage", *STAGE, data)[0] == 0
    shard = sorted((data / "train").glob("*.labels.npy"))[0]
    shard.write_bytes(shard.read_bytes()[:-3])
    new = scalelab_main("data", "verify", data, "--quiet")
    old = scalelab_main("stage", "verify", data, "--quiet")
    assert new[0] == old[0] == 1
    errors = [[ln for ln in err.splitlines() if ": error: " in ln] for _, _, err in (new, old)]
    assert len(errors[0]) == 1 and "truncated" in errors[0][0]
    assert errors[1] == [errors[0][0].replace("scalelab data:", "scalelab stage:")]
    rc, _, err = scalelab_main("stage", "verify", data, "--source", "digits")
    assert rc == 2 and "unrecognized arguments: --source" in err
    rc, _, err = scalelab_main("data")
    assert rc == 2 and err.count("\n") == 1 and "ACTION" in err


# ---- --json: one document on stdout, the verdict, the same exit code ----------------------------


def test_testcluster_status_json_and_human_agree(tmp_path):
    args = ("testcluster", "status", "--state-dir", tmp_path / "none")
    rc_human, human, _ = scalelab_main(*args)
    rc_json, doc, _ = scalelab_main(*args, "--json")
    assert rc_human == rc_json == 1
    assert human.startswith("test cluster: not up")
    assert json.loads(doc)["ok"] is False and json.loads(doc)["up"] is False


def test_json_failure_is_one_document_with_the_error(tmp_path):
    rc, out, err = scalelab_main("data", "verify", tmp_path / "nowhere", "--json")
    verdict = json.loads(out)
    assert rc == verdict["exit_code"] == 2
    assert verdict["ok"] is False and "nowhere" in verdict["error"]
    assert err.splitlines() == [f"scalelab data: error: {verdict['error']}"]


@pytest.mark.cluster
def test_testcluster_status_of_the_running_cluster(cluster):
    args = ("testcluster", "status", "--state-dir", cluster.cluster.dir)
    rc_human, human, err = scalelab_main(*args)
    rc_json, doc, _ = scalelab_main(*args, "--json")
    status = json.loads(doc)
    assert rc_human == rc_json == 0, err
    assert status["ok"] is True and status["up"] is True
    lines = human.splitlines()
    assert lines[0] == f"test cluster: up (SLURM_CONF={status['conf']})"
    assert {ln.split()[1] for ln in lines if ln.startswith("  node ")} == set(status["nodes"])
    assert all(ln.endswith(": running") for ln in lines if " pid " in ln)
