import re

from conftest import VENV_BIN, run

from scalelab import __version__


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
