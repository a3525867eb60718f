"""Pull an image and check it before anything can use it.

The one owner of the order, for ``scalelab container pull`` and the workflow's pull once
per study: ``apptainer pull`` into a temporary name beside the destination, the file's
sha256 against the pin, then (with trusted keys) its signature, and only then an atomic
rename onto the destination. A refused image leaves no file behind and the destination
as it was.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from scalelab.container import registry, runtime, verify
from scalelab.errors import CheckFailed, UsageError
from scalelab.fsio import sha256_file
from scalelab.redact import redact_text


@dataclass(frozen=True)
class Pulled:
    """An image in place, checked."""

    image: Path
    sha256: str
    signed_by: str | None
    """The trusted key that verified it; None when no key was asked for."""


def runtime_uri(uri: str, where: str = "pull") -> str:
    """What ``apptainer pull`` gets: an ``oras://`` reference validated (by manifest digest
    when it names one), another scheme as given."""
    if registry.is_oras(uri):
        return registry.parse_ref(uri, where).pull_uri
    if "://" not in uri:
        raise UsageError(
            f"{uri} is not a URI (https://, oras://, docker://, library://); "
            "for an image on a shared path, point container.image at the file"
        )
    return uri


def temp_name(image: Path) -> Path:
    """The temporary file beside ``image`` (same filesystem: the rename is atomic)."""
    return image.with_name(f".{image.name}.pull.{os.getpid()}")


def check_destination(image: Path, pinned: str, force: bool) -> None:
    """An existing destination holding other bytes is replaced only with ``force``."""
    if image.exists() and not force and sha256_file(image) != pinned:
        raise UsageError(
            f"{image} exists and holds a different image than sha256 {pinned}: "
            "refusing to replace it (pass --force, or choose another --image)"
        )


def pull_verified(
    rt: runtime.Runtime,
    uri: str,
    image: str | Path,
    *,
    pinned: str,
    keys: Sequence[str] = (),
    force: bool = False,
    environ: Mapping[str, str] | None = None,
) -> Pulled:
    """Pull ``uri`` onto ``image``: sha256 equal to ``pinned``, then signed by one of
    ``keys`` (when given), before the rename; CheckFailed in one line otherwise."""
    dest = Path(image).resolve()
    source = runtime_uri(uri)
    shown = redact_text(uri)  # an https://user:password@ URI keeps its password to itself
    secrets = [*registry.secrets_for(uri, environ), *filter(None, [urlsplit(uri).password])]
    if keys:
        verify.trusted_key_files(keys)  # a bad key list fails before any download
    check_destination(dest, pinned, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dest)
    argv = runtime.pull_argv(rt.name, str(tmp), source, force=True)
    try:
        status, out = runtime.run_redacted([rt.path, *argv[1:]], secrets)
        if status != 0:
            raise UsageError(f"apptainer pull {shown} failed: {runtime.last_line(out, status)}")
        got = sha256_file(tmp)
        if got != pinned:
            raise CheckFailed(
                f"{shown}: pulled image has sha256 {got}, pinned {pinned}: "
                f"refused ({dest} left as it was)"
            )
        signed_by = verify.check_trusted_signature(rt, tmp, keys, name=shown) if keys else None
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return Pulled(dest, got, signed_by)
