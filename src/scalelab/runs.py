"""``scalelab runs`` and ``scalelab diff``: list run directories and compare two by provenance."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from scalelab import provenance
from scalelab.errors import UsageError
from scalelab.rerun import RESULT_FIELDS, compare_results
from scalelab.rundir import RunDir


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("runs", help="table of run directories with key figures and provenance ids")
    r.add_argument(
        "dirs",
        nargs="*",
        type=Path,
        metavar="DIR",
        help="run directories or folders holding them (default: results/runs, or .)",
    )
    r.add_argument("--json", action="store_true", help="print the rows as JSON")
    r.set_defaults(func=cmd_runs)

    d = sub.add_parser(
        "diff", help="what differs between two runs: config, environment, hardware, results"
    )
    d.add_argument("run_a", type=Path, metavar="RUN_A")
    d.add_argument("run_b", type=Path, metavar="RUN_B")
    d.add_argument(
        "--all",
        action="store_true",
        help="also incidental fields (hosts, times, job ids, launcher command)",
    )
    d.add_argument("--json", action="store_true", help="print the differences as JSON")
    d.set_defaults(func=cmd_diff)


# ----------------------------------------------------------------------------- runs


def find_runs(dirs: list[Path]) -> list[Path]:
    """Run directories (holding provenance.json) at or under each of ``dirs``."""
    if not dirs:
        dirs = [Path("results/runs")] if Path("results/runs").is_dir() else [Path(".")]
    found: list[Path] = []
    for d in dirs:
        if not d.exists():
            raise UsageError(f"{d}: no such directory")
        if RunDir(d).provenance_path.is_file():
            found.append(d)
        else:
            found.extend(sorted(p.parent for p in d.rglob(RunDir.PROVENANCE)))
    return found


def run_row(run_dir: Path) -> dict[str, Any]:
    """One row of `scalelab runs`: key figures and provenance ids."""
    m = provenance.load(run_dir)
    must, inc = m["must_match"], m["incidental"]
    summary: dict[str, Any] = {}
    with contextlib.suppress(UsageError):
        summary = RunDir(run_dir).summary()
    git = inc.get("git") or {}
    return {
        "run": str(run_dir),
        "provenance_id": m["provenance_id"],
        "status": summary.get("status", "incomplete"),
        "backend": summary.get("backend", must["backend"]),
        "launcher": must["launcher"],
        "world_size": must["world_size"],
        "nodes": must["nodes"],
        "train_loss": summary.get("train_loss"),
        "val_acc": summary.get("val_acc"),
        "samples_per_s": summary.get("samples_per_s"),
        "torch": must["versions"]["torch"],
        "git": (git.get("commit", "")[:10] + ("+dirty" if git.get("dirty") else "")) or None,
        "config_sha256": must["config_sha256"],
        "data_sha256": must["data_sha256"],
        "lock_sha256": must["lock_sha256"],
        "image_sha256": must["image_sha256"],
        "started_at": inc.get("started_at"),
    }


def cmd_runs(args: argparse.Namespace) -> int:
    rows = [run_row(d) for d in find_runs(args.dirs)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("scalelab runs: no run directories with provenance.json found")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} run(s)")
    cols = [
        ("run", "run"),
        ("provenance_id", "prov id"),
        ("status", "status"),
        ("backend", "backend"),
        ("world_size", "ranks"),
        ("nodes", "nodes"),
        ("train_loss", "train loss"),
        ("val_acc", "val acc"),
        ("samples_per_s", "samples/s"),
        ("torch", "torch"),
        ("git", "git"),
        ("config_sha256", "config"),
        ("data_sha256", "data"),
        ("started_at", "started"),
    ]
    for _, title in cols:
        table.add_column(title, overflow="fold")
    for r in rows:
        table.add_row(*[_cell(key, r[key]) for key, _ in cols])
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return 0


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("sha256"):
        return str(value)[:10]
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ----------------------------------------------------------------------------- diff


def run_diff(a: Path, b: Path, incidental: bool = False) -> dict[str, list[dict[str, Any]]]:
    """{section: [{field, a, b}]} for config, environment, hardware, results (+ incidental)."""
    ma, mb = provenance.load(a), provenance.load(b)

    def section(x: Any, y: Any) -> list[dict[str, Any]]:
        fx, fy = provenance.flatten(x or {}), provenance.flatten(y or {})
        return [
            {"field": k, "a": fx.get(k), "b": fy.get(k)}
            for k in sorted(set(fx) | set(fy))
            if fx.get(k) != fy.get(k)
        ]

    def summary(d: Path) -> dict[str, Any]:
        try:
            s = RunDir(d).summary()
        except UsageError:
            return {}
        return {k: s.get(k) for k in (*RESULT_FIELDS, "samples_per_s", "time_s", "status")}

    out = {
        "config": section(ma["config"], mb["config"]),
        "environment": section(ma["must_match"], mb["must_match"]),
        "hardware": section(ma["incidental"].get("hardware"), mb["incidental"].get("hardware")),
        "env_vars": section(ma["incidental"].get("env"), mb["incidental"].get("env")),
        "results": section(summary(a), summary(b)),
    }
    ra, rb = RunDir(a), RunDir(b)
    if ra.model_path.is_file() and rb.model_path.is_file():
        w = (
            compare_results(a, b, exact=True)
            if ra.summary_path.is_file() and (rb.summary_path.is_file())
            else None
        )
        if w and not w["weights_equal"]:
            worst = max(w["tensors"], key=lambda t: t.get("max_abs_diff") or 0)
            out["results"].append(
                {
                    "field": RunDir.MODEL,
                    "a": "weights",
                    "b": f"differ (max |diff| {worst.get('max_abs_diff')})",
                }
            )
    if incidental:
        keep = {k: v for k, v in ma["incidental"].items() if k not in ("hardware", "env")}
        other = {k: v for k, v in mb["incidental"].items() if k not in ("hardware", "env")}
        out["incidental"] = section(keep, other)
    return out


def cmd_diff(args: argparse.Namespace) -> int:
    diff = run_diff(args.run_a, args.run_b, args.all)
    if args.json:
        print(json.dumps(diff, indent=2, default=str))
        return 0
    total = sum(len(v) for v in diff.values())
    print(f"scalelab diff: {args.run_a} (a) vs {args.run_b} (b): {total} difference(s)")
    for name, rows in diff.items():
        print(f"{name}: {'no difference' if not rows else ''}")
        for r in rows:
            print(f"  {r['field']}: {_short(r['a'])} -> {_short(r['b'])}")
    return 0


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 70 else text[:67] + "..."
