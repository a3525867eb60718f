"""``scalelab data``: stage a dataset into shards, verify it, localize it.

    scalelab data stage --source digits --out data/digits
    scalelab data verify data/digits
    DATA=$(scalelab data localize data/digits --scratch "$SLURM_TMPDIR")

The spellings of the previous release (``scalelab stage [OPTIONS]``, ``scalelab stage
verify``, ``scalelab stage localize``) still work for one release: they run the same
code and print one deprecation line on stderr naming the new spelling.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from scalelab.data import kinds
from scalelab.errors import UsageError
from scalelab.units import check_seconds, parse_size

EPILOG = """\
examples:
  scalelab data stage --source digits --out data/digits
  scalelab data stage --source synthetic --num-samples 50000 --image-size 64 64 --out data/syn
  scalelab data stage --source imagefolder --path /shared/imagenet200/train \\
                      --image-size 224 224 --shards 64 --out /shared/staged/in200
  scalelab data stage --source npz --path arrays.npz --split 0.9,0.1,0 --out data/mine
  scalelab data verify data/digits
  DATA=$(srun --ntasks-per-node=1 scalelab data localize /shared/staged/in200)

The output format (shards, index.json, manifest.json) is described in docs/data-format.md.
"""

STAGE_HELP = "stage a dataset into verified shards"
STAGE_DESCRIPTION = (
    "Split a dataset (deterministically, by seed and fractions) and write it as "
    "checksummed, memory-mappable shards with an index and a sha256 manifest. "
    "The output directory appears only when complete."
)
VERIFY_HELP = "check every checksum and the index; the error names the bad file"
VERIFY_DESCRIPTION = (
    "Check every file of a staged dataset against its manifest (size, sha256) and the "
    "index against the shards. Exit 0 if intact, 1 naming the bad file, 2 when DATA_DIR "
    "is not a dataset."
)
LOCALIZE_HELP = "copy DATA_DIR to node-local scratch once per node; print the path to read from"
LOCALIZE_DESCRIPTION = (
    "Copy a staged dataset to node-local scratch (once per node: concurrent callers wait "
    "for one copy), verify the copy, and print the directory to read from. Uses DATA_DIR in "
    "place when it is already under scratch, and falls back to DATA_DIR with a warning when "
    "scratch lacks space. Scratch is --scratch, else $SCALELAB_SCRATCH, $SLURM_TMPDIR, "
    "$TMPDIR, /tmp."
)


def register(subparsers: Any) -> None:
    """Add the ``data`` group (stage, verify, localize) and the deprecated ``stage`` spellings."""
    p = subparsers.add_parser(
        "data",
        help="stage a dataset into verified shards; verify or localize staged data",
        description="Stage a dataset into checksummed shards, verify a staged dataset, or "
        "copy it to node-local scratch.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="data_action", metavar="ACTION", required=True)
    _stage_options(
        actions.add_parser(
            "stage",
            help=STAGE_HELP,
            description=STAGE_DESCRIPTION,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    ).set_defaults(func=cmd_stage)
    _verify_options(
        actions.add_parser("verify", help=VERIFY_HELP, description=VERIFY_DESCRIPTION)
    ).set_defaults(func=cmd_verify)
    _localize_options(
        actions.add_parser(
            "localize",
            help=LOCALIZE_HELP,
            description=LOCALIZE_DESCRIPTION,
        )
    ).set_defaults(func=cmd_localize)
    _register_deprecated_stage(subparsers)


def _register_deprecated_stage(subparsers: Any) -> None:
    """The previous release's ``stage [OPTIONS] | stage verify | stage localize``."""
    p = _stage_options(
        subparsers.add_parser(
            "stage",
            help="deprecated spelling of `scalelab data stage|verify|localize`",
            description=STAGE_DESCRIPTION + " Deprecated: use `scalelab data stage`; "
            "`stage verify` and `stage localize` are `scalelab data verify|localize`.",
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    p.set_defaults(func=cmd_deprecated_stage, stage_action=None)
    actions = p.add_subparsers(
        dest="stage_action", title="actions on a staged DATA_DIR", metavar="{verify,localize}"
    )
    _verify_options(actions.add_parser("verify", help=VERIFY_HELP, description=VERIFY_DESCRIPTION))
    _localize_options(
        actions.add_parser("localize", help=LOCALIZE_HELP, description=LOCALIZE_DESCRIPTION)
    )


def _stage_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    src = p.add_argument_group("source")
    src.add_argument("--source", choices=list(kinds.STAGE_KINDS), help="where the images come from")
    src.add_argument(
        "--path",
        type=Path,
        metavar="SRC",
        help="imagefolder: ROOT/CLASS/IMAGE directory; npz: the .npz file",
    )
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, metavar="DATA_DIR", help="dataset directory to create")
    out.add_argument(
        "--seed", type=int, default=0, help="seed of the split and of synthetic data (default: 0)"
    )
    out.add_argument(
        "--split",
        default="0.8,0.1,0.1",
        metavar="TRAIN,VAL,TEST",
        help="split fractions, summing to 1 (default: 0.8,0.1,0.1)",
    )
    out.add_argument(
        "--shards",
        type=int,
        metavar="N",
        help="number of shards over all splits (default: about 256 MiB each)",
    )
    out.add_argument("--force", action="store_true", help="replace DATA_DIR if it exists")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    img = p.add_argument_group("images")
    img.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="imagefolder: resize to H W (default 224 224); synthetic: image size (default 32 32)",
    )
    img.add_argument(
        "--channels",
        type=int,
        default=3,
        choices=[1, 3],
        help="imagefolder/synthetic: 1 = grayscale, 3 = RGB (default: 3)",
    )
    img.add_argument(
        "--resize",
        choices=["crop", "stretch"],
        default="crop",
        help="imagefolder: center-crop to the aspect ratio, or stretch (default: crop)",
    )
    img.add_argument(
        "--max-bad",
        default="0.1%",
        metavar="N|P%",
        help="imagefolder: unreadable images to skip before failing, a count or "
        "a percentage of all files (default: 0.1%%)",
    )
    img.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="imagefolder: decoding processes (default: usable CPUs, at most 16)",
    )
    img.add_argument(
        "--layout",
        choices=["auto", "nchw", "nhwc"],
        default="auto",
        help="npz: axis order of 4-D image arrays (default: auto)",
    )
    syn = p.add_argument_group(kinds.STAGE_SYNTHETIC)
    syn.add_argument(
        "--num-samples",
        type=int,
        default=10000,
        metavar="N",
        help="number of images (default: 10000)",
    )
    syn.add_argument(
        "--num-classes", type=int, default=10, metavar="K", help="number of classes (default: 10)"
    )
    return p


def _verify_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    p.add_argument("--quick", action="store_true", help="check sizes and index only, no hashing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--json", action="store_true", help="print the verdict as one JSON document on stdout"
    )
    return p


def _localize_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    p.add_argument("--scratch", type=Path, metavar="DIR", help="node-local scratch directory")
    p.add_argument(
        "--reserve",
        default="1GiB",
        metavar="SIZE",
        help="free space to leave on scratch, e.g. 500MiB, 2GiB, 0 (default: 1GiB)",
    )
    p.add_argument(
        "--lock-timeout",
        type=float,
        default=4 * 3600.0,
        metavar="SECONDS",
        help="how long to wait for another rank's copy (default: 14400)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def cmd_deprecated_stage(args: argparse.Namespace) -> int:
    """``scalelab stage ...``: say the new spelling once, then run it unchanged."""
    action = args.stage_action or "stage"
    print(
        f"scalelab stage: warning: `scalelab stage{'' if action == 'stage' else ' ' + action}` "
        f"is deprecated and goes in the next release; use `scalelab data {action}`",
        file=sys.stderr,
        flush=True,
    )
    if args.stage_action and (args.source or args.out or args.path):
        raise UsageError(
            f"--source/--path/--out do not apply to '{args.stage_action}' "
            "(it takes a staged DATA_DIR)"
        )
    return {"stage": cmd_stage, "verify": cmd_verify, "localize": cmd_localize}[action](args)


def cmd_stage(args: argparse.Namespace) -> int:
    from scalelab.data.stage import StageConfig, run_and_report

    _setup_logging(args)
    if args.source is None or args.out is None:
        raise UsageError("--source and --out are required to stage (see --help)")
    image_size = tuple(args.image_size) if args.image_size else None
    cfg = StageConfig(
        source=args.source,
        out=args.out,
        path=args.path,
        seed=args.seed,
        split=args.split,
        shards=args.shards,
        image_size=image_size,
        channels=args.channels,
        num_classes=args.num_classes,
        num_samples=args.num_samples,
        max_bad=args.max_bad,
        resize=args.resize,
        layout=args.layout,
        workers=args.workers,
        force=args.force,
        progress=False if args.quiet else None,
    )
    with _sigterm_as_exit():
        run_and_report(cfg)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """The verdict as a line (``OK DATA_DIR: ...``) or, with --json, one JSON document.

    A failed check raises: the one error line on stderr, and with --json the entry
    point prints the failed verdict (with every problem found) on stdout.
    """
    from scalelab.data.verify import verify_dataset

    _setup_logging(args)
    report = verify_dataset(
        args.data_dir,
        hash_contents=not args.quick,
        progress=False if args.quiet or args.json else None,
    )
    print(json.dumps(report.as_verdict()) if args.json else report.summary())
    return 0


def cmd_localize(args: argparse.Namespace) -> int:
    from scalelab.data.nodelocal import localize

    _setup_logging(args)
    reserve = parse_size(args.reserve, "--reserve", minimum=0)
    check_seconds(args.lock_timeout, "--lock-timeout")
    path = localize(
        args.data_dir,
        args.scratch,
        reserve_bytes=reserve,
        lock_timeout=args.lock_timeout,
        progress=False if args.quiet else None,
    )
    print(path)
    return 0


def _setup_logging(args: argparse.Namespace) -> None:
    """Info lines on stderr (stdout stays machine-readable), unless the app configured logging."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        command = getattr(args, "scalelab_command", None) or "data"
        handler.setFormatter(logging.Formatter(f"scalelab {command}: %(message)s"))
        root.addHandler(handler)
    logging.getLogger("scalelab.data").setLevel(logging.INFO)


class _sigterm_as_exit:  # noqa: N801 - used like a function
    """Turn SIGTERM (scancel, Snakemake abort) into SystemExit so staging cleans up."""

    def __enter__(self) -> None:
        self._old = None
        try:
            self._old = signal.signal(signal.SIGTERM, _raise_exit)
        except ValueError:  # not the main thread
            self._old = None

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
