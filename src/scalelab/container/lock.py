"""The base-image lock file and resolving digests from a registry.

A digest comes from the registry itself: ``HEAD /v2/<name>/manifests/<tag>``
with the manifest-list/index media types accepted, read from the
``Docker-Content-Digest`` header (Docker Registry HTTP API V2; the OCI
distribution spec keeps it). Registries that want a token answer 401 with a
``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` challenge; an
anonymous token from that realm is enough for public images. The file is
rewritten atomically, so a failed refresh leaves the old pins in place.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from scalelab.errors import UsageError
from scalelab.fsio import atomic_write_text

ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
HEADER = """\
# Base images of the scalelab Apptainer images, pinned by digest.
# Read by containers/recipe.py. Refresh with `scalelab container lock` on a
# machine that reaches the registries; it rewrites this file (and this header).
# A digest is never typed in by hand: it is resolved from the registry, or
# copied from a public source named in `source`.
"""
ENTRY_KEYS = ("ref", "digest", "source", "resolved", "note")


@dataclass(frozen=True)
class ImageRef:
    """registry/repository:tag, with Docker Hub's defaults filled in."""

    registry: str
    repository: str
    tag: str

    @property
    def api_host(self) -> str:
        """Docker Hub's API lives on registry-1.docker.io, not docker.io."""
        return "registry-1.docker.io" if self.registry == "docker.io" else self.registry

    @property
    def manifest_url(self) -> str:
        return f"https://{self.api_host}/v2/{self.repository}/manifests/{self.tag}"

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"


def parse_ref(ref: str) -> ImageRef:
    """Parse `[registry/]repo[:tag]`; a digest or a `latest`/missing tag is refused."""
    if "@" in ref:
        raise UsageError(f"{ref}: give a tag to resolve, not a digest")
    name, tag = ref, ""
    if ":" in ref.rsplit("/", 1)[-1]:
        name, tag = ref.rsplit(":", 1)
    if not tag or tag == "latest":
        raise UsageError(f"{ref}: pin an explicit tag (not latest) to lock")
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = "docker.io", name
    if registry == "docker.io" and "/" not in repository:
        repository = f"library/{repository}"
    if not re.match(r"^[a-z0-9]+([._/-][a-z0-9]+)*$", repository):
        raise UsageError(f"{ref}: {repository!r} is not a valid repository name")
    return ImageRef(registry, repository, tag)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` -> ("bearer", {realm, service, scope})."""
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


def token_url(params: Mapping[str, str]) -> str:
    """The anonymous-token URL a Bearer challenge points to."""
    realm = params.get("realm")
    if not realm or not realm.startswith("https://"):
        raise UsageError(f"registry sent an unusable token realm: {realm!r}")
    query = {k: v for k, v in params.items() if k in ("service", "scope")}
    return realm + ("?" + urllib.parse.urlencode(query) if query else "")


def digest_from_headers(headers: Mapping[str, str], body: bytes | None = None) -> str:
    """Docker-Content-Digest, or the sha256 of the manifest body when a registry omits it."""
    lowered = {k.lower(): v for k, v in headers.items()}
    digest = lowered.get("docker-content-digest", "").strip()
    if not digest and body is not None:
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if not DIGEST_RE.match(digest):
        raise UsageError(f"registry answered without a sha256 digest (got {digest!r})")
    return digest


#: (method, url, headers) -> (status, headers, body). Injected in tests.
Fetch = Callable[[str, str, Mapping[str, str]], tuple[int, Mapping[str, str], bytes]]


def urllib_fetch(
    method: str, url: str, headers: Mapping[str, str], timeout: float = 30
) -> tuple[int, Mapping[str, str], bytes]:
    """One HTTP request with urllib; HTTP errors are answers, not exceptions."""
    req = urllib.request.Request(url, method=method, headers=dict(headers))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (https only)
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read() or b""
    except (urllib.error.URLError, OSError) as exc:
        raise UsageError(
            f"cannot reach {urllib.parse.urlsplit(url).netloc}: {getattr(exc, 'reason', exc)}"
        ) from None


def resolve_digest(ref: str, fetch: Fetch = urllib_fetch) -> str:
    """The registry's current digest for `ref` (a multi-arch tag gives its index digest)."""
    image = parse_ref(ref)
    headers = {"Accept": ACCEPT}
    status, resp_headers, _ = fetch("HEAD", image.manifest_url, headers)
    if status == 401:
        challenge = {k.lower(): v for k, v in resp_headers.items()}.get("www-authenticate", "")
        scheme, params = parse_challenge(challenge)
        if scheme != "bearer":
            raise UsageError(
                f"{ref}: registry wants {scheme or 'unknown'} auth; only anonymous "
                "Bearer tokens are supported (use `skopeo inspect --raw` instead)"
            )
        t_status, _, t_body = fetch("GET", token_url(params), {})
        if t_status != 200:
            raise UsageError(f"{ref}: token request failed with HTTP {t_status}")
        try:
            token_doc = json.loads(t_body)
        except ValueError:
            raise UsageError(f"{ref}: token endpoint did not answer JSON") from None
        token = token_doc.get("token") or token_doc.get("access_token")
        if not token:
            raise UsageError(f"{ref}: token endpoint answered without a token")
        headers["Authorization"] = f"Bearer {token}"
        status, resp_headers, _ = fetch("HEAD", image.manifest_url, headers)
    if status == 404:
        raise UsageError(f"{ref}: no such tag in {image.registry}")
    if status != 200:
        raise UsageError(f"{ref}: registry answered HTTP {status}")
    try:
        return digest_from_headers(resp_headers)
    except UsageError:
        status, resp_headers, body = fetch("GET", image.manifest_url, headers)
        if status != 200:
            raise UsageError(f"{ref}: registry answered HTTP {status} to GET") from None
        return digest_from_headers(resp_headers, body)


# ---- the lock file ---------------------------------------------------------------------


def read_lock(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a lock file, validated."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"lock file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise UsageError(f"{p}: not a lock file (not UTF-8 text, byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if (
        not isinstance(data, dict)
        or data.get("version") != 1
        or not isinstance(data.get("images"), list)
    ):
        raise UsageError(f"{p}: expected `version: 1` and an `images:` list")
    seen: set[str] = set()
    for i, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("ref"), str):
            raise UsageError(f"{p}: images[{i}] needs a `ref`")
        if entry["ref"] in seen:
            raise UsageError(f"{p}: {entry['ref']} is listed twice")
        seen.add(entry["ref"])
        digest = entry.get("digest")
        if digest is not None and not DIGEST_RE.match(str(digest)):
            raise UsageError(f"{p}: {entry['ref']} has a malformed digest {digest!r}")
        unknown = set(entry) - set(ENTRY_KEYS)
        if unknown:
            raise UsageError(f"{p}: {entry['ref']} has unknown key(s) {sorted(unknown)}")
    return data["images"]


def dump_lock(entries: list[Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> str:
    """The canonical text of a lock file (header, keys in a fixed order); `extra`: further
    top-level sections kept as they are (``gpu_image``: what the Debian GPU build installs)."""
    ordered = [{k: e.get(k) for k in ENTRY_KEYS} for e in sorted(entries, key=lambda e: e["ref"])]
    body = yaml.safe_dump(
        {"version": 1, "images": ordered, **(extra or {})}, sort_keys=False, width=90
    )
    return HEADER + body


def write_lock(path: str | Path, entries: list[Mapping[str, Any]]) -> None:
    """Replace the lock file atomically (write a temporary file, then rename); sections other
    than `version` and `images` of the file it replaces are kept."""
    extra: dict[str, Any] = {}
    try:
        old = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        if isinstance(old, dict):
            extra = {k: v for k, v in old.items() if k not in ("version", "images")}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        pass
    atomic_write_text(path, dump_lock(entries, extra))


def refresh(
    path: str | Path,
    *,
    add: list[str] = (),
    only: list[str] = (),
    fetch: Fetch = urllib_fetch,
    now: Callable[[], str] | None = None,
) -> list[tuple[str, str | None, str]]:
    """Resolve the digests of the lock's images (or `only` those), add `add`; write the file.

    Returns (ref, old digest, new digest) for every image resolved. Nothing is
    written unless every resolution succeeds.
    """
    entries = [dict(e) for e in read_lock(path)]
    known = {e["ref"] for e in entries}
    for ref in add:
        parse_ref(ref)
        if ref not in known:
            entries.append({"ref": ref, "digest": None})
            known.add(ref)
    missing = [r for r in only if r not in known]
    if missing:
        raise UsageError(f"{missing[0]} is not in {path} (use --add)")
    stamp = (now or (lambda: _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%MZ")))()
    changes = []
    for entry in entries:
        if only and entry["ref"] not in only:
            continue
        digest = resolve_digest(entry["ref"], fetch)
        changes.append((entry["ref"], entry.get("digest"), digest))
        entry.update(
            digest=digest,
            resolved=stamp,
            note=None,
            source=f"registry: HEAD {parse_ref(entry['ref']).manifest_url}",
        )
    write_lock(path, entries)
    return changes
