"""``scalelab site record`` and ``scalelab site check``: per-site performance references.

A site reference is what a study measured on one site, kept so a later study (after a
driver, MPI or image update, on another partition, or by a collaborator on the same
machines) can tell at once whether its figures are what that site gives:

* **record** reads a study's finished runs (through :mod:`scalelab.analysis.runs`, the one
  reader of the run formats) and writes, per point, the median throughput over repeats
  and the lowest and highest repeat, with the environment that decides the numbers (the
  runs' provenance: library versions, lock and image digests) and the hardware. A point is
  its workload (model, its options, the data's shape, precision), backend, mode, layout
  (nodes, ranks, GPUs, tp, pp, micro-batches, schedule) and global batch.
* **check** compares another study's runs point by point: the ratio of each run to the
  reference median, and a verdict against the reference's own spread widened by
  ``--tolerance``: ``slow`` below ``(1 - tolerance) x`` the slowest reference repeat,
  ``fast`` above ``(1 + tolerance) x`` the fastest (worth a look too: a changed workload,
  or a reference recorded on a busy machine), ``ok`` between. Runs whose environment
  differs from the reference's are refused, one line per differing field, unless
  ``--allow-other-environment``; then the differences are printed above the table.

Exit codes: 0 every matched point ok; 1 a point is slow or fast (``check``); 2 bad input.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scalelab import __version__, docload, provenance
from scalelab.analysis import runs
from scalelab.errors import CheckFailed, UsageError
from scalelab.fsio import atomic_write_text, canonical, sha256_bytes
from scalelab.rundir import RunDir

FORMAT = "scalelab-site-reference"
VERSION = 1
#: What identifies a point besides its workload: the analysis columns of its layout.
LAYOUT_KEYS = (
    "backend",
    "mode",
    "nodes",
    "ranks",
    "gpus",
    "tp",
    "pp",
    "microbatches",
    "schedule",
    "global_batch",
)
#: Provenance fields that decide the figures, compared between a reference and a check.
ENVIRONMENT_KEYS = ("versions.torch", "versions.torch_cuda", "versions.nccl", "versions.mpi")
ENVIRONMENT_KEYS += ("versions.horovod", "lock_sha256", "image_sha256")
HARDWARE_KEYS = ("machine", "cpu_model", "cpu_count", "gpus", "gpu_driver")
DEFAULT_TOLERANCE = 0.10


class Figure(BaseModel):
    """One point's throughput over its repeats (samples/s over all ranks)."""

    model_config = ConfigDict(extra="forbid")
    median: float = Field(gt=0)
    low: float = Field(gt=0)
    high: float = Field(gt=0)
    repeats: int = Field(ge=1)


class Point(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workload: str
    """sha256 (16 hex) of the workload: model name and options, data shape, precision."""
    label: str
    """The workload in words (model, input shape, outputs)."""
    layout: dict[str, Any]
    throughput: Figure


class Reference(BaseModel):
    """A site reference file (YAML)."""

    model_config = ConfigDict(extra="forbid")
    format: str = FORMAT
    version: int = VERSION
    site: str = Field(min_length=1)
    recorded_at: str
    scalelab: str
    environment: dict[str, Any]
    hardware: dict[str, Any]
    points: list[Point] = Field(min_length=1)


def register(sub: argparse._SubParsersAction) -> None:
    doc = (__doc__ or "").split("\n\n")
    s = sub.add_parser(
        "site",
        help="per-site performance references: record a study's figures, check another's",
        description=" ".join(doc[1].split()),
    )
    actions = s.add_subparsers(dest="site_action", metavar="ACTION", required=True)
    r = actions.add_parser("record", help="write a site reference from a study's runs")
    r.add_argument("results", nargs="+", metavar="RUN_DIR", help="run directories or folders")
    r.add_argument("--site", required=True, help="the site's name (e.g. the cluster)")
    r.add_argument("--out", required=True, type=Path, help="the reference file to write (YAML)")
    r.set_defaults(func=cmd_record)
    c = actions.add_parser("check", help="compare a study's runs with a site reference")
    c.add_argument("results", nargs="+", metavar="RUN_DIR", help="run directories or folders")
    c.add_argument("--reference", required=True, type=Path, help="a site reference file")
    c.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"allowed distance outside the reference's repeats, as a fraction "
        f"(default {DEFAULT_TOLERANCE})",
    )
    c.add_argument(
        "--allow-other-environment",
        action="store_true",
        help="compare runs whose library versions, lock or image differ (listed)",
    )
    c.add_argument("--csv", type=Path, help="also write the comparison as CSV")
    c.set_defaults(func=cmd_check)


# ------------------------------------------------------------------------ what a run is


def workload(run_dir: Path) -> tuple[str, str]:
    """(fingerprint, words) of what the run trained: equal workloads on two sites have
    equal fingerprints whatever their paths, seeds or epoch counts."""
    rd = RunDir(run_dir)
    cfg = rd.config(missing_ok=False) or {}
    spec = rd.data_spec()
    model = cfg.get("model") or {}
    data = spec.to_dict() if spec else {"input_shape": (cfg.get("data") or {}).get("image_shape")}
    what = {
        "model": model.get("name"),
        "options": model.get("options") or {},
        "data": data,
        "precision": (cfg.get("train") or {}).get("precision"),
    }
    shape = "x".join(map(str, data.get("input_shape") or [])) or "?"
    words = f"{what['model']}, input {shape}, {data.get('num_outputs', '?')} outputs"
    return sha256_bytes(canonical(what))[:16], words


def environment(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the figures' environment, the hardware) from the run's provenance: the
    :data:`ENVIRONMENT_KEYS` that decide this run's numbers (Horovod's version decides
    only Horovod runs: :func:`scalelab.provenance.decides`)."""
    m = provenance.load(run_dir)
    must = m["must_match"]
    flat = provenance.flatten(must)
    hw = m["incidental"].get("hardware") or {}
    env = {k: flat.get(k) for k in ENVIRONMENT_KEYS if provenance.decides(k, must)}
    return env, {k: hw.get(k) for k in HARDWARE_KEYS}


def _layout(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k in LAYOUT_KEYS:
        v = row[k]
        out[k] = int(v) if isinstance(v, float) and v.is_integer() else v
    return out


def _timed_rows(paths: Iterable[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    """(run dir, analysis row) of every run with a throughput."""
    dirs = [d for p in paths for d in runs.find_run_dirs(p)]
    if not dirs:
        raise UsageError(f"no run directories under {', '.join(map(str, paths))}")
    rows = [(d, runs.load_run(d)) for d in dirs]
    timed = [(d, r) for d, r in rows if not math.isnan(r["throughput"])]
    if not timed:
        raise UsageError("no run has a throughput (every step was warm-up)")
    return timed


def _key(workload_id: str, layout: dict[str, Any]) -> str:
    return canonical({"workload": workload_id, **layout}).decode()


# ------------------------------------------------------------------------------ record


def _merge(env: dict[str, Any], into: dict[str, Any], run_dir: Path) -> None:
    """Add a run's environment to the study's; one environment per reference."""
    for k, v in env.items():
        if k in into and into[k] != v:
            raise UsageError(
                f"{run_dir}: {k} is {v!r} where other runs have {into[k]!r}: the runs come "
                "from two environments; record each on its own"
            )
        into[k] = v


def record(paths: Iterable[str | Path], site: str) -> Reference:
    """The reference of the runs under ``paths``; one environment, or UsageError."""
    groups: dict[str, dict[str, Any]] = {}
    env_all: dict[str, Any] = {}
    hardware: dict[str, Any] = {}
    for run_dir, row in _timed_rows(paths):
        env, hardware = environment(run_dir)
        _merge(env, env_all, run_dir)
        wid, words = workload(run_dir)
        layout = _layout(row)
        g = groups.setdefault(_key(wid, layout), {"w": wid, "l": words, "lay": layout, "t": []})
        g["t"].append(row["throughput"])
    points = [
        Point(
            workload=g["w"],
            label=g["l"],
            layout=g["lay"],
            throughput=Figure(
                median=statistics.median(g["t"]),
                low=min(g["t"]),
                high=max(g["t"]),
                repeats=len(g["t"]),
            ),
        )  # fmt: skip
        for g in groups.values()
    ]
    return Reference(
        site=site,
        recorded_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        scalelab=__version__,
        environment=env_all,
        hardware=hardware,
        points=points,
    )


def cmd_record(args: argparse.Namespace) -> int:
    ref = record(args.results, args.site)
    import yaml

    text = yaml.safe_dump(ref.model_dump(mode="json"), sort_keys=False)
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}: {len(ref.points)} point(s) of site {ref.site}")
    return 0


# ------------------------------------------------------------------------------- check


def load_reference(path: Path) -> Reference:
    """A reference file, checked; one line naming the file and field otherwise."""
    data = docload.load(path, fmt="yaml")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(f"{path}: not a {FORMAT} file")
    if data.get("version") != VERSION:
        raise UsageError(f"{path}: field 'version': {data.get('version')!r}, expected {VERSION}")
    try:
        return Reference.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        raise UsageError(f"{path}: field '{field}': {err['msg']}") from None


def verdict(value: float, fig: Figure, tolerance: float) -> str:
    """slow, fast or ok: outside the reference's repeats by more than ``tolerance``."""
    if value < fig.low * (1 - tolerance):
        return "slow"
    if value > fig.high * (1 + tolerance):
        return "fast"
    return "ok"


def check(
    paths: Iterable[str | Path], ref: Reference, tolerance: float, allow_other: bool
) -> tuple[list[dict[str, Any]], list[str]]:
    """(one row per run, the environment differences) against ``ref``."""
    points = {_key(p.workload, p.layout): p for p in ref.points}
    rows: list[dict[str, Any]] = []
    differences: set[str] = set()
    for run_dir, row in _timed_rows(paths):
        wid, words = workload(run_dir)
        point = points.get(_key(wid, _layout(row)))
        out = {"run": str(run_dir), "workload": words, **_layout(row)}
        out["throughput"] = row["throughput"]
        if point is None:
            rows.append({**out, "reference": None, "ratio": None, "verdict": "no reference"})
            continue
        env, _ = environment(run_dir)
        for k, v in env.items():
            if v != ref.environment.get(k):
                differences.add(f"{k}: {ref.environment.get(k)!r} (reference) != {v!r}")
        fig = point.throughput
        ratio = row["throughput"] / fig.median
        rows.append(
            {**out, "reference": fig.median, "ratio": ratio,
             "verdict": verdict(row["throughput"], fig, tolerance)}
        )  # fmt: skip
    if differences and not allow_other:
        raise UsageError(
            f"the runs' environment differs from {ref.site}'s reference: "
            + "; ".join(sorted(differences))
            + " (--allow-other-environment compares anyway)"
        )
    return rows, sorted(differences)


def cmd_check(args: argparse.Namespace) -> int:
    if not 0 <= args.tolerance < 1:
        raise UsageError(f"--tolerance: {args.tolerance} must be in [0, 1)")
    ref = load_reference(args.reference)
    rows, differences = check(args.results, ref, args.tolerance, args.allow_other_environment)
    for line in differences:
        print(f"scalelab site check: environment differs: {line}", file=sys.stderr)
    _print_table(rows, ref, args.tolerance)
    if args.csv:
        import pandas as pd

        atomic_write_text(args.csv, pd.DataFrame(rows).to_csv(index=False))
    off = [r for r in rows if r["verdict"] in ("slow", "fast")]
    unmatched = sum(r["verdict"] == "no reference" for r in rows)
    if unmatched == len(rows):
        raise UsageError(f"{args.reference}: none of the {len(rows)} run(s) has a reference point")
    if off:
        raise CheckFailed(
            f"{len(off)} of {len(rows)} run(s) outside {ref.site}'s reference by more than "
            f"{args.tolerance:.0%}: "
            + ", ".join(f"{Path(r['run']).name} {r['verdict']} x{r['ratio']:.2f}" for r in off)
        )
    print(f"all {len(rows) - unmatched} matched run(s) within {ref.site}'s reference")
    return 0


def _print_table(rows: list[dict[str, Any]], ref: Reference, tolerance: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"against site {ref.site} ({ref.recorded_at}), tolerance {tolerance:.0%}")
    for title in ("run", "backend", "nodes", "ranks", "samples/s", "reference", "ratio", "verdict"):
        table.add_column(title, overflow="fold")
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        refv = "-" if r["reference"] is None else f"{r['reference']:.4g}"
        table.add_row(
            Path(r["run"]).name, str(r["backend"]), str(r["nodes"]), str(r["ranks"]),
            f"{r['throughput']:.4g}", refv, ratio, r["verdict"],
        )  # fmt: skip
    Console(width=None if sys.stdout.isatty() else 160).print(table)
