"""What the workflow needs from the container layer: a command prefix and a provenance record.

The hybrid model: Slurm's ``srun`` starts every rank on the host and each rank
runs ``apptainer exec ... IMAGE scalelab train ...``; MPI inside the container
talks to the host's PMIx server. So the container call goes inside srun,
never around it (:func:`scalelab.launch.commands.compose` puts it there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import scalelab
from scalelab.container import charliecloud, podman, pull, runtime, sif, verify
from scalelab.container.config import ContainerConfig
from scalelab.errors import UsageError


def _config(cfg: ContainerConfig | Mapping[str, Any]) -> ContainerConfig:
    return cfg if isinstance(cfg, ContainerConfig) else ContainerConfig.from_mapping(cfg)


def runtime_name(cfg: ContainerConfig, path: str | None = None) -> str:
    """The executable name for command lines: the configured one, or what PATH offers.

    Raises UsageError when no runtime is installed, so no job is submitted.
    """
    return runtime.require(cfg.runtime, path).name


def exec_flags(c: ContainerConfig) -> list[str]:
    """container.exec_flags, with --userns first when container.userns asks for it
    (apptainer; ch-run always runs in a user namespace and has no such flag, podman's
    is added by :func:`exec_prefix`)."""
    if c.runtime in runtime.DERIVED_TREE:
        return list(c.exec_flags)
    userns = runtime.use_userns(c.userns) and not {"--userns", "-u"} & set(c.exec_flags)
    return [*(["--userns"] if userns else []), *c.exec_flags]


def inspect_labels(rt: runtime.Runtime, image: str, timeout: float = 120) -> dict[str, str]:
    """The image's labels from `apptainer inspect --json`, or with ch-run (which cannot
    inspect a SIF) or podman from the same JSON read out of the SIF ({} when it cannot say)."""
    if rt.name in (runtime.CH_RUN, runtime.PODMAN):
        try:
            return parse_inspect_labels(sif.inspect_metadata(image) or "")
        except (OSError, UsageError):
            return {}
    argv = runtime.inspect_argv(rt.name, image)
    try:
        proc = subprocess.run(
            [rt.path, *argv[1:]], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if proc.returncode != 0:
        return {}
    return parse_inspect_labels(proc.stdout)


def parse_inspect_labels(text: str) -> dict[str, str]:
    """Labels out of `inspect --json` output: {"data": {"attributes": {"labels": {...}}}}."""
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    try:
        labels = data["data"]["attributes"]["labels"]
    except (KeyError, TypeError):
        return {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def image_provenance(
    cfg: ContainerConfig | Mapping[str, Any],
    *,
    labels: bool = True,
    path: str | None = None,
    pin: verify.ImagePin | None = None,
) -> dict[str, Any]:
    """The image's identity for a run's provenance record.

    Returns {"image", "sha256", "pinned_sha256", "size_bytes", "hashed_at", "hashed_by",
    "registry", "signed_by", "runtime", "runtime_version", "labels"}. With ``pin`` (the
    record the submit host wrote after hashing the image by content and checking its
    signature) the file is only checked to be that same file; without it the image is
    hashed (and its signature checked) here. UsageError when the image is missing,
    changed, or its sha256 differs from ``container.sha256`` (an unpinned config is
    recorded, not refused). URI images are not hashed: pull them to a file first.
    """
    c = _config(cfg)
    if c.is_uri:
        raise UsageError(
            f"container.image is a URI ({c.image}): pull it to a .sif on a shared "
            "path first (scalelab container pull) so every job runs the same bytes"
        )
    if pin is not None and c.trusted_keys and not pin.signed_by:
        pin = None  # a record without the signature check the config asks for
    if pin is not None:
        verify.check_pinned_file(pin, c.image)
        if c.sha256 and pin.sha256 != c.sha256:
            raise UsageError(
                f"sha256 mismatch for {c.image}: pinned {c.sha256}, the submit "
                f"host hashed {pin.sha256}"
            )
        hashed_by = "submit host (once per workflow invocation)"
    else:
        pin = checked_image(c)
        hashed_by = "this job"
    rt = runtime.detect(c.runtime, path)
    return {
        "image": pin.image,
        "sha256": pin.sha256,
        "pinned_sha256": c.sha256,
        "size_bytes": pin.size,
        "hashed_at": pin.hashed_at,
        "hashed_by": hashed_by,
        "registry": c.registry,
        "signed_by": pin.signed_by,
        "runtime": rt.name if rt else None,
        "runtime_version": runtime.runtime_version(rt) if rt else None,
        "labels": inspect_labels(rt, c.image) if (rt and labels) else {},
    }


#: Key the workflow adds to the container section it hands to jobs: the pin record's path.
PIN_RECORD_KEY = "pin_record"


def job_container(
    section: Mapping[str, Any],
    *,
    binds: Iterable[str] = (),
    pwd: str | None = None,
    derive: bool = True,
) -> tuple[list[str], dict[str, Any]]:
    """(`apptainer exec ... IMAGE` prefix, provenance) for one training job.

    The submit host's pin record (if the workflow wrote one) spares the job a re-hash;
    the digest travels into the container as SCALELAB_IMAGE_SHA256 so each rank's
    run_info.json names the image it ran in. ``derive`` false (a dry run): the tree a
    Charliecloud or Podman run needs is only named, not unpacked.
    """
    section = {k: v for k, v in section.items() if v not in (None, [], {})}
    record = section.pop(PIN_RECORD_KEY, None)
    pin = verify.read_pin(record) if record else None
    provenance = image_provenance(section, pin=pin)
    c = _config(section)
    env = (*c.env_pairs, ("SCALELAB_IMAGE_SHA256", provenance["sha256"]))
    already = {b.split(":", 1)[0] for b in os.environ.get("APPTAINER_BIND", "").split(",") if b}
    if c.runtime in runtime.DERIVED_TREE:
        already = set()  # APPTAINER_BIND means nothing to ch-run or podman
    binds = [
        b
        for b in dict.fromkeys(binds)
        if Path(b.split(":", 1)[0]).exists() and b.split(":", 1)[0] not in already
    ]
    prefix = exec_prefix(
        c, [*c.bind_specs, *binds], env, pwd=pwd, sha256=provenance["sha256"], derive=derive
    )
    return prefix, provenance


def exec_prefix(
    c: ContainerConfig,
    binds: list[str],
    env: tuple[tuple[str, str], ...],
    *,
    pwd: str | None = None,
    sha256: str | None = None,
    command: list[str] | None = None,
    derive: bool = True,
) -> list[str]:
    """The runtime's exec command line for this config (``command`` after it, or nothing:
    a prefix). Charliecloud runs the directory derived from the SIF whose verified
    ``sha256`` the caller gives, the working directory bound (Apptainer binds it itself)
    and every bind's mount point made in the image (``derive`` false: only named, for a
    dry run)."""
    name = runtime_name(c)
    if c.runtime not in runtime.DERIVED_TREE:
        return runtime.exec_argv(
            name,
            c.image,
            command or [],
            nv=c.nv,
            binds=binds,
            env=env,
            flags=exec_flags(c),
            pwd=pwd,
        )
    if sha256 is None:
        raise UsageError(f"container.sha256: {c.runtime} runs only a verified image")
    # The proof a rank records (inside_image_info): the SIF and the digest that was checked.
    named = {k for k, _ in env}
    proof = (("SCALELAB_IMAGE_PATH", str(c.image)), ("SCALELAB_IMAGE_SHA256", sha256))
    env = (*env, *((k, v) for k, v in proof if k not in named))
    if c.runtime == runtime.PODMAN:
        return _podman_prefix(c, name, binds, env, pwd, sha256, command or [], derive)
    pairs = [runtime.ch_bind(b) for b in dict.fromkeys([*binds, *([pwd] if pwd else [])])]
    tree = charliecloud.image_dir(c.image, sha256)
    if derive:
        tree = charliecloud.derive(c.image, sha256, name)
        charliecloud.mount_points(tree, pairs)
    return runtime.ch_run_argv(
        name, str(tree), command or [], binds=pairs, env=env, flags=exec_flags(c), pwd=pwd
    )


def _podman_prefix(
    c: ContainerConfig,
    name: str,
    binds: list[str],
    env: tuple[tuple[str, str], ...],
    pwd: str | None,
    sha256: str,
    command: list[str],
    derive: bool,
) -> list[str]:
    """``podman run --rootfs`` on the tree derived from the verified SIF (the one
    Charliecloud runs), the working directory bound as ch-run's is, each bind's mount
    point made in the tree first (so concurrent ranks do not race to make it)."""
    specs = list(dict.fromkeys([*binds, *([pwd] if pwd else [])]))
    specs = [b if ":" in b else f"{b}:{b}" for b in specs]  # podman's -v needs a DST
    tree = charliecloud.image_dir(c.image, sha256)
    if derive:
        tree = charliecloud.derive(c.image, sha256, podman.enter(name))
        charliecloud.mount_points(tree, [tuple(b.split(":")[:2]) for b in specs])
    return runtime.podman_run_argv(
        name,
        str(tree),
        command,
        globals_=podman.global_flags(),
        binds=specs,
        env_file=str(podman.env_file(tree)),
        host_env=podman.HOST_VARIABLES,
        env=(*env, podman.RUNTIME_VAR),
        ulimits=podman.ulimits(),
        nv=c.nv,
        keep_id=podman.keep_id(),
        flags=exec_flags(c),
        pwd=pwd,
    )


def inside_image_info() -> dict[str, Any] | None:
    """Proof that this process runs inside an Apptainer, Charliecloud or Podman image (None on
    the host).

    Recorded in run_info.json by the training loop: the image's os-release, the
    interpreter's prefix, where scalelab was imported from, and the image path and
    digest the launcher passed in.
    """
    import sys

    image = os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER")
    # ch-run and podman (podman.inside): the SIF their tree came from.
    if not image and (os.environ.get("CH_RUNNING") or podman.inside(os.environ)):
        image = os.environ.get("SCALELAB_IMAGE_PATH")
    if not image:
        return None

    try:
        os_release = dict(
            line.split("=", 1)
            for line in Path("/etc/os-release").read_text().splitlines()
            if "=" in line
        )
        os_release = {
            k: v.strip('"')
            for k, v in os_release.items()
            if k in ("PRETTY_NAME", "ID", "VERSION_ID", "VERSION_CODENAME")
        }
    except OSError:
        os_release = {}
    return {
        "image": image,
        "image_sha256": os.environ.get("SCALELAB_IMAGE_SHA256"),
        "image_name": os.environ.get("APPTAINER_NAME"),
        "os_release": os_release,
        "sys_prefix": sys.prefix,
        "scalelab_path": str(Path(scalelab.__file__).resolve().parent),
    }


def checked_image(c: ContainerConfig) -> verify.ImagePin:
    """The image pulled from ``container.registry`` if it is not there yet (checked before
    it lands), hashed against ``container.sha256``, then its signature by a trusted key
    (when ``container.trusted_keys`` lists any): the check before any job."""
    signed_by = None
    if c.registry and not Path(c.image).exists():
        rt = runtime.sif_tool(c.runtime)
        pulled = pull.pull_verified(rt, c.registry, c.image, pinned=c.sha256, keys=c.trusted_keys)
        signed_by = pulled.signed_by
    pin = verify.pin_image(c.image, c.sha256)
    if c.trusted_keys and signed_by is None:
        rt = runtime.sif_tool(c.runtime)
        signed_by = verify.check_trusted_signature(rt, c.image, c.trusted_keys)
    return dataclasses.replace(pin, signed_by=signed_by)


#: Where the workflow keeps its image pins and shell-safe image aliases (under the workdir).
WORKFLOW_STATE = Path(".snakemake") / "scalelab" / "images"


def workflow_image(
    section: Mapping[str, Any], *, submit_host: bool, state_dir: str | Path = WORKFLOW_STATE
) -> tuple[str, verify.ImagePin, str]:
    """Pin the workflow's image once per invocation: (alias for --sdm, pin, pin record path).

    On the submit host (Snakemake's main process) the image is hashed by content,
    compared with ``container.sha256``, and the result written to a record keyed by the
    image's path. Jobs re-parse the workflow: they read that record and only check that
    the file is still the one hashed. The alias is a symlink named by the digest,
    ``.snakemake/scalelab/images/sha256-<hex>.sif``: Snakemake pastes the image path of
    ``container:`` unquoted into a shell command, so what reaches that shell is this
    name of hex digits, never the configured path.
    """
    c = _config(section)
    if c.is_uri:
        raise UsageError(
            f"container.image is a URI ({c.image}): pull it to a .sif on a shared "
            "path first (scalelab container pull) so every job runs the same bytes"
        )
    state = Path(state_dir)
    target = Path(c.image).resolve()
    record = state / f"path-{hashlib.sha256(str(target).encode()).hexdigest()[:16]}.json"
    pin = None if submit_host else verify.read_pin(record)
    if pin is None or (c.trusted_keys and not pin.signed_by):
        pin = checked_image(c)
        verify.write_pin(record, pin)
    else:
        verify.check_pinned_file(pin, c.image)
        if c.sha256 and pin.sha256 != c.sha256:
            raise UsageError(
                f"sha256 mismatch for {c.image}: pinned {c.sha256}, the submit "
                f"host hashed {pin.sha256}"
            )
    alias = state / f"sha256-{pin.sha256}.sif"
    if submit_host or not alias.is_symlink():
        tmp = alias.with_name(f".{alias.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(pin.image)
        tmp.replace(alias)
    return str(alias), pin, str(record.resolve())


def sdm_binds(cfg: Mapping[str, Any]) -> list[str]:
    """Paths jobs under --sdm apptainer must see besides the workdir (Snakemake binds that):
    an absolute results directory, the dataset source and node-local scratch."""
    data = cfg.get("data") or {}
    paths = [cfg.get("results"), data.get("path"), data.get("scratch")]
    out = []
    for p in paths:
        if p and Path(p).is_absolute() and Path(p).exists():
            out.append(str(Path(p).resolve()))
    return list(dict.fromkeys(out))


def export_sdm_binds(cfg: Mapping[str, Any], environ: Any = None) -> list[str]:
    """Add :func:`sdm_binds` to APPTAINER_BIND (kept: binds a site already set there), so
    every --sdm apptainer job Snakemake starts binds them; return the binds added."""
    import os

    environ = os.environ if environ is None else environ
    binds = sdm_binds(cfg)
    if binds:
        environ["APPTAINER_BIND"] = ",".join(
            b for b in [environ.get("APPTAINER_BIND", ""), *binds] if b
        )
    return binds
