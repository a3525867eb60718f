"""The import layers (pyproject.toml [tool.importlinter]) hold, the check can fail, internal
imports sit at module top except at the listed places, and the light commands stay free of
the heavy third-party packages (torch, numpy, pandas, matplotlib)."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import scalelab

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(scalelab.__file__).resolve().parent  # the scalelab this test run imports
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
HEAVY = ("torch", "numpy", "pandas", "matplotlib")

#: The only internal imports left inside functions: (file, imported module) -> (the heavy
#: package importing that module pulls in, or None, reason). Every other `scalelab` import
#: sits at module top (`if TYPE_CHECKING:` blocks aside).
LAZY: dict[tuple[str, str], tuple[str | None, str]] = {
    ("analysis/cli.py", "scalelab.analysis.report"): (
        "pandas",
        "analysis.cli registers `analyze` for every --help; report pulls pandas",
    ),
    ("analysis/cli.py", "scalelab.analysis.scaling"): (
        "pandas",
        "analysis.cli registers `analyze` for every --help; scaling pulls pandas",
    ),
    ("backends/__init__.py", "scalelab.backends.memory"): (
        "torch",
        "the backends package is on --help (train.config); memory pulls torch",
    ),
    ("comm/collectives.py", "scalelab.backends.fsdp"): (
        "torch",
        "collectives is on `commbench --help`; backends.fsdp pulls torch",
    ),
    ("comm/predict_cli.py", "scalelab.comm.predict"): (
        "pandas",
        "predict_cli registers `predict` for every --help; predict pulls pandas",
    ),
    ("comm/predict_cli.py", "scalelab.comm.predict_report"): (
        "pandas",
        "predict_cli registers `predict` for every --help; the report pulls pandas",
    ),
    ("comm/results.py", "scalelab.analysis.plots"): (
        "pandas",
        "results is on `commbench --help`; plots pulls pandas and matplotlib",
    ),
    ("data/cli.py", "scalelab.data.stage"): (
        "numpy",
        "data.cli registers `data` for every --help; stage pulls numpy",
    ),
    ("data/cli.py", "scalelab.data.verify"): (
        "numpy",
        "data.cli registers `data` for every --help; verify pulls numpy",
    ),
    ("data/cli.py", "scalelab.data.nodelocal"): (
        "numpy",
        "data.cli registers `data` for every --help; nodelocal pulls numpy",
    ),
    ("data/registry.py", "scalelab.data.synthetic"): (
        "numpy",
        "the registry is on --help (evaluate, plan); each data kind pulls numpy",
    ),
    ("data/registry.py", "scalelab.data.tokens"): (
        "numpy",
        "the registry is on --help (evaluate, plan); each data kind pulls numpy",
    ),
    ("data/registry.py", "scalelab.data.memory"): (
        "numpy",
        "the registry is on --help (evaluate, plan); each data kind pulls numpy",
    ),
    ("data/registry.py", "scalelab.data.shards"): (
        "numpy",
        "the registry is on --help (evaluate, plan); each data kind pulls numpy",
    ),
    ("data/registry.py", "scalelab.data.nodelocal"): (
        "numpy",
        "the registry is on --help (evaluate, plan); each data kind pulls numpy",
    ),
    ("data/registry.py", "scalelab.data.manifest"): (
        "numpy",
        "the registry is on --help (evaluate, plan); manifest pulls numpy",
    ),
    ("evaluate.py", "scalelab.data.shards"): (
        "numpy",
        "evaluate registers `evaluate` for every --help; shards pulls numpy",
    ),
    ("train/__init__.py", "scalelab.train.loop"): (
        "torch",
        "the train package is on --help (train.config); the loop pulls torch",
    ),
}


def _lint(pythonpath: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", *extra, str(REPO / "pyproject.toml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


def test_lint_imports_keeps_the_layers():
    proc = _lint(PACKAGE.parent)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"\bKEPT\b", out) and "0 broken" in out, out


def test_lint_imports_reports_an_upward_import(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "scalelab", ignore=shutil.ignore_patterns("__pycache__"))
    fsio = tmp_path / "scalelab" / "fsio.py"
    fsio.write_text("import scalelab.cli  # noqa\n" + fsio.read_text())
    proc = _lint(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "BROKEN" in out and "scalelab.fsio" in out and "scalelab.cli" in out, out


def _module_names() -> set[str]:
    names = set()
    for path in PACKAGE.rglob("*.py"):
        parts = ("scalelab", *path.relative_to(PACKAGE).with_suffix("").parts)
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _imports_in_functions(path: Path, modules: set[str]) -> set[str]:
    """The scalelab modules `path` imports inside a function (TYPE_CHECKING blocks aside)."""
    found: set[str] = set()

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if in_function and isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "scalelab")
            elif in_function and isinstance(child, ast.ImportFrom) and child.module:
                assert child.level == 0, f"{path}: relative import"
                if child.module.split(".")[0] == "scalelab":
                    for alias in child.names:
                        sub = f"{child.module}.{alias.name}"
                        found.add(sub if sub in modules else child.module)
            walk(child, inner)

    walk(ast.parse(path.read_text()), False)
    return found


def test_internal_imports_inside_functions_are_only_the_listed_ones():
    modules = _module_names()
    actual = {
        (str(p.relative_to(PACKAGE)), m)
        for p in sorted(PACKAGE.rglob("*.py"))
        for m in _imports_in_functions(p, modules)
    }
    assert actual - LAZY.keys() == set(), "move these to module top or list them in LAZY"
    assert LAZY.keys() - actual == set(), "stale LAZY entries: these imports are gone"
    assert all(reason for _, reason in LAZY.values())


@pytest.mark.parametrize("target,heavy", sorted({(m, h) for (_, m), (h, _) in LAZY.items() if h}))
def test_a_lazy_import_is_lazy_because_its_module_is_heavy(target, heavy):
    """The reason in LAZY holds: importing the module pulls the heavy package."""
    code = f"import sys, {target}; print({heavy!r} in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)},
        timeout=300,
    )
    assert proc.stdout.strip() == "True", (proc.stdout, proc.stderr)


def _snakemake_imports() -> str:
    """The scalelab imports of workflow/rules/common.smk (what Snakemake's parse loads)."""
    lines = (REPO / "workflow" / "rules" / "common.smk").read_text().splitlines()
    found = [line for line in lines if re.match(r"(from|import) scalelab\b", line)]
    assert any("launcher" in line for line in found), found
    return "\n".join(found)


LIGHT = {
    "scalelab --help": "main(['--help'])",
    "scalelab plan --help": "main(['plan', '--help'])",
    "scalelab plan config/config.yaml": "main(['plan', 'config/config.yaml'])",
    "scalelab container --help": "main(['container', '--help'])",
    "scalelab data --help": "main(['data', '--help'])",
    "import scalelab.study.plan": "import scalelab.study.plan",
    "import scalelab.launcher": "import scalelab.launcher",
    "common.smk's imports": None,
}


def _heavy_loaded(body: str, prelude: str = "") -> list[str]:
    """The HEAVY packages loaded after running `body` in a fresh interpreter."""
    code = f"import sys\n{prelude}{body}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(LIGHT))
def test_light_paths_import_no_heavy_package(name):
    body = LIGHT[name] or _snakemake_imports()
    if body.startswith("main("):
        body = (
            f"from scalelab.cli import main\ntry:\n    {body}\n"
            "except SystemExit as e:\n    assert not e.code, e.code"
        )
    assert _heavy_loaded(body) == [], name
    if name == "scalelab --help":  # the harness sees a heavy package when one is loaded
        assert _heavy_loaded(body, prelude="import numpy\n") == ["numpy"]
