"""``scalelab plan CONFIG [--json]``: a study's runs and skipped combinations, without
Snakemake; ``scalelab plan --write-schema``: regenerate workflow/schemas/ from the models.

The config is read by the one document loader and validated like the workflow does
(exit 2 and one line for a bad config, or a study directory outside the safe character
set). ``--json`` prints one document that src/scalelab/schemas/plan.schema.json describes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from scalelab.errors import UsageError
from scalelab.study.config import load, write_schemas
from scalelab.study.files import check_study_dir
from scalelab.study.plan import RunPoint, plan, plan_summary, point_bubble, point_layout


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="list a study's training runs and the combinations it skips, and why",
        description="Validate a workflow config as the workflow does and print its plan: "
        "every training run (sweep point) and every combination of the sweep "
        "lists that cannot exist, with the reason. Nothing is run.",
    )
    p.add_argument("config", nargs="?", metavar="CONFIG", help="workflow config (YAML)")
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON document on stdout (src/scalelab/schemas/plan.schema.json)",
    )
    p.add_argument(
        "--allow-yte",
        action="store_true",
        help="evaluate a config with __use_yte__: true (its code runs: only for "
        "a config you trust)",
    )
    p.add_argument(
        "--write-schema",
        action="store_true",
        help="write workflow/schemas/config.schema.yaml and run.schema.json of "
        "the study in the current directory from the config models",
    )
    p.set_defaults(func=cmd_plan)


def plan_document(path: str, cfg: dict) -> dict:
    """The ``--json`` document of a validated config."""

    return {"ok": True, "config": path, **plan(cfg).as_dict()}


def plan_text(cfg: dict) -> str:
    """The text form: a summary line, the skipped combinations, then every run."""

    lines = [plan_summary(cfg)]
    for point in plan(cfg).points:
        lines.append(
            f"  run {point.run_id}: {point.ranks} rank(s)"
            + (f", tp={point.tp}" if point.tp > 1 else "")
            + _pipeline_words(cfg, point)
        )
    return "\n".join(lines)


def _pipeline_words(cfg: dict, point: RunPoint) -> str:
    """``, pp 2, 1f1b, m 4, bubble 0.25``: the pipeline a point runs (empty without one)."""
    dims = point_layout(cfg, point)
    if dims.pp == 1:
        return ""
    return f", {dims.describe_pipe()}, bubble {point_bubble(cfg, point):.3g}"


def cmd_plan(args: argparse.Namespace) -> int:

    if args.write_schema:
        if args.config:
            raise UsageError(
                "--write-schema takes no CONFIG (it writes the study's workflow/schemas/)"
            )
        for p in write_schemas(Path.cwd()):
            print(p)
        return 0
    if not args.config:
        raise UsageError("give CONFIG, e.g. scalelab plan config/config.yaml")
    check_study_dir(os.getcwd())
    cfg = load(args.config, allow_yte=args.allow_yte)
    if args.json:
        print(json.dumps(plan_document(args.config, cfg), indent=2))
    else:
        print(plan_text(cfg))
    return 0
