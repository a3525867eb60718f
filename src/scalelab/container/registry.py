"""Images in an OCI registry: ``oras://`` references, Apptainer's login store, the manifest
digest, and ``apptainer push``.

Two digests name an image pushed with ORAS (``apptainer push IMAGE oras://HOST/NAME:TAG``):

* the SIF file's sha256 (``sha256sum IMAGE``): what ``container.sha256`` pins, and the
  digest of the one layer of the manifest;
* the manifest's digest (``oras://HOST/NAME@sha256:...``): the sha256 of the manifest's
  JSON, which names the layer by the first digest. The registry answers it in
  ``Docker-Content-Digest``; ``scalelab container push`` prints it.

Signing adds a signature object to the SIF, so it changes both: pin after signing.

Credentials come only from Apptainer's own login store (``apptainer registry login``),
found as Apptainer 1.4 finds it: ``$APPTAINER_CONFIGDIR/docker-config.json`` (default
``~/.apptainer/docker-config.json``), else ``~/.docker/config.json`` (with
``APPTAINER_CONFIGDIR`` set: ``$APPTAINER_CONFIGDIR/config.json``); an entry's ``auth`` is
base64 of ``user:password``. scalelab reads them for the one request it makes itself (the
manifest after a push) and never prints them: what Apptainer prints is redacted first
(:func:`scalelab.container.runtime.run_redacted`). TLS trusts what ``SSL_CERT_FILE`` names
(Go's and OpenSSL's variable: Apptainer and Python read the same file), else the system's.
"""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from scalelab.container import runtime
from scalelab.container.lock import Fetch, digest_from_headers, parse_challenge, token_url
from scalelab.errors import CheckFailed, UsageError
from scalelab.fsio import sha256_bytes, sha256_file

SCHEME = "oras://"
#: The media types of what ``apptainer push`` uploads (an OCI manifest, one SIF layer).
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
SIF_LAYER_TYPE = "application/vnd.sylabs.sif.layer.v1.sif"
_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?"
_NAME = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_REF_RE = re.compile(
    rf"^oras://(?P<host>{_HOST})/(?P<name>{_NAME})"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


@dataclass(frozen=True)
class OrasRef:
    """``oras://HOST[:PORT]/NAME[:TAG][@sha256:MANIFEST]``: a tag, a manifest digest, or both."""

    host: str
    name: str
    tag: str | None
    digest: str | None
    """The manifest's digest (``sha256:`` and 64 hex), never the SIF file's."""

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        return f"{SCHEME}{self.host}/{self.name}{tag}" + (f"@{self.digest}" if self.digest else "")

    @property
    def pull_uri(self) -> str:
        """What ``apptainer pull`` gets: by manifest digest when there is one (the tag is
        then only a name for people), else by tag."""
        if self.digest:
            return f"{SCHEME}{self.host}/{self.name}@{self.digest}"
        return str(self)

    def manifest_url(self) -> str:
        return f"https://{self.host}/v2/{self.name}/manifests/{self.digest or self.tag}"


def is_oras(uri: str) -> bool:
    return uri.startswith(SCHEME)


def parse_ref(value: str, where: str = "reference") -> OrasRef:
    """A validated ``oras://`` reference; one UsageError naming ``where`` otherwise.

    Credentials in the reference (``oras://user:pw@host/...``) are refused without
    echoing them: they belong in Apptainer's login store.
    """
    if not value.startswith(SCHEME):
        raise UsageError(f"{where}: expected oras://HOST/NAME:TAG[@sha256:...], got {value!r}")
    authority = value[len(SCHEME) :].split("/", 1)[0]
    if "@" in authority:
        raise UsageError(
            f"{where}: credentials do not belong in a reference; log in with "
            "`apptainer registry login --username USER oras://HOST` instead"
        )
    m = _REF_RE.match(value)
    if not m:
        raise UsageError(
            f"{where}: {value!r} is not oras://HOST[:PORT]/NAME[:TAG][@sha256:<64 hex>] "
            "(lower-case name, a tag, or the manifest digest)"
        )
    if not m["tag"] and not m["digest"]:
        raise UsageError(f"{where}: {value!r} needs a :TAG or an @sha256: manifest digest")
    return OrasRef(m["host"], m["name"], m["tag"], m["digest"])


# ---- the login store ------------------------------------------------------------------------


@dataclass(frozen=True)
class Login:
    """A user and password from the login store; the password never shows in a repr."""

    user: str
    password: str = field(repr=False)
    store: str

    @property
    def secrets(self) -> list[str]:
        """What must never be printed: the password, and user:password (clear or base64)."""
        return [self.password, f"{self.user}:{self.password}"]

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()


def login_store(environ: Mapping[str, str] | None = None) -> Path | None:
    """The Docker config file Apptainer 1.4 reads credentials from, or None when absent."""
    env = os.environ if environ is None else environ
    configdir = env.get("APPTAINER_CONFIGDIR") or env.get("SINGULARITY_CONFIGDIR")
    home = Path(env.get("HOME") or Path.home())
    primary = Path(configdir or home / ".apptainer") / "docker-config.json"
    fallback = Path(configdir or home / ".docker") / "config.json"
    if primary.exists():
        return primary
    return fallback if fallback.exists() else None


def _host_of(key: str) -> str:
    """A Docker config ``auths`` key (``host``, ``https://host/v1/``) as ``host[:port]``."""
    return re.sub(r"^[a-z]+://", "", key).split("/", 1)[0]


def login_for(host: str, environ: Mapping[str, str] | None = None) -> Login | None:
    """The stored login for ``host`` (as ``apptainer registry login`` wrote it), or None."""
    store = login_store(environ)
    if store is None:
        return None
    try:
        auths = json.loads(store.read_text()).get("auths") or {}
    except (OSError, ValueError, AttributeError):
        raise UsageError(f"{store}: not a readable Docker config file") from None
    for key, entry in auths.items():
        if _host_of(key) != host or not isinstance(entry, dict):
            continue
        if entry.get("username") and entry.get("password"):
            return Login(str(entry["username"]), str(entry["password"]), str(store))
        try:
            user, _, password = base64.b64decode(entry.get("auth", "")).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise UsageError(f"{store}: the entry for {host} is not base64 user:password") from None
        if user and password:
            return Login(user, password, str(store))
    return None


def secrets_for(uri: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """The stored secrets that a runtime call on ``uri`` may be handed (to redact)."""
    if not is_oras(uri):
        return []
    host = uri[len(SCHEME) :].split("/", 1)[0]
    login = login_for(host, environ)
    return login.secrets if login else []


# ---- the manifest ---------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """An Authorization header must not follow a redirect to another host."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def https_fetch(
    method: str, url: str, headers: Mapping[str, str], timeout: float = 30
) -> tuple[int, Mapping[str, str], bytes]:
    """One HTTPS request (no redirects followed); HTTP errors are answers, not exceptions."""
    opener = urllib.request.build_opener(_NoRedirect)
    req = urllib.request.Request(url, method=method, headers=dict(headers))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read() or b""
    except (urllib.error.URLError, OSError) as exc:
        host = url.split("/")[2]
        raise UsageError(f"cannot reach {host}: {getattr(exc, 'reason', exc)}") from None


def _authorization(ref: OrasRef, challenge: str, login: Login | None, fetch: Fetch) -> str | None:
    """The Authorization header a 401 challenge asks for, from the stored login."""
    scheme, params = parse_challenge(challenge)
    if scheme == "basic":
        return login.basic() if login else None
    if scheme != "bearer":
        raise UsageError(f"{ref}: registry wants {scheme or 'unknown'} authentication")
    status, _, body = fetch(
        "GET", token_url(params), {"Authorization": login.basic()} if login else {}
    )
    if status != 200:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        raise UsageError(f"{ref}: the token endpoint did not answer JSON") from None
    token = doc.get("token") or doc.get("access_token")
    return f"Bearer {token}" if token else None


def fetch_manifest(
    ref: OrasRef, fetch: Fetch = https_fetch, environ: Mapping[str, str] | None = None
) -> tuple[str, dict]:
    """(manifest digest, manifest) as the registry holds them for ``ref``'s tag or digest;
    the digest is checked against the bytes received."""
    login = login_for(ref.host, environ)
    headers = {"Accept": MANIFEST_TYPE}
    status, resp_headers, body = fetch("GET", ref.manifest_url(), headers)
    if status == 401:
        challenge = {k.lower(): v for k, v in resp_headers.items()}.get("www-authenticate", "")
        auth = _authorization(ref, challenge, login, fetch)
        if auth:
            headers["Authorization"] = auth
            status, resp_headers, body = fetch("GET", ref.manifest_url(), headers)
    if status in (401, 403):
        where = f"the login in {login.store}" if login else "no login"
        raise UsageError(
            f"{ref}: the registry refused {where} (HTTP {status}); log in with "
            f"`apptainer registry login --username USER oras://{ref.host}`"
        )
    if status == 404:
        raise UsageError(f"{ref}: no such manifest in {ref.host}")
    if status != 200:
        raise UsageError(f"{ref}: registry answered HTTP {status}")
    digest = digest_from_headers(resp_headers, body)
    if digest != "sha256:" + sha256_bytes(body):
        raise CheckFailed(f"{ref}: the manifest received does not hash to {digest}")
    if ref.digest and digest != ref.digest:
        raise CheckFailed(f"{ref}: the registry answered manifest {digest}")
    try:
        return digest, json.loads(body)
    except ValueError:
        raise UsageError(f"{ref}: the manifest is not JSON") from None


def sif_layer_digest(ref: OrasRef, manifest: dict) -> str:
    """The SIF file's sha256 (64 hex) that an ORAS manifest names as its one layer."""
    layers = [
        layer
        for layer in manifest.get("layers") or []
        if isinstance(layer, dict) and layer.get("mediaType") == SIF_LAYER_TYPE
    ]
    if len(layers) != 1 or not str(layers[0].get("digest", "")).startswith("sha256:"):
        raise UsageError(f"{ref}: not an image pushed with `apptainer push` (no single SIF layer)")
    return str(layers[0]["digest"]).removeprefix("sha256:")


@dataclass(frozen=True)
class Pushed:
    """What ``push`` left in the registry."""

    ref: OrasRef
    manifest_digest: str
    sha256: str
    """The SIF file's sha256, equal to the manifest's layer."""

    @property
    def pinned_ref(self) -> str:
        return str(OrasRef(self.ref.host, self.ref.name, self.ref.tag, self.manifest_digest))


def push(
    rt: runtime.Runtime,
    image: str | Path,
    uri: str,
    fetch: Fetch = https_fetch,
    environ: Mapping[str, str] | None = None,
) -> Pushed:
    """``apptainer push IMAGE oras://HOST/NAME:TAG``, then read the manifest back: its layer
    must be this file's sha256 (else someone pushed over it), its digest is returned."""
    ref = parse_ref(uri, "push")
    if ref.digest or not ref.tag:
        raise UsageError(f"push: {uri}: push to a :TAG (the registry gives the digest)")
    path = runtime.check_image_file(str(image))
    digest = sha256_file(path)
    argv = runtime.push_argv(rt.name, str(path), str(ref))
    status, out = runtime.run_redacted([rt.path, *argv[1:]], secrets_for(str(ref), environ))
    if status != 0:
        raise UsageError(f"apptainer push to {ref} failed: {runtime.last_line(out, status)}")
    manifest_digest, manifest = fetch_manifest(ref, fetch, environ)
    layer = sif_layer_digest(ref, manifest)
    if layer != digest:
        raise CheckFailed(
            f"{ref}: the registry now holds sha256 {layer}, not the {digest} just pushed "
            "(another push to the same tag?)"
        )
    return Pushed(ref, manifest_digest, digest)
