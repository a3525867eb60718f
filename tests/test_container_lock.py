"""`scalelab container lock`: reference parsing, the registry exchange, the atomic rewrite.

No network here. The registry answers below are CONSTRUCTED, not recorded: they
follow the Docker Registry HTTP API V2 (HEAD /v2/<name>/manifests/<tag>, the
Docker-Content-Digest header) and its token-auth scheme (a 401 with
`WWW-Authenticate: Bearer realm=...,service=...,scope=...`, then a JSON token).
The digests in them are sha256 of made-up strings, not digests of real images.
"""

import hashlib
import json

import pytest
import yaml
from conftest import REPO, VENV_BIN, run

from scalelab.container import lock
from scalelab.errors import UsageError

FAKE_DIGEST = "sha256:" + hashlib.sha256(b"constructed test manifest").hexdigest()
CHALLENGE = (
    'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
    'scope="repository:nvidia/cuda:pull"'
)


class FakeRegistry:
    """Answers like a token-protected registry; records every request."""

    def __init__(self, digest_header=True, missing=()):
        self.requests = []
        self.digest_header = digest_header
        self.missing = set(missing)

    def __call__(self, method, url, headers):
        self.requests.append((method, url, dict(headers)))
        if url.startswith("https://auth.docker.io/token"):
            return 200, {"Content-Type": "application/json"}, json.dumps({"token": "T0K"}).encode()
        if headers.get("Authorization") != "Bearer T0K":
            return 401, {"Www-Authenticate": CHALLENGE}, b""
        if any(m in url for m in self.missing):
            return 404, {}, b""
        body = b"constructed test manifest"
        head = {"Content-Type": "application/vnd.oci.image.index.v1+json"}
        if self.digest_header:
            head["Docker-Content-Digest"] = FAKE_DIGEST
        return 200, head, body if method == "GET" else b""


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("ubuntu:22.04", ("docker.io", "library/ubuntu", "22.04")),
        (
            "docker.io/nvidia/cuda:12.8.1-devel-ubuntu22.04",
            ("docker.io", "nvidia/cuda", "12.8.1-devel-ubuntu22.04"),
        ),
        (
            "nvcr.io/nvidia/cuda:12.8.1-runtime-ubuntu22.04",
            ("nvcr.io", "nvidia/cuda", "12.8.1-runtime-ubuntu22.04"),
        ),
        ("localhost:5000/lab/base:1", ("localhost:5000", "lab/base", "1")),
    ],
)
def test_parse_ref(ref, expected):
    parsed = lock.parse_ref(ref)
    assert (parsed.registry, parsed.repository, parsed.tag) == expected


def test_manifest_url_uses_docker_hubs_api_host():
    assert lock.parse_ref("ubuntu:22.04").manifest_url == (
        "https://registry-1.docker.io/v2/library/ubuntu/manifests/22.04"
    )
    assert lock.parse_ref("nvcr.io/nvidia/cuda:12.8.1-base-ubuntu22.04").manifest_url == (
        "https://nvcr.io/v2/nvidia/cuda/manifests/12.8.1-base-ubuntu22.04"
    )


@pytest.mark.parametrize(
    "ref, message",
    [
        ("ubuntu", "explicit tag"),
        ("ubuntu:latest", "not latest"),
        ("ubuntu@sha256:" + "a" * 64, "not a digest"),
        ("Ubuntu:22.04", "not a valid repository"),
    ],
)
def test_parse_ref_refuses(ref, message):
    with pytest.raises(UsageError, match=message):
        lock.parse_ref(ref)


def test_challenge_and_token_url():
    scheme, params = lock.parse_challenge(CHALLENGE)
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:nvidia/cuda:pull",
    }
    assert lock.token_url(params) == (
        "https://auth.docker.io/token?service=registry.docker.io"
        "&scope=repository%3Anvidia%2Fcuda%3Apull"
    )
    with pytest.raises(UsageError, match="realm"):
        lock.token_url({"realm": "http://insecure.example/token"})


def test_resolve_digest_with_token_dance():
    registry = FakeRegistry()
    assert lock.resolve_digest("nvidia/cuda:12.8.1-devel-ubuntu22.04", registry) == FAKE_DIGEST
    methods = [(m, u.split("?")[0]) for m, u, _ in registry.requests]
    url = "https://registry-1.docker.io/v2/nvidia/cuda/manifests/12.8.1-devel-ubuntu22.04"
    assert methods == [("HEAD", url), ("GET", "https://auth.docker.io/token"), ("HEAD", url)]
    accept = registry.requests[-1][2]["Accept"]
    assert "application/vnd.oci.image.index.v1+json" in accept
    assert "application/vnd.docker.distribution.manifest.list.v2+json" in accept


def test_resolve_digest_hashes_the_body_when_the_header_is_missing():
    registry = FakeRegistry(digest_header=False)
    assert lock.resolve_digest("ubuntu:22.04", registry) == FAKE_DIGEST
    assert registry.requests[-1][0] == "GET"


def test_digest_from_headers_validates():
    assert lock.digest_from_headers({"docker-content-digest": FAKE_DIGEST}) == FAKE_DIGEST
    with pytest.raises(UsageError, match="without a sha256 digest"):
        lock.digest_from_headers({"Docker-Content-Digest": "md5:abc"})


def test_unknown_tag_is_one_error():
    with pytest.raises(UsageError, match="no such tag"):
        lock.resolve_digest("ubuntu:99.99", FakeRegistry(missing={"99.99"}))


def test_refresh_rewrites_the_lock_atomically(tmp_path):
    path = tmp_path / "lock.yaml"
    path.write_text((REPO / "containers" / "lock.yaml").read_text())
    changes = lock.refresh(
        path,
        add=["docker.io/library/ubuntu:24.04"],
        fetch=FakeRegistry(),
        now=lambda: "2026-11-25T12:00Z",
    )
    assert {ref for ref, _, new in changes if new == FAKE_DIGEST} == {
        e["ref"] for e in lock.read_lock(path)
    }
    entries = {e["ref"]: e for e in lock.read_lock(path)}
    assert entries["docker.io/library/ubuntu:24.04"]["resolved"] == "2026-11-25T12:00Z"
    assert entries["docker.io/library/ubuntu:24.04"]["source"].startswith(
        "registry: HEAD https://registry-1.docker.io/v2/library/ubuntu/manifests/24.04"
    )
    # Sections besides the images (the GPU build's `gpu_image`) are kept as they were.
    kept = {
        k: v
        for k, v in yaml.safe_load((REPO / "containers" / "lock.yaml").read_text()).items()
        if k not in ("version", "images")
    }
    assert path.read_text() == lock.dump_lock(list(entries.values()), kept)
    assert [p.name for p in tmp_path.iterdir()] == ["lock.yaml"]  # no temporary left behind


def test_refresh_failure_leaves_the_file_untouched(tmp_path):
    path = tmp_path / "lock.yaml"
    original = (REPO / "containers" / "lock.yaml").read_text()
    path.write_text(original)
    with pytest.raises(UsageError, match="no such tag"):
        lock.refresh(path, fetch=FakeRegistry(missing={"12.6.3-devel-ubuntu22.04"}))
    assert path.read_text() == original


def test_refresh_only_one_image(tmp_path):
    path = tmp_path / "lock.yaml"
    path.write_text((REPO / "containers" / "lock.yaml").read_text())
    before = {e["ref"]: e["digest"] for e in lock.read_lock(path)}
    ref = "docker.io/library/ubuntu:22.04"
    lock.refresh(path, only=[ref], fetch=FakeRegistry())
    after = {e["ref"]: e["digest"] for e in lock.read_lock(path)}
    assert after[ref] == FAKE_DIGEST
    del after[ref], before[ref]
    assert after == before
    with pytest.raises(UsageError, match="not in"):
        lock.refresh(path, only=["docker.io/library/debian:12"], fetch=FakeRegistry())


@pytest.mark.parametrize(
    "text, message",
    [
        ("version: 2\nimages: []\n", "version: 1"),
        ("version: 1\nimages:\n- ref: a:1\n  digest: sha256:xyz\n", "malformed digest"),
        ("version: 1\nimages:\n- ref: a:1\n- ref: a:1\n", "listed twice"),
        ("version: 1\nimages:\n- ref: a:1\n  sha: x\n", "unknown key"),
    ],
)
def test_bad_lock_files(tmp_path, text, message):
    path = tmp_path / "lock.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        lock.read_lock(path)


def test_lock_command_reports_a_bad_lock_in_one_line(tmp_path):
    path = tmp_path / "lock.yaml"
    path.write_text("version: 1\nimages:\n- ref: a:1\n- ref: a:1\n")
    proc = run([str(VENV_BIN / "scalelab"), "container", "lock", "--lock", str(path)], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"scalelab container: error: {path}: a:1 is listed twice"
    ]
