"""Helpers shared by the data-staging tests (not collected: no test_ prefix)."""

from __future__ import annotations

import io
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np

#: distinct, saturated colors: a resized solid image keeps its class color exactly
CLASS_COLORS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "eel": (30, 30, 200)}


def run_cli(*argv: object) -> tuple[int, str, str]:
    """Run ``scalelab ARGV`` in-process with only the stage command registered.

    The real entry point (scalelab.cli.main), so error formatting and exit
    codes are the user's; other commands are left out so these tests do not
    depend on the rest of the CLI.
    """
    import scalelab.cli as cli

    saved = cli.COMMAND_MODULES
    cli.COMMAND_MODULES = ["scalelab.data.cli"]
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                rc = cli.main([str(a) for a in argv])
            except SystemExit as exc:  # argparse errors
                rc = exc.code if isinstance(exc.code, int) else 1
    finally:
        cli.COMMAND_MODULES = saved
    return rc, out.getvalue(), err.getvalue()


def make_imagefolder(root: Path, counts: dict[str, int], *, seed: int = 0) -> Path:
    """Class folders of solid-color images of assorted sizes and formats.

    Every image of class ``c`` is filled with CLASS_COLORS[c] (so the label can
    be checked from the pixels after resizing), sizes vary so resizing and
    cropping are exercised, and a few are grayscale-with-alpha or JPEG.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for cls, n in counts.items():
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = int(rng.integers(12, 40)), int(rng.integers(12, 40))
            img = Image.new("RGB", (w, h), CLASS_COLORS[cls])
            if i % 5 == 3:
                img.convert("RGBA").save(d / f"img{i:03d}.png")
            elif i % 5 == 4:
                img.save(d / f"img{i:03d}.JPG", quality=95)
            else:
                img.save(d / f"img{i:03d}.png")
        (d / "notes.txt").write_text("not an image: ignored\n")
    return root


def leftovers(out: Path) -> list[str]:
    """Anything that staging into ``out`` left behind (the dir or hidden siblings)."""
    found = [p.name for p in out.parent.glob(f".{out.name}.*")]
    if out.exists():
        found.append(out.name)
    return found


def stage_digits(dest: Path, **kw: object) -> Path:
    from scalelab.data.stage import StageConfig, stage

    stage(StageConfig("digits", dest, progress=False, **kw))  # type: ignore[arg-type]
    return dest


def copy_dataset(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def flip_byte(path: Path, offset: int = -1) -> None:
    """Alter one byte in place, keeping the size."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, nbytes: int = 7) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-nbytes])
