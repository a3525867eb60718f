"""Figures for docs/reliability.md, written by the tests themselves (not a test module).

Fault, data-safety and injection tests call :func:`record` with what they measured;
``python tests/reliability.py`` renders docs/reliability.md's figures table from the
last run's records (``$SCALELAB_RELIABILITY_DIR``, default build/reliability/).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = Path(os.environ.get("SCALELAB_RELIABILITY_DIR", REPO / "build" / "reliability"))
DOC = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"


def record(name: str, **figures) -> None:
    """Store one test's figures under ``name`` (the last run wins)."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    doc = {"name": name, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **figures}
    (FIGURES / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")


class Tally:
    """Counts a module's cases as they pass; records them only after a full run of the
    module (a -k selection would publish a partial count as the figure)."""

    def __init__(self, request, name: str, **labels: str) -> None:
        self.request, self.name, self.labels = request, name, labels
        self.tried = self.passed = 0

    def case(self, request) -> None:
        """Call from an autouse function fixture's teardown (after the test ran)."""
        self.tried += 1
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.passed:
            self.passed += 1

    def publish(self, **extra) -> None:
        option = self.request.config.option
        if getattr(option, "keyword", "") or getattr(option, "markexpr", ""):
            return  # a selection: its count is not the module's figure
        module = self.request.module
        total = sum(1 for item in self.request.session.items if item.module is module)
        if self.tried and self.tried >= total:
            record(
                self.name,
                **{
                    self.labels.get("tried", "tried"): self.tried,
                    self.labels.get("passed", "passed"): self.passed,
                },
                **extra,
            )


def tally_fixtures(name: str, tried: str, passed: str, **extra):
    """The two autouse fixtures a module needs to publish its tally as ``name``:
    ``tally, _count = tally_fixtures(...)`` at module level."""
    import pytest

    @pytest.fixture(scope="module", autouse=True, name="tally")
    def tally(request):
        seen = Tally(request, name, tried=tried, passed=passed)
        yield seen
        seen.publish(**extra)

    @pytest.fixture(autouse=True, name="_count")
    def count(request, tally):
        yield
        tally.case(request)

    return tally, count


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value).replace("|", "\\|")


def table() -> str:
    """A Markdown table of every record, one row per record."""
    rows = [json.loads(p.read_text()) for p in sorted(FIGURES.glob("*.json"))]
    if not rows:
        return "_No records: run the test suite first._"
    lines = ["| record | figures | measured |", "|---|---|---|"]
    for r in rows:
        figures = "; ".join(
            f"{k.replace('_', ' ')}: {_cell(v)}"
            for k, v in r.items()
            if k not in ("name", "when", "fault")
        )
        lines.append(f"| {r.get('name') or r.get('fault')} | {figures} | {r['when']} |")
    return "\n".join(lines)


def render() -> None:
    """Replace the figures block of docs/reliability.md with the last run's table."""
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")


if __name__ == "__main__":
    render()
    sys.exit(0)
