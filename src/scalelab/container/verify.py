"""Is this the image we pinned? sha256 of the .sif file, and its signatures.

The sha256 is of the file as it lies on disk (what `sha256sum IMAGE` prints),
so a pin taken on a workstation holds on the cluster after a copy. Signatures
are checked with `apptainer verify` (PGP signatures inside the SIF).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from scalelab.container import runtime
from scalelab.errors import UsageError
from scalelab.fsio import atomic_write_text

CHUNK = 8 * 1024 * 1024
#: Output of `apptainer verify` on an image that simply carries no signature.
UNSIGNED_MARKERS = ("signature not found", "no signatures found", "no signature found")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (images are GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_cached(path: str | Path) -> str:
    """sha256 of an image, remembered in `IMAGE.sha256.json` beside it.

    Jobs record the image digest for provenance; hashing a 10 GB image in every
    job costs a minute, so the value is reused while size and mtime are unchanged.
    `verify` never uses this cache.
    """
    p = Path(path)
    st = p.stat()
    sidecar = p.with_name(p.name + ".sha256.json")
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        cached = json.loads(sidecar.read_text())
        if {k: cached.get(k) for k in key} == key and len(cached.get("sha256", "")) == 64:
            return cached["sha256"]
    except (OSError, ValueError):
        pass
    digest = sha256_file(p)
    with contextlib.suppress(OSError):  # read-only image directory: no cache, same answer
        atomic_write_text(sidecar, json.dumps({**key, "sha256": digest}))
    return digest


@dataclass(frozen=True)
class VerifyResult:
    """What `verify` found."""

    image: str
    sha256: str
    """The file's sha256, equal to the pinned one."""
    signature: str
    """verified | unsigned | skipped."""


def check_sha256(image: str, pinned: str | None) -> str:
    """The image's sha256; UsageError when it is missing, unpinned or different."""
    p = runtime.check_image_file(image)
    actual = sha256_file(p)
    if not pinned:
        raise UsageError(f"no pinned sha256 for {image}: set container.sha256: {actual} "
                         "(or pass --sha256) after checking the image")
    pinned = pinned.lower().removeprefix("sha256:")
    if actual != pinned:
        raise UsageError(f"sha256 mismatch for {image}: pinned {pinned}, file has {actual}")
    return actual


def check_signature(rt: runtime.Runtime, image: str, require: bool) -> str:
    """Run `apptainer verify`; an unsigned image passes unless a signature is required."""
    argv = runtime.verify_argv(rt.name, image)
    try:
        proc = subprocess.run([rt.path, *argv[1:]], capture_output=True, text=True,
                              timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"{' '.join(argv)} failed: {exc}") from None
    if proc.returncode == 0:
        return "verified"
    out = (proc.stdout + proc.stderr).strip()
    if any(m in out.lower() for m in UNSIGNED_MARKERS) and not require:
        return "unsigned"
    last = out.splitlines()[-1] if out else f"exit {proc.returncode}"
    raise UsageError(f"signature check failed for {image}: {last}")


def verify(image: str, pinned: str | None, *, rt: runtime.Runtime | None,
           signature: str = "auto") -> VerifyResult:
    """sha256 against the pin, then signatures: auto (if signed), require, or skip."""
    if signature not in ("auto", "require", "skip"):
        raise UsageError(f"signature mode must be auto, require or skip, got {signature!r}")
    digest = check_sha256(image, pinned)
    if signature == "skip":
        state = "skipped"
    else:
        if rt is None:
            raise UsageError(runtime.NOT_FOUND + " (needed to check signatures; "
                             "--signature skip checks the sha256 alone)")
        state = check_signature(rt, image, require=signature == "require")
    return VerifyResult(image=image, sha256=digest, signature=state)
