"""Is this the image we pinned? sha256 of the .sif file, and its signatures.

The sha256 is of the file as it lies on disk (what `sha256sum IMAGE` prints),
so a pin taken on a workstation holds on the cluster after a copy. Signatures
are checked with `apptainer verify`: with trusted keys (``container.trusted_keys``, PEM
public keys) the image must carry signatures by one of them, and this module is the one
place that rule is written (``container verify``, ``container pull`` and the workflow's
check before any job all ask :func:`check_trusted_signature`); without keys, the PGP
signatures an image may carry.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scalelab.container import runtime
from scalelab.errors import CheckFailed, UsageError
from scalelab.fsio import atomic_write_text, sha256_file

#: Output of `apptainer verify` on an image that simply carries no signature.
UNSIGNED_MARKERS = ("signature not found", "no signatures found", "no signature found")


@dataclass(frozen=True)
class ImagePin:
    """An image hashed by content, and the file identity it had when hashed.

    The workflow hashes the image once per invocation on the submit host (never from
    a cache keyed by size or mtime: a modified image can keep both). Jobs of that
    invocation get this record and check that the file is still the one that was
    hashed (same device, inode, size, mtime and ctime: a write, or restoring the mtime
    after one, moves the ctime, which no user can set), so they run exactly that
    digest without hashing gigabytes again in every job.
    """

    image: str
    sha256: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int
    hashed_at: str
    signed_by: str | None = None
    """The trusted public key whose signature the image carries (None: none asked for)."""

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def pin_image(image: str | Path, pinned: str | None = None) -> ImagePin:
    """Hash the image by content; UsageError when it differs from a given pin."""
    p = runtime.check_image_file(str(image))
    before = p.stat()
    digest = sha256_file(p)
    after = p.stat()
    if (before.st_mtime_ns, before.st_ctime_ns, before.st_size, before.st_ino) != (
        after.st_mtime_ns,
        after.st_ctime_ns,
        after.st_size,
        after.st_ino,
    ):
        raise UsageError(f"{image}: the image changed while it was being hashed")
    if pinned and digest != pinned.lower().removeprefix("sha256:"):
        raise UsageError(f"sha256 mismatch for {image}: pinned {pinned}, file has {digest}")
    return ImagePin(
        image=str(p.resolve()),
        sha256=digest,
        size=after.st_size,
        mtime_ns=after.st_mtime_ns,
        ctime_ns=after.st_ctime_ns,
        inode=after.st_ino,
        device=after.st_dev,
        hashed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def check_pinned_file(pin: ImagePin, image: str | Path) -> None:
    """The job's image must be the very file the submit host hashed (no re-hash)."""
    p = runtime.check_image_file(str(image))
    st = p.stat()
    now = (str(p.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    then = (pin.image, pin.device, pin.inode, pin.size, pin.mtime_ns, pin.ctime_ns)
    if now != then:
        raise UsageError(
            f"{image}: changed since the submit host hashed it at {pin.hashed_at} "
            f"(sha256 {pin.sha256}); rerun the workflow to hash it again"
        )


def write_pin(path: str | Path, pin: ImagePin) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps(pin.as_dict(), indent=2) + "\n")


def read_pin(path: str | Path) -> ImagePin | None:
    """The record a submit host wrote, or None when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
        fields = [k for k in ImagePin.__dataclass_fields__ if k != "signed_by"]
        return ImagePin(**{k: data[k] for k in fields}, signed_by=data.get("signed_by"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
        raise UsageError(
            f"no pinned sha256 for {image}: set container.sha256: {actual} "
            "(or pass --sha256) after checking the image"
        )
    pinned = pinned.lower().removeprefix("sha256:")
    if actual != pinned:
        error = CheckFailed(f"sha256 mismatch for {image}: pinned {pinned}, file has {actual}")
        error.details = {"image": image, "pinned": pinned, "sha256": actual}  # for --json
        raise error
    return actual


def check_signature(rt: runtime.Runtime, image: str, require: bool) -> str:
    """Run `apptainer verify`; an unsigned image passes unless a signature is required."""
    argv = runtime.verify_argv(rt.name, image)
    try:
        proc = subprocess.run(
            [rt.path, *argv[1:]], capture_output=True, text=True, timeout=600, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"{' '.join(argv)} failed: {exc}") from None
    if proc.returncode == 0:
        return "verified"
    out = (proc.stdout + proc.stderr).strip()
    if any(m in out.lower() for m in UNSIGNED_MARKERS) and not require:
        return "unsigned"
    last = out.splitlines()[-1] if out else f"exit {proc.returncode}"
    raise CheckFailed(f"signature check failed for {image}: {last}")


def trusted_key_files(keys: Sequence[str], where: str = "container.trusted_keys") -> list[str]:
    """Each trusted key, checked to be a readable PEM public key; a private key is refused
    by name (it must never be handed out)."""
    out = []
    for i, key in enumerate(keys):
        try:
            text = Path(key).read_text(errors="replace")
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
            raise UsageError(
                f"{where}[{i}]: {key!r}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        if "PRIVATE KEY" in text:
            raise UsageError(
                f"{where}[{i}]: {key} is a private key: list public keys "
                "(openssl pkey -in PRIVATE.pem -pubout -out PUBLIC.pem)"
            )
        if "-----BEGIN PUBLIC KEY-----" not in text:
            raise UsageError(f"{where}[{i}]: {key} is not a PEM public key")
        out.append(key)
    return out


def _refusal(reasons: list[str]) -> str:
    """Why no trusted key verified the image, from `apptainer verify --key`'s last lines."""
    low = [r.lower() for r in reasons]
    if all(any(m in r for m in UNSIGNED_MARKERS) for r in low):
        return "it is not signed"
    if all("verify envelope failed" in r for r in low):
        return "it is signed, but by none of the trusted keys"
    return f"apptainer verify: {reasons[-1]}"


def check_trusted_signature(
    rt: runtime.Runtime,
    image: str | Path,
    keys: Sequence[str],
    *,
    name: str | None = None,
    where: str = "container.trusted_keys",
) -> str:
    """The trusted key that signed ``image`` (the first whose `apptainer verify --key`
    passes); CheckFailed in one line naming the image (or ``name``) and the keys."""
    files = trusted_key_files(keys, where)
    if not files:
        raise UsageError(f"{where}: no trusted public key given")
    reasons = []
    for key in files:
        argv = runtime.verify_argv(rt.name, str(image), key)
        try:
            proc = subprocess.run(
                [rt.path, *argv[1:]], capture_output=True, text=True, timeout=600, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UsageError(f"{' '.join(argv)} failed: {exc}") from None
        if proc.returncode == 0:
            return key
        reasons.append(runtime.last_line(proc.stdout + proc.stderr, proc.returncode))
    raise CheckFailed(
        f"signature refused for {name or image}: {_refusal(reasons)} "
        f"(trusted keys: {', '.join(files)})"
    )


def verify(
    image: str,
    pinned: str | None,
    *,
    rt: runtime.Runtime | None,
    signature: str = "auto",
    keys: Sequence[str] = (),
) -> VerifyResult:
    """sha256 against the pin, then signatures: by one of ``keys`` when given, else auto
    (if signed), require, or skip."""
    if signature not in ("auto", "require", "skip"):
        raise UsageError(f"signature mode must be auto, require or skip, got {signature!r}")
    if keys and signature == "skip":
        raise UsageError(
            "--signature skip: trusted keys are set (container.trusted_keys or --key), "
            "and an image is accepted only signed by one of them"
        )
    digest = check_sha256(image, pinned)
    if signature == "skip":
        state = "skipped"
    else:
        if rt is None:
            raise UsageError(
                runtime.NOT_FOUND + " (needed to check signatures; "
                "--signature skip checks the sha256 alone)"
            )
        if keys:
            state = f"verified by {check_trusted_signature(rt, image, keys)}"
        else:
            state = check_signature(rt, image, require=signature == "require")
    return VerifyResult(image=image, sha256=digest, signature=state)
