"""Images through a real registry, signed: `scalelab container sign`, `push`, `pull`,
`verify` and the workflow's check before any job.

Everything here is real: Debian's `docker-registry` over TLS from a CA the test makes
(tests/registry_server.py), the installed `apptainer`, key pairs from openssl. The image
is a tiny SIF built here from a sandbox directory (no network, under a second), so the
round trip costs seconds, not the CPU image's minutes. Apptainer's login store and cache
are per test (APPTAINER_CONFIGDIR, APPTAINER_CACHEDIR).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import VENV_BIN, tool_env
from container_image import require_apptainer
from registry_server import build_tiny_sif, client_env, login, make_key_pair, start_registry

from scalelab.container import registry
from scalelab.container.config import ContainerConfig
from scalelab.errors import UsageError

SCALELAB = str(VENV_BIN / "scalelab")
USER, PASSWORD = "alice", "Pl4nted-registry-s3cret"
pytestmark = pytest.mark.timeout(600)


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sif(tmp_path_factory) -> Path:
    """A real SIF of a few KB (registry_server.build_tiny_sif)."""
    return build_tiny_sif(tmp_path_factory.mktemp("tiny"), require_apptainer())


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("keys")
    return {name: make_key_pair(d, name) for name in ("lab", "other")}


@pytest.fixture(scope="module", params=["auth", "anonymous"])
def reg(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"registry-{request.param}")
    auth = request.param == "auth"
    server = start_registry(d, user=USER if auth else None, password=PASSWORD if auth else None)
    yield server
    server.stop()


@pytest.fixture
def env(reg, tmp_path) -> dict[str, str]:
    """A client environment, logged in (through `apptainer registry login`) when the
    registry wants credentials."""
    e = client_env(reg, tmp_path / "home", tool_env())
    if reg.user:
        login(e, reg)
    return e


def container(args: list, env: dict[str, str], cwd: Path | None = None):
    return subprocess.run(
        [SCALELAB, "container", *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def one_line(proc, *words: str, code: int = 1) -> str:
    """The whole of stderr is one `scalelab container: error:` line."""
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("scalelab container: error: ")
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def signed_copy(tiny: Path, key: Path | None, dest: Path, env) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tiny, dest)
    if key is not None:
        out = ok(container(["sign", dest, "--key", key], env))
        assert f"its sha256 is now {sha256(dest)}" in out  # the pin after signing
    return dest


def push(image: Path, ref: str, env) -> tuple[str, str]:
    """(manifest digest, file sha256) that `scalelab container push` printed."""
    out = ok(container(["push", image, ref], env))
    pinned_ref = next(line for line in out.splitlines() if "container.registry:" in line)
    digest = pinned_ref.split("@", 1)[1].strip()
    assert f"manifest digest {digest}" in out and f"file sha256 {sha256(image)}" in out
    return digest, sha256(image)


# ---- references, config, login store (no registry needed) ---------------------------------


def test_reference_forms_and_refusals():
    ref = registry.parse_ref("oras://10.0.0.1:5000/lab/cpu:1.0@sha256:" + "a" * 64)
    assert (ref.host, ref.name, ref.tag) == ("10.0.0.1:5000", "lab/cpu", "1.0")
    assert ref.pull_uri == "oras://10.0.0.1:5000/lab/cpu@sha256:" + "a" * 64
    assert ref.manifest_url() == "https://10.0.0.1:5000/v2/lab/cpu/manifests/sha256:" + "a" * 64
    assert registry.parse_ref("oras://ghcr.io/lab/cpu:1").pull_uri == "oras://ghcr.io/lab/cpu:1"
    for bad, words in [
        ("oras://ghcr.io/lab/cpu", "needs a :TAG"),
        ("docker://ghcr.io/lab/cpu:1", "expected oras://"),
        ("oras://ghcr.io/Lab/cpu:1", "lower-case"),
        ("oras://ghcr.io/lab/cpu:1@sha256:abc", "64 hex"),
    ]:
        with pytest.raises(UsageError, match=words):
            registry.parse_ref(bad, "container.registry")


def test_config_takes_a_registry_a_pin_and_keys_never_credentials():
    sha = "b" * 64
    cfg = ContainerConfig.from_mapping(
        {"image": "/shared/x.sif", "registry": "oras://h:5000/lab/x:1", "sha256": sha}
    )
    assert cfg.registry == "oras://h:5000/lab/x:1" and cfg.trusted_keys == []
    cases = [
        ({"registry": f"oras://{USER}:{PASSWORD}@h/lab/x:1", "sha256": sha}, "container.registry"),
        ({"registry": "oras://h/lab/x:1"}, "container.sha256"),
        (
            {"registry": "oras://h/lab/x:1", "sha256": sha, "image": "oras://h/lab/x:1"},
            "container.image",
        ),
    ]
    for extra, field in cases:
        with pytest.raises(UsageError) as err:
            ContainerConfig.from_mapping({"image": "/shared/x.sif", **extra})
        message = str(err.value)
        assert message.startswith(field) and "\n" not in message
        assert PASSWORD not in message  # a credential typed into the config is not echoed


@pytest.mark.parametrize("reg", ["auth"], indirect=True)
def test_login_store_is_where_apptainer_registry_login_writes(reg, tmp_path):
    """Both of Apptainer 1.4's places: ~/.docker/config.json under HOME, and the one
    under APPTAINER_CONFIGDIR; the entry decodes to the user and password logged in."""
    for mode in ("home", "configdir"):
        home = tmp_path / mode
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.endswith("_CONFIGDIR")}
        env.update(HOME=str(home), SSL_CERT_FILE=str(reg.bundle))
        if mode == "configdir":
            env["APPTAINER_CONFIGDIR"] = str(home / "cfg")
        login(env, reg)
        store = registry.login_store(env)
        assert store is not None and store.is_relative_to(home), store
        got = registry.login_for(reg.host, env)
        assert (got.user, got.password) == (USER, PASSWORD)
        assert PASSWORD not in repr(got)
        assert registry.login_for("elsewhere:5000", env) is None


def test_secrets_are_redacted_in_clear_and_base64():
    from scalelab.redact import REDACTED, redact_secrets

    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    text = f"pw {PASSWORD} auth {auth} b64 {base64.b64encode(PASSWORD.encode()).decode()} x"
    out = redact_secrets(text, [PASSWORD, f"{USER}:{PASSWORD}"])
    assert PASSWORD not in out and auth not in out and out.count(REDACTED) == 3


def test_manifest_request_answers_a_bearer_challenge_with_the_stored_login(tmp_path):
    """Registries such as ghcr.io hand out tokens: the stored login goes to the token
    realm as Basic auth, the token to the manifest request; nothing else sees it."""
    store = tmp_path / "cfg"
    store.mkdir()
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (store / "config.json").write_text(json.dumps({"auths": {"ghcr.example": {"auth": auth}}}))
    body = json.dumps(
        {"layers": [{"mediaType": registry.SIF_LAYER_TYPE, "digest": "sha256:" + "c" * 64}]}
    ).encode()
    seen = []

    def fetch(method, url, headers):
        seen.append((url, headers.get("Authorization")))
        if url.startswith("https://auth.example/"):
            ok_login = headers.get("Authorization") == f"Basic {auth}"
            return (200 if ok_login else 401), {}, b'{"token": "T0KEN"}'
        if headers.get("Authorization") != "Bearer T0KEN":
            challenge = 'Bearer realm="https://auth.example/token",service="ghcr",scope="x"'
            return 401, {"WWW-Authenticate": challenge}, b""
        return 200, {"Docker-Content-Digest": "sha256:" + hashlib.sha256(body).hexdigest()}, body

    ref = registry.parse_ref("oras://ghcr.example/lab/cpu:1")
    digest, manifest = registry.fetch_manifest(ref, fetch, {"APPTAINER_CONFIGDIR": str(store)})
    assert digest == "sha256:" + hashlib.sha256(body).hexdigest()
    assert registry.sif_layer_digest(ref, manifest) == "c" * 64
    assert [a for _, a in seen] == [None, f"Basic {auth}", "Bearer T0KEN"]
    # A manifest whose bytes do not hash to the digest the registry claims is refused.
    bad = lambda m, u, h: (200, {"Docker-Content-Digest": "sha256:" + "d" * 64}, body)  # noqa: E731
    with pytest.raises(UsageError, match="does not hash to"):
        registry.fetch_manifest(ref, bad, {"APPTAINER_CONFIGDIR": str(store)})


# ---- the round trip through the real registry ---------------------------------------------


def test_push_then_pull_by_tag_and_by_manifest_digest(reg, env, tiny_sif, keys, tmp_path):
    image = signed_copy(tiny_sif, keys["lab"][0], tmp_path / "src" / "lab.sif", env)
    ref = reg.ref("lab/tiny:1.0")
    digest, sha = push(image, ref, env)
    assert digest != f"sha256:{sha}"  # the manifest's digest is not the file's
    for i, uri in enumerate([ref, f"{ref}@{digest}"]):
        dest = tmp_path / "shared" / f"pulled-{i}.sif"
        out = ok(container(["pull", uri, "--image", dest, "--sha256", sha], env))
        assert f"{dest}: sha256 {sha} matches the pin" in out
        assert dest.read_bytes() == image.read_bytes()
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == [
        "pulled-0.sif",
        "pulled-1.sif",
    ]


def test_a_wrong_pin_is_refused_in_one_line_and_leaves_no_file(reg, env, tiny_sif, tmp_path):
    image = signed_copy(tiny_sif, None, tmp_path / "src" / "plain.sif", env)
    ref = reg.ref("lab/plain:1")
    digest, sha = push(image, ref, env)
    shared = tmp_path / "shared"
    wrong = "f" * 64
    line = one_line(
        container(["pull", ref, "--image", shared / "x.sif", "--sha256", wrong], env),
        ref,
        f"has sha256 {sha}",
        f"pinned {wrong}",
        "refused",
    )
    assert PASSWORD not in line
    assert not shared.exists() or list(shared.iterdir()) == []
    # A manifest digest the registry does not hold: apptainer's refusal, one line, no file.
    other = "sha256:" + "e" * 64
    one_line(
        container(["pull", f"{ref}@{other}", "--image", shared / "x.sif", "--sha256", sha], env),
        "apptainer pull",
        code=2,
    )
    assert not shared.exists() or list(shared.iterdir()) == []


def test_only_a_trusted_key_signature_passes(reg, env, tiny_sif, keys, tmp_path):
    lab_pub, other_pub = keys["lab"][1], keys["other"][1]
    cases = {"lab": keys["lab"][0], "other": keys["other"][0], "unsigned": None}
    pushed = {}
    for name, private in cases.items():
        image = signed_copy(tiny_sif, private, tmp_path / "src" / f"{name}.sif", env)
        pushed[name] = (image, *push(image, reg.ref(f"lab/{name}:1"), env))
    shared = tmp_path / "shared"
    # verify: the key named on the command line, or the config's trusted_keys
    image, _, sha = pushed["lab"]
    out = ok(
        container(["verify", image, "--sha256", sha, "--key", other_pub, "--key", lab_pub], env)
    )
    assert f"signature verified by {lab_pub}" in out
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"container": {"image": str(image), "sha256": sha, "trusted_keys": [str(lab_pub)]}}
        )
    )
    assert f"verified by {lab_pub}" in ok(container(["verify", "--config", cfg], env))
    one_line(
        container(["verify", "--config", cfg, "--signature", "skip"], env),
        "--signature skip",
        code=2,
    )
    # pull: signed by the trusted key passes; unsigned and another key's are refused,
    # each in one line naming the image and the trusted key, and nothing lands.
    dest = shared / "lab.sif"
    out = ok(
        container(
            ["pull", reg.ref("lab/lab:1"), "--image", dest, "--sha256", sha, "--key", lab_pub], env
        )
    )
    assert f"signed by {lab_pub}" in out and sha256(dest) == sha
    for name, why in [("unsigned", "it is not signed"), ("other", "by none of the trusted keys")]:
        image, _, sha = pushed[name]
        ref = reg.ref(f"lab/{name}:1")
        dest = shared / f"{name}.sif"
        one_line(
            container(["pull", ref, "--image", dest, "--sha256", sha, "--key", lab_pub], env),
            f"signature refused for {ref}",
            why,
            str(lab_pub),
        )
        assert not dest.exists()
        one_line(
            container(["verify", image, "--sha256", sha, "--key", lab_pub], env),
            f"signature refused for {image}",
            why,
            str(lab_pub),
        )
    assert sorted(p.name for p in shared.iterdir()) == ["lab.sif"]  # no temporary file left
    # A private key listed as trusted is refused by name (it must never be handed out).
    one_line(
        container(["verify", image, "--sha256", sha, "--key", keys["lab"][0]], env),
        "is a private key",
        code=2,
    )


def test_a_tampered_repush_under_the_same_tag_is_refused_at_the_digest(
    reg, env, tiny_sif, keys, tmp_path
):
    image = signed_copy(tiny_sif, keys["lab"][0], tmp_path / "src" / "lab.sif", env)
    ref = reg.ref("lab/tamper:1")
    _, sha = push(image, ref, env)
    tampered = tmp_path / "src" / "tampered.sif"
    shutil.copyfile(image, tampered)
    extra = tmp_path / "payload.txt"
    extra.write_text("not what the lab signed\n")
    subprocess.run(
        [require_apptainer(), "sif", "add", "--datatype", "7", str(tampered), str(extra)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    push(tampered, ref, env)
    dest = tmp_path / "shared" / "lab.sif"
    one_line(
        container(["pull", ref, "--image", dest, "--sha256", sha, "--key", keys["lab"][1]], env),
        f"has sha256 {sha256(tampered)}",
        f"pinned {sha}",
    )
    assert not dest.exists() and not any((tmp_path / "shared").iterdir())


@pytest.mark.parametrize("reg", ["auth"], indirect=True)
def test_an_auth_registry_without_a_login_refuses_in_one_line(reg, tiny_sif, tmp_path):
    env = client_env(reg, tmp_path / "nologin", tool_env())
    line = one_line(
        container(["push", tiny_sif, reg.ref("lab/x:1")], env), "apptainer push", code=2
    )
    assert "401" in line or "unauthorized" in line.lower() or "authentication" in line.lower()


@pytest.mark.parametrize("reg", ["auth"], indirect=True)
def test_planted_credentials_never_reach_output_or_logs(reg, env, tiny_sif, keys, tmp_path):
    """Every command of the round trip, passing and failing, with the login planted in the
    store: the password and its base64 forms appear in no output and no log."""
    image = signed_copy(tiny_sif, keys["lab"][0], tmp_path / "src" / "lab.sif", env)
    ref = reg.ref("lab/secret:1")
    outputs = []
    proc = container(["push", image, ref], env)
    outputs.append(proc)
    sha = sha256(image)
    for args in (
        ["pull", ref, "--image", tmp_path / "a.sif", "--sha256", sha, "--key", keys["lab"][1]],
        ["pull", ref, "--image", tmp_path / "b.sif", "--sha256", "0" * 64],
        ["pull", ref, "--image", tmp_path / "c.sif", "--sha256", sha, "--key", keys["other"][1]],
        ["pull", reg.ref("lab/missing:1"), "--image", tmp_path / "d.sif", "--sha256", sha],
        ["push", image, reg.ref("lab/secret:1@sha256:" + "0" * 64)],
    ):
        outputs.append(container(args, env))
    assert [p.returncode for p in outputs] == [0, 0, 1, 1, 2, 2]
    forms = [PASSWORD, f"{USER}:{PASSWORD}"]
    forms += [base64.b64encode(f.encode()).decode().rstrip("=") for f in forms]
    texts = [p.stdout + p.stderr for p in outputs] + [reg.log.read_text()]
    texts += [p.read_text(errors="replace") for p in tmp_path.rglob("*.log")]
    for text in texts:
        for form in forms:
            assert form not in text


# ---- the workflow's check before any job -----------------------------------------------------


def test_workflow_pulls_from_the_registry_and_refuses_a_wrong_signature_before_any_job(
    reg, env, tiny_sif, keys, tmp_path
):
    from test_workflow import copy_workflow, snakemake

    image = signed_copy(tiny_sif, keys["lab"][0], tmp_path / "src" / "lab.sif", env)
    ref = reg.ref("lab/study:1")
    digest, sha = push(image, ref, env)
    wd = copy_workflow(tmp_path / "wf")
    base = yaml.safe_load((wd / ".test" / "config.yaml").read_text())

    def dry_run(name: str, **container_cfg):
        cfg = dict(base, container={"enabled": True, "nv": False, **container_cfg})
        (wd / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        return snakemake(
            wd, ["-n", "--cores", "1", "--configfile", f"{name}.yaml"], env=env, check=False
        )

    dest = tmp_path / "shared" / "study.sif"
    proc = dry_run(
        "good",
        image=str(dest),
        registry=f"{ref}@{digest}",
        sha256=sha,
        trusted_keys=[str(keys["lab"][1])],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sha256(dest) == sha  # pulled once, onto the shared path, checked
    records = list((wd / ".snakemake" / "scalelab" / "images").glob("path-*.json"))
    assert [json.loads(r.read_text())["signed_by"] for r in records] == [str(keys["lab"][1])]
    # The same image under a config that trusts only another key: refused before any job.
    proc = dry_run(
        "wrongkey", image=str(dest), registry=ref, sha256=sha, trusted_keys=[str(keys["other"][1])]
    )
    assert proc.returncode != 0, proc.stdout[-3000:]
    said = proc.stdout + proc.stderr  # Snakemake prints a WorkflowError on stdout under -n
    lines = [line for line in said.splitlines() if "signature refused" in line]
    assert len(lines) == 1 and str(dest) in lines[0] and str(keys["other"][1]) in lines[0], (
        proc.stderr[-3000:]
    )
    assert not (wd / "results").exists()
    # An unsigned image pushed under a tag, pulled for a study: refused at the signature,
    # nothing lands on the shared path.
    plain = signed_copy(tiny_sif, None, tmp_path / "src" / "plain.sif", env)
    _, plain_sha = push(plain, reg.ref("lab/plain-study:1"), env)
    fresh = tmp_path / "shared" / "plain.sif"
    proc = dry_run(
        "unsigned",
        image=str(fresh),
        registry=reg.ref("lab/plain-study:1"),
        sha256=plain_sha,
        trusted_keys=[str(keys["lab"][1])],
    )
    assert proc.returncode != 0 and "it is not signed" in proc.stdout + proc.stderr, proc.stdout
    assert not fresh.exists() and sorted(p.name for p in dest.parent.iterdir()) == ["study.sif"]
    for form in (PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()):
        for log in (wd / ".snakemake" / "log").glob("*.log"):
            assert form not in log.read_text()
