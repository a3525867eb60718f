"""``scalelab predict --advise``: the best (dp, tp, pp, m, v) layout of a GPT on a world
size and a declared hardware profile, and why the others lose.

The flags are added to ``predict``'s parser (:mod:`scalelab.comm.predict_cli`); with
``--advise`` predict needs no commbench curve and no measured run: the hardware profile
(:mod:`scalelab.comm.hardware`) declares the links and the peak, the analytic model
(:mod:`scalelab.comm.layout_model`) predicts each layout, :mod:`scalelab.comm.advisor`
enumerates and ranks them. Output: a Markdown table on stdout, or one JSON document with
``--json``.
"""

from __future__ import annotations

import argparse
import math

from scalelab.comm import advisor
from scalelab.comm.hardware import profile
from scalelab.comm.layout_model import GPTShape
from scalelab.errors import UsageError
from scalelab.models.gpt_shapes import SIZES
from scalelab.units import parse_size

#: Sequence length and vocabulary when only a size is named (GPT-2's).
DEFAULT_SEQ = 1024
DEFAULT_VOCAB = 50257


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The advisor's flags, in their own group of ``predict --help``."""
    g = p.add_argument_group(
        "layout advisor (--advise: no --commbench, --run or --out)",
        "Predict every (dp, tp, pp, micro-batches, virtual stages) layout of a GPT on "
        "--world-size devices of a declared --hardware profile; print the best and why "
        "each of the others loses. --global-batch: sequences per step.",
    )
    g.add_argument("--advise", action="store_true", help="run the layout advisor")
    g.add_argument(
        "--model",
        choices=sorted(SIZES),
        help="GPT size (models/gpt_shapes.py); --layers/--hidden/--heads override it",
    )
    g.add_argument("--layers", type=int, help="transformer layers L")
    g.add_argument("--hidden", type=int, help="hidden size h")
    g.add_argument("--heads", type=int, help="attention heads a")
    g.add_argument("--seq", type=int, help=f"sequence length s (default {DEFAULT_SEQ})")
    g.add_argument("--vocab", type=int, help=f"vocabulary V (default {DEFAULT_VOCAB})")
    g.add_argument("--world-size", type=int, help="devices (ranks) in all")
    g.add_argument(
        "--hardware",
        default="this-machine",
        help="hardware profile of comm/hardware_profiles.yaml (default this-machine; a "
        "wrong name lists them)",
    )
    g.add_argument(
        "--memory-limit",
        help="bytes per device a layout may use, e.g. 40G (default: the profile's memory)",
    )
    g.add_argument(
        "--recompute",
        choices=("auto", "off", "full"),
        default="auto",
        help="activation recomputation: try both (auto), never, or always",
    )
    g.add_argument("--top", type=int, default=12, help="(dp, tp, pp) rows shown (default 12)")
    g.add_argument("--json", action="store_true", help="one JSON document on stdout")


def shape_of(args: argparse.Namespace) -> GPTShape:
    """The GPT the flags describe: a named size, overridden by explicit dimensions."""
    hidden, layers, heads = SIZES[args.model] if args.model else (None, None, None)
    dims = {
        "layers": args.layers if args.layers is not None else layers,
        "hidden": args.hidden if args.hidden is not None else hidden,
        "heads": args.heads if args.heads is not None else heads,
        "seq": args.seq if args.seq is not None else DEFAULT_SEQ,
        "vocab": args.vocab if args.vocab is not None else DEFAULT_VOCAB,
    }
    for name, value in dims.items():
        if value is None:
            raise UsageError(f"--{name}: required without --model")
    return GPTShape(**dims)


#: The advisor's own flags (dest, default): refused without --advise.
ONLY_ADVISE = {
    "model": None,
    "layers": None,
    "hidden": None,
    "heads": None,
    "seq": None,
    "vocab": None,
    "world_size": None,
    "hardware": "this-machine",
    "memory_limit": None,
    "recompute": "auto",
    "top": 12,
    "json": False,
}


def check_not_advising(args: argparse.Namespace) -> None:
    """Without --advise, the advisor's flags are a mistake: one line naming the first."""
    for dest, default in ONLY_ADVISE.items():
        if getattr(args, dest) != default:
            raise UsageError(f"--{dest.replace('_', '-')}: only with --advise")


def run(args: argparse.Namespace) -> int:
    """The advisor's command: check the flags, advise, print."""
    for flag in ("commbench", "run", "out", "measured_csv", "compute_time", "grad_bytes"):
        if getattr(args, flag, None) is not None:
            raise UsageError(f"--{flag.replace('_', '-')}: not used with --advise")
    shape = shape_of(args)
    if args.world_size is None:
        raise UsageError("--world-size: required with --advise")
    batch = _batch(args.global_batch)
    hw = profile(args.hardware)
    limit = parse_size(args.memory_limit, "--memory-limit") if args.memory_limit else None
    if not 1 <= args.top <= 10_000:
        raise UsageError(f"--top: {args.top} must be in [1, 10000]")
    recompute = {"auto": (False, True), "off": (False,), "full": (True,)}[args.recompute]
    advice = advisor.advise(shape, batch, args.world_size, hw, args.hardware, limit, recompute)
    print(advisor.to_json(advice, hw) if args.json else advisor.markdown(advice, hw, args.top))
    return 0


def _batch(value: float | None) -> int:
    """--global-batch as a whole number of sequences."""
    if value is None:
        raise UsageError("--global-batch: required with --advise (sequences per step)")
    if not (math.isfinite(value) and value == int(value) and value >= 1):
        raise UsageError(f"--global-batch: {value} must be a whole number >= 1")
    return int(value)
