"""Render the definition files from containers/recipe.py through hpccm.

hpccm renders the recipe exactly as ``hpccm --recipe containers/recipe.py
--format singularity --singularity-version 3.2`` does (multi-stage needs the
3.2 format), so the committed files can be checked against either.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from scalelab.container.lock import read_lock
from scalelab.errors import UsageError
from scalelab.fsio import atomic_write_text

#: The committed files and the user arguments that produce them. The recipe makes the
#: GPU image only; the CPU image is a debootstrap build of its own (containers/cpu/).
DEFAULT_IMAGES: dict[str, dict[str, str]] = {
    "scalelab-gpu.def": {},
}
SINGULARITY_VERSION = "3.2"

#: First line of a file written by ``generate --out FILE``: the sha256 of the rest shows
#: an unedited earlier output, the only existing file --out replaces.
STAMP = "# scalelab container generate: sha256 "


def find_containers_dir(start: str | Path | None = None) -> Path:
    """The repository's containers/ directory: above the cwd, else beside this package."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "containers" / "recipe.py").is_file():
            return d / "containers"
    pkg_root = Path(__file__).resolve().parents[3]
    if (pkg_root / "containers" / "recipe.py").is_file():
        return pkg_root / "containers"
    raise UsageError(
        "containers/recipe.py not found: run from the scalelab repository or pass --recipe"
    )


def render(recipe: str | Path, userarg: Mapping[str, str] | None = None) -> str:
    """The definition file text for these user arguments (ends with a newline)."""
    import hpccm
    from hpccm.common import container_type

    path = Path(recipe)
    if not path.is_file():
        raise UsageError(f"recipe not found: {path}")
    args = {str(k): str(v) for k, v in (userarg or {}).items()}
    if "lock" in args:  # the recipe reads it as a lock mapping: anything else, one line
        read_lock(args["lock"])
    try:
        text = hpccm.recipe(
            str(path),
            ctype=container_type.SINGULARITY,
            singularity_version=SINGULARITY_VERSION,
            userarg=args,
            raise_exceptions=True,
        )
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    return text + "\n"


def stamped(text: str) -> str:
    """``text`` behind the :data:`STAMP` line that lets a later --out recognise it."""
    return f"{STAMP}{hashlib.sha256(text.encode()).hexdigest()}\n{text}"


def is_generated(path: Path) -> bool:
    """Whether ``path`` is an earlier ``generate --out``, unedited (its stamp matches)."""
    try:
        first, _, rest = path.read_text(encoding="utf-8").partition("\n")
    except (OSError, UnicodeDecodeError):
        return False
    return first == f"{STAMP}{hashlib.sha256(rest.encode()).hexdigest()}"


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers never see half of it."""
    atomic_write_text(path, text)


def generate_defaults(containers: Path, check: bool = False) -> list[str]:
    """Write (or with check: compare) the committed .def files; return the stale ones."""
    stale = []
    for name, args in DEFAULT_IMAGES.items():
        text = render(containers / "recipe.py", args)
        target = containers / name
        if target.is_file() and target.read_text() == text:
            continue
        stale.append(name)
        if not check:
            write_atomic(target, text)
    return stale
