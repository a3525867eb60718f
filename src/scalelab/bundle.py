"""``scalelab export STUDY --out BUNDLE`` and ``scalelab import BUNDLE``: share a study.

A bundle is a directory a collaborator can copy, tar or rsync. It holds the workflow
(Snakefile, workflow/, config/, profiles/ ...), the environment locks (envs/), scalelab
itself as a wheel (it is not on PyPI), the results with every run's provenance.json,
the report, the images' references with their sha256 (the .sif itself with ``--image``),
and ``bundle.json``: the sha256 and size of every file (an inventory in the spirit of
Ramble's archives), also written as ``SHA256SUMS`` for ``sha256sum -c``, whose last line
is the sha256 of ``bundle.json`` itself: the inventory covers itself, and a changed byte
in either file is found. (This proves integrity, not origin: the bundle is not signed.)
The bundle's own ``setup.sh`` (bash and coreutils only) checks SHA256SUMS, builds a venv
from the lock, installs the bundled wheel and imports the study: a collaborator needs
nothing but Python 3.11+ to rerun it.

``import`` verifies every file against the inventory before it writes anything, names
each file that does not match (changed, missing, or not in the inventory), and then
lays the study out in a new directory, ready to rerun (README: "Sharing a study"). The
paths bundle.json names (``study``, ``results``) must lie inside the bundle: relative,
no ``..``, no symbolic link on the way.

Exit codes: 0 ok; 1 a file of the bundle does not match its checksum; 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scalelab import __version__, docload, sysfacts
from scalelab.errors import CheckFailed, UsageError, environment_cause
from scalelab.fsio import atomic_write_text, sha256_file
from scalelab.output_guard import atomic_dir
from scalelab.rundir import RunDir

FORMAT = "scalelab-bundle"
VERSION = 2  # 2: SHA256SUMS ends with the sha256 of bundle.json
INVENTORY = "bundle.json"
SUMS = "SHA256SUMS"
#: What a study directory holds besides results: the workflow as a user runs it.
WORKFLOW_ITEMS = ("Snakefile", "workflow", "config", "profiles", "slurm", ".test")
#: Environment files (from the scalelab checkout) that let the collaborator rebuild the venv.
ENV_FILES = (
    "requirements.txt",
    "lock-cpu.txt",
    "lock-pypi.txt",
    "lock-horovod.txt",
    "build_horovod.sh",
    "patch_horovod.sh",
    "python_env.sh",
)
#: The bundle's own ``setup.sh`` (a collaborator with nothing installed runs it), from this
#: template: ``@NAME@`` placeholders take this module's file names and the wheel's path.
SETUP = "setup.sh"
SETUP_TEMPLATE = Path(__file__).with_name("bundle_setup.sh.tmpl")
#: Written by output_guard.atomic_dir in every output directory; not part of the inventory.
SKIP = {INVENTORY, SUMS, ".scalelab-output.json"}


def register(sub: argparse._SubParsersAction) -> None:
    doc = (__doc__ or "").split("\n\n")
    e = sub.add_parser(
        "export",
        help="bundle a study (workflow, lock, scalelab, results, "
        "manifests) under a sha256 inventory",
        description=" ".join(doc[1:3]).replace("\n", " "),
        epilog=doc[-1],
    )
    e.add_argument(
        "study",
        type=Path,
        metavar="STUDY",
        help="the study's working directory (where Snakefile and results/ are)",
    )
    e.add_argument(
        "--out", type=Path, required=True, metavar="BUNDLE", help="bundle directory to create"
    )
    e.add_argument(
        "--results",
        default="results",
        metavar="DIR",
        help="results directory inside STUDY (default: results)",
    )
    e.add_argument(
        "--image",
        action="store_true",
        help="also copy the images the runs used (.sif, checked by sha256)",
    )
    e.set_defaults(func=cmd_export)

    i = sub.add_parser(
        "import",
        help="verify a bundle file by file and lay out the study",
        description=doc[2].replace("\n", " "),
        epilog=doc[-1],
    )
    i.add_argument("bundle", type=Path, metavar="BUNDLE")
    i.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="new study directory (default: ./<bundle name>-study)",
    )
    i.add_argument("--check", action="store_true", help="verify only, write nothing")
    i.add_argument(
        "--allow-yte",
        action="store_true",
        help="accept config files that turn on __use_yte__ (Snakemake runs the "
        "Python in them); refused without it",
    )
    i.set_defaults(func=cmd_import)


# ----------------------------------------------------------------------------- export


class _EnvironmentFailed(Exception):
    """Carries a full disk (or another environment OSError) out of shutil.copytree, which
    would otherwise collect it as text into shutil.Error and lose its errno (exit 2)."""


def _copy_file(src: str, dst: str) -> str:
    """copytree's copy function: the first full disk ends the copy as itself (exit 1)."""

    try:
        return shutil.copy2(src, dst)
    except OSError as exc:
        if environment_cause(exc) is not None:
            raise _EnvironmentFailed(exc) from exc
        raise


def _copy(src: Path, dst: Path) -> None:
    """Copy a file or tree, following links (the bundle must stand alone)."""
    if src.is_dir():
        try:
            shutil.copytree(
                src,
                dst,
                symlinks=False,
                copy_function=_copy_file,
                ignore=shutil.ignore_patterns("__pycache__", ".snakemake", "*.lock"),
            )
        except _EnvironmentFailed as exc:
            raise exc.args[0] from None
        except shutil.Error as exc:  # e.g. a dangling symbolic link in the study
            first = exc.args[0][0] if exc.args and exc.args[0] else ("?", "?", str(exc))
            raise UsageError(f"{first[0]}: cannot be copied ({first[2]})") from None
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def _scalelab_source() -> Path:
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise UsageError(
            "export: scalelab is not imported from a source checkout; "
            "cannot build its wheel for the bundle"
        )
    return root


def _build_wheel(dest: Path) -> Path:
    """scalelab as a wheel (it is not on PyPI): pip wheel of the checkout it runs from."""
    dest.mkdir(parents=True, exist_ok=True)
    src = _scalelab_source()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(dest),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    wheels = sorted(dest.glob("scalelab-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise CheckFailed(
            f"export: building the scalelab wheel failed: "
            f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
        )
    return wheels[0]


def _images(results: Path) -> list[dict[str, Any]]:
    """The images named by the runs' container.json / provenance.json, one entry each."""
    seen: dict[str, dict[str, Any]] = {}
    for rec in results.rglob(RunDir.CONTAINER):
        try:
            data = json.loads(rec.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("sha256"):
            seen.setdefault(
                data["sha256"],
                {
                    "image": data.get("image"),
                    "sha256": data["sha256"],
                    "size_bytes": data.get("size_bytes"),
                },
            )
    return list(seen.values())


def _outside(out: Path, source: Path, what: str) -> None:
    """--out may not lie inside what is being copied (it would copy itself)."""
    real, src = out.resolve(), source.resolve()
    if src == real or src in real.parents:
        raise UsageError(
            f"--out {out}: lies inside {what} {source}; the copy would include "
            "itself: write it somewhere else"
        )


def write_setup(dest: Path, wheel: str) -> None:
    """The bundle's setup.sh: bash and coreutils only, so that a collaborator needs no
    scalelab to verify the bundle, install its environment and rerun the study."""
    text = SETUP_TEMPLATE.read_text()
    for key, value in {"SUMS": SUMS, "INVENTORY": INVENTORY, "WHEEL": wheel}.items():
        text = text.replace(f"@{key}@", value)
    if re.search(r"@[A-Z]+@", text):
        raise CheckFailed(f"{SETUP_TEMPLATE}: a placeholder was left unfilled")
    atomic_write_text(dest, text)
    dest.chmod(0o755)


def inventory(root: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {bytes, sha256}} of every file under ``root`` (links refused)."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise UsageError(f"{path}: a symbolic link; bundles hold plain files only")
        if path.is_file() and rel not in SKIP:
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def cmd_export(args: argparse.Namespace) -> int:

    study = args.study
    if not (study / "Snakefile").is_file():
        raise UsageError(f"STUDY {study}: no Snakefile (give the study's working directory)")
    results = study / args.results
    if not results.is_dir():
        raise UsageError(f"--results {results}: no such directory (run the workflow first)")
    _outside(args.out, study, "STUDY")
    images = _images(results)
    started = time.monotonic()
    with atomic_dir(args.out, "bundle", inputs=[study]) as tmp:
        for name in WORKFLOW_ITEMS:
            if (study / name).exists():
                _copy(study / name, tmp / "study" / name)
        _copy(results, tmp / "study" / args.results)
        if (study / "logs").is_dir():
            _copy(study / "logs", tmp / "study" / "logs")
        for report in study.glob("*.html"):
            _copy(report, tmp / "study" / report.name)
        envs = _scalelab_source() / "envs"
        for name in ENV_FILES:
            if (envs / name).is_file():
                _copy(envs / name, tmp / "envs" / name)
        wheel = _build_wheel(tmp / "dist")
        write_setup(tmp / SETUP, wheel.relative_to(tmp).as_posix())
        copied = []
        if args.image:
            for img in images:
                path = Path(img["image"] or "")
                if not path.is_file():
                    raise UsageError(
                        f"--image: {path} (sha256 {img['sha256'][:16]}...) is not a file here"
                    )
                if sha256_file(path) != img["sha256"]:
                    raise CheckFailed(
                        f"--image: {path} no longer has the sha256 the runs "
                        f"recorded ({img['sha256'][:16]}...)"
                    )
                _copy(path, tmp / "images" / path.name)
                copied.append(f"images/{path.name}")
        runs = []
        for man in sorted((tmp / "study" / args.results).rglob(RunDir.PROVENANCE)):
            data = docload.load(man, fmt="json")
            runs.append(
                {
                    "run": man.parent.relative_to(tmp).as_posix(),
                    "provenance_id": data.get("provenance_id"),
                }
            )
        files = inventory(tmp)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "scalelab": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git": sysfacts.git_state(),
            "study": "study",
            "results": args.results,
            "wheel": wheel.relative_to(tmp).as_posix(),
            "images": [
                {**img, "included": f"images/{Path(img['image'] or '').name}" in copied}
                for img in images
            ],
            "runs": runs,
            "algorithm": "sha256",
            "files": files,
        }
        atomic_write_text(tmp / INVENTORY, json.dumps(meta, indent=2) + "\n")
        atomic_write_text(tmp / SUMS, sums_text(files, sha256_file(tmp / INVENTORY)))
    total = sum(f["bytes"] for f in files.values())
    print(
        f"scalelab export: {args.out}: {len(files)} files, {total / 1e6:.1f} MB, "
        f"{len(runs)} run(s), {len(images)} image reference(s) "
        f"({time.monotonic() - started:.1f} s)"
    )
    return 0


# ----------------------------------------------------------------------------- import


def sums_text(files: dict[str, dict[str, Any]], inventory_sha256: str) -> str:
    """SHA256SUMS: every file of the inventory, then bundle.json itself (so each of the
    two files covers the other)."""
    return "".join(f"{f['sha256']}  {rel}\n" for rel, f in files.items()) + (
        f"{inventory_sha256}  {INVENTORY}\n"
    )


def _sums_problems(bundle: Path, files: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong with SHA256SUMS against bundle.json (nothing: an empty list)."""
    sums = bundle / SUMS
    if not sums.is_file() or sums.is_symlink():
        return [f"{SUMS}: missing (it holds the sha256 of {INVENTORY})"]
    actual = sha256_file(bundle / INVENTORY)
    lines = sums.read_bytes().decode(errors="replace").splitlines()
    recorded = lines[-1].split("  ", 1) if lines else []
    if recorded[1:] != [INVENTORY]:
        return [
            f"{SUMS}: does not end with the sha256 of {INVENTORY} (made by an older "
            "scalelab, or edited: export the study again)"
        ]
    if recorded[0] != actual:
        return [f"{INVENTORY}: sha256 mismatch (it was changed after export)"]
    expected = sums_text(files, actual).splitlines()
    for number, (have, want) in enumerate(zip(lines, expected, strict=False), 1):
        if have != want:
            return [f"{SUMS}: line {number} differs from {INVENTORY}'s inventory"]
    if len(lines) != len(expected):
        return [f"{SUMS}: {len(lines)} lines, {INVENTORY} lists {len(expected)}"]
    return []


def inside(bundle: Path, rel: Any, field: str) -> Path:
    """``bundle/rel`` for a directory bundle.json names; CheckFailed unless it lies inside
    the bundle (relative, no ``..``, no symbolic link on the way): a crafted inventory
    must not make import copy host files such as ``/etc/ssh``."""
    where = f"{bundle / INVENTORY}: field '{field}'"
    parts = Path(rel).parts if isinstance(rel, str) and rel else ()
    if not parts or Path(rel).is_absolute() or any(p in ("..", ".") for p in parts):
        raise CheckFailed(f"{where} is {str(rel)[:80]!r}: not a relative path inside the bundle")
    node = bundle
    for part in parts:
        node = node / part
        if node.is_symlink() or not node.is_dir():
            raise CheckFailed(f"{where} is {rel!r}: {node} is not a directory of the bundle")
    return node


def verify(bundle: Path) -> dict[str, Any]:
    """The bundle's inventory, after every file was checked; CheckFailed naming each
    file that is changed, missing, or not listed."""
    path = bundle / INVENTORY
    if not path.is_file():
        raise UsageError(f"{bundle}: not a scalelab bundle ({INVENTORY} missing)")
    meta = docload.load(path, fmt="json", mapping=False, error=CheckFailed)
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT
        or not isinstance(meta.get("files"), dict)
    ):
        raise CheckFailed(f"{path}: not a {FORMAT} inventory")
    bad: list[str] = []
    for rel, entry in sorted(meta["files"].items()):
        file = bundle / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            bad.append(f"{rel}: path leaves the bundle")
        elif not file.is_file() or file.is_symlink():
            bad.append(f"{rel}: missing")
        elif file.stat().st_size != entry.get("bytes"):
            bad.append(f"{rel}: size {file.stat().st_size}, inventory {entry.get('bytes')}")
        elif sha256_file(file) != entry.get("sha256"):
            bad.append(f"{rel}: sha256 mismatch")
    for file in sorted(bundle.rglob("*")):
        rel = file.relative_to(bundle).as_posix()
        if (file.is_file() or file.is_symlink()) and rel not in meta["files"] and rel not in SKIP:
            bad.append(f"{rel}: not in the inventory")
    bad.extend(_sums_problems(bundle, meta["files"]))
    if bad:
        for line in bad:
            print(f"scalelab import: {bundle}/{line}", file=sys.stderr)
        raise CheckFailed(
            f"{bundle}: {len(bad)} file(s) do not match the inventory (first: {bad[0]})"
        )
    inside(bundle, meta.get("study"), "study")
    inside(bundle, f"{meta.get('study')}/{meta.get('results')}", "results")
    return meta


def _mentions(path: Path, needle: bytes) -> bool:
    """Whether the file's bytes contain ``needle`` (mapped, not read: files can be large)."""
    import mmap

    with open(path, "rb") as fh:
        if not path.stat().st_size:
            return False
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mem:
            return mem.find(needle) >= 0


def refuse_yte_configs(bundle: Path, meta: dict[str, Any]) -> None:
    """A shared config that turns on ``__use_yte__`` is code Snakemake runs when it loads
    it: refuse the import of any such YAML/JSON file unless ``--allow-yte``."""
    for rel in sorted(meta["files"]):
        if not rel.endswith((".yaml", ".yml", ".json")):
            continue
        path = bundle / rel
        if not _mentions(path, docload.YTE_KEY.encode()):
            continue
        try:
            doc = docload.load(path)
        except UsageError:  # unreadable as a mapping, yet it names YTE: refuse it too
            doc = {docload.YTE_KEY: True}
        docload.refuse_yte(doc, f"{bundle}/{rel}", "pass --allow-yte if you trust its author")


def cmd_import(args: argparse.Namespace) -> int:

    meta = verify(args.bundle)
    n = len(meta["files"])
    if not args.allow_yte:
        refuse_yte_configs(args.bundle, meta)
    if args.check:
        print(f"scalelab import: {args.bundle}: all {n} files match the inventory")
        return 0
    out = args.out or Path(f"{args.bundle.resolve().name}-study")
    _outside(out, args.bundle, "BUNDLE")
    study = inside(args.bundle, meta["study"], "study")  # checked by verify too
    with atomic_dir(out, "study", inputs=[args.bundle]) as tmp:
        for item in study.iterdir():
            _copy(item, tmp / item.name)
        for extra in ("envs", "dist", "images"):
            if (args.bundle / extra).is_dir():
                _copy(args.bundle / extra, tmp / extra)
        shutil.copy2(args.bundle / INVENTORY, tmp / "bundle.json")
    print(f"scalelab import: {args.bundle}: all {n} files match the inventory; study in {out}")
    print(
        f"  runs: {len(meta.get('runs', []))}; images referenced: "
        + (
            ", ".join(f"{i['image']} ({i['sha256'][:12]})" for i in meta.get("images", []))
            or "none"
        )
    )
    print("  rerun and compare each run (bitwise on CPU in deterministic mode):")
    results = shlex.quote(str(meta["results"]))
    # The loop runs in a subshell: the first run that does not reproduce stops it with a
    # failing status (a bare `|| break` ended with status 0), and a pasted line cannot
    # close the user's shell. The bundle's setup.sh writes this last line into rerun.sh.
    print(
        f"    cd {shlex.quote(str(out))} && (for run in {results}/runs/*/; do "
        'scalelab reproduce "$run" || exit 1; done)'
    )
    return 0
