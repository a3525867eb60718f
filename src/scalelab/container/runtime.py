"""Find apptainer (or singularity) and spell out the exact command lines.

Every command scalelab runs is built here as an argument list first, so tests
and ``--dry-run`` see exactly what would run. spython's Client is not used to
run them: in spython 0.3.14 it hard-codes the ``singularity`` executable
(``init_command``), probes it with ``singularity --version`` and calls
``sys.exit`` when a bind source is missing; none of that fits a program that
must name ``apptainer`` and report one clear error. spython parses the
definition files instead (:mod:`scalelab.container.lint`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from scalelab.errors import UsageError
from scalelab.redact import redact_secrets

NOT_FOUND = (
    "no apptainer or singularity on PATH: install Apptainer "
    "(https://apptainer.org/docs/admin/main/installation.html) or load your site's module"
)
#: container.runtime's name for Charliecloud, and the executable that runs its images.
CHARLIECLOUD = "charliecloud"
CH_RUN = "ch-run"
#: container.runtime's name for Podman, which is also its executable.
PODMAN = "podman"
#: The runtimes that run the directory tree derived from the verified SIF, not the SIF.
DERIVED_TREE = (CHARLIECLOUD, PODMAN)
#: The executable of each configured runtime (auto: the first of apptainer, singularity).
EXECUTABLES = {
    "apptainer": "apptainer",
    "singularity": "singularity",
    CHARLIECLOUD: CH_RUN,
    PODMAN: PODMAN,
}


@dataclass(frozen=True)
class Runtime:
    """A container runtime found on PATH."""

    name: str
    """apptainer, singularity or ch-run (the executable name used in command lines)."""
    path: str
    """Where it was found (for messages and provenance)."""


def detect(preferred: str = "auto", path: str | None = None) -> Runtime | None:
    """The runtime to use: apptainer before singularity for `auto` (Charliecloud only when
    named: its images and limits differ); None when absent."""
    names = ("apptainer", "singularity") if preferred == "auto" else (EXECUTABLES[preferred],)
    for name in names:
        found = shutil.which(name, path=path)
        if found:
            return Runtime(name, found)
    return None


def require(preferred: str = "auto", path: str | None = None) -> Runtime:
    """Like :func:`detect`, but a missing runtime is one UsageError."""
    rt = detect(preferred, path)
    if rt is None:
        if preferred == "auto":
            raise UsageError(NOT_FOUND)
        exe = EXECUTABLES[preferred]
        raise UsageError(f"{exe} not found on PATH (container.runtime is {preferred})")
    return rt


def sif_tool(preferred: str = "auto", path: str | None = None) -> Runtime:
    """The runtime that pulls, signs and verifies SIF files: apptainer or singularity,
    also where Charliecloud or Podman runs the image (neither reads SIF signatures or
    pulls oras:// SIFs)."""
    if preferred not in DERIVED_TREE:
        return require(preferred, path)
    rt = detect("auto", path)
    if rt is None:
        raise UsageError(
            f"container.runtime: {preferred} runs the image, but pulling it from "
            "container.registry and checking container.trusted_keys need apptainer or "
            "singularity on the submit host's PATH"
        )
    return rt


def runtime_version(rt: Runtime, timeout: float = 30) -> str | None:
    """`apptainer --version` output, e.g. 'apptainer version 1.3.4' (ch-run prints its
    '0.31' on stderr); None if it fails."""
    try:
        proc = subprocess.run(
            [rt.path, "--version"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    return out[0] if proc.returncode == 0 and out else None


def root_lacks_capabilities(status: str | None = None, last_cap: int | None = None) -> bool:
    """True when we are root but the capability bounding set is not full.

    Apptainer run by root asks the kernel for every capability; where root's bounding
    set lacks one (containers, CI machines: CAP_SYS_RESOURCE here), `apptainer exec`
    fails ("Requesting capability set ...") unless it runs in a user namespace (--userns).
    """
    if status is None:
        if os.geteuid() != 0:
            return False
        try:
            status = Path("/proc/self/status").read_text()
            last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
        except (OSError, ValueError):
            return False
    m = re.search(r"^CapBnd:\s*([0-9a-fA-F]+)", status, flags=re.M)
    if not m:
        return False
    full = (1 << ((last_cap if last_cap is not None else 40) + 1)) - 1
    return int(m.group(1), 16) & full != full


def use_userns(setting: str | bool) -> bool:
    """container.userns: true, false, or auto (only where root lacks capabilities)."""
    if isinstance(setting, bool):
        return setting
    return setting == "true" or (setting == "auto" and root_lacks_capabilities())


# ---- argument lists ---------------------------------------------------------------------


def build_argv(
    rt: str,
    image: str,
    definition: str,
    *,
    fakeroot: bool = True,
    build_args: Mapping[str, str] | None = None,
    force: bool = False,
    notest: bool = False,
) -> list[str]:
    """`apptainer build [--fakeroot] [--force] [--notest] [--build-arg K=V]... IMAGE DEF`."""
    argv = [rt, "build"]
    if fakeroot:
        argv.append("--fakeroot")
    if force:
        argv.append("--force")
    if notest:
        argv.append("--notest")
    for key, value in (build_args or {}).items():
        argv += ["--build-arg", f"{key}={value}"]
    return [*argv, image, definition]


def pull_argv(rt: str, image: str, uri: str, *, force: bool = False) -> list[str]:
    """`apptainer pull [--force] IMAGE URI` (oras://, docker://, library://, https://)."""
    return [rt, "pull", *(["--force"] if force else []), image, uri]


def inspect_argv(rt: str, image: str) -> list[str]:
    """`apptainer inspect --json IMAGE`: labels and build metadata as JSON."""
    return [rt, "inspect", "--json", image]


def verify_argv(rt: str, image: str, key: str | None = None) -> list[str]:
    """`apptainer verify [--key PUBLIC.pem] IMAGE`: the SIF's PGP signatures, or with
    ``key`` its signatures by that PEM public key (every signature must verify)."""
    return [rt, "verify", *(["--key", key] if key else []), image]


def sign_argv(rt: str, image: str, key: str) -> list[str]:
    """`apptainer sign --key PRIVATE.pem IMAGE`: a DSSE signature added inside the SIF."""
    return [rt, "sign", "--key", key, image]


def push_argv(rt: str, image: str, uri: str) -> list[str]:
    """`apptainer push IMAGE oras://HOST/NAME:TAG` (credentials: Apptainer's login store)."""
    return [rt, "push", image, uri]


def exec_argv(
    rt: str,
    image: str,
    command: Sequence[str],
    *,
    nv: bool = True,
    binds: Iterable[str] = (),
    env: Iterable[tuple[str, str]] = (),
    flags: Iterable[str] = (),
    pwd: str | None = None,
) -> list[str]:
    """`apptainer exec [--nv] [--bind B]... [--env K=V]... [flags] IMAGE COMMAND...`."""
    argv = [rt, "exec"]
    if nv:
        argv.append("--nv")
    for bind in binds:
        argv += ["--bind", bind]
    for key, value in env:
        argv += ["--env", f"{key}={value}"]
    argv += list(flags)
    if pwd:
        argv += ["--pwd", pwd]
    return [*argv, image, *command]


def ch_bind(spec: str, where: str = "container.binds") -> tuple[str, str]:
    """An Apptainer bind spec SRC[:DST] as ch-run's (SRC, DST); options (``:ro``) have no
    ch-run 0.31 equivalent (its binds are read-write), so they are refused."""
    parts = spec.split(":")
    if len(parts) > 2:
        raise UsageError(
            f"{where}: {spec!r}: bind options ({parts[2]}) have no Charliecloud equivalent; "
            "give SRC or SRC:DST"
        )
    return parts[0], parts[-1]


def ch_run_argv(
    rt: str,
    image_dir: str,
    command: Sequence[str],
    *,
    binds: Iterable[tuple[str, str]] = (),
    env: Iterable[tuple[str, str]] = (),
    flags: Iterable[str] = (),
    pwd: str | None = None,
) -> list[str]:
    """`ch-run --env-no-expand --set-env [--set-env=K=V]... [-b SRC:DST]... [flags]
    [--cd=PWD] DIR -- COMMAND...`: the image's own variables (/ch/environment) first, then
    ours, each value literal."""
    argv = [rt, "--env-no-expand", "--set-env"]
    argv += [f"--set-env={key}={value}" for key, value in env]
    for src, dst in binds:
        argv.append(f"--bind={src}:{dst}")
    argv += list(flags)
    if pwd:
        argv.append(f"--cd={pwd}")
    return [*argv, image_dir, "--", *command]


#: Podman 4.3's --device name for every NVIDIA GPU through CDI (a spec that
#: ``nvidia-ctk cdi generate`` writes to /etc/cdi/nvidia.yaml).
PODMAN_CDI_GPUS = "nvidia.com/gpu=all"


def podman_run_argv(
    rt: str,
    tree: str,
    command: Sequence[str],
    *,
    globals_: Iterable[str] = (),
    binds: Iterable[str] = (),
    env_file: str | None = None,
    host_env: Iterable[str] = (),
    env: Iterable[tuple[str, str]] = (),
    ulimits: Iterable[str] = (),
    nv: bool = False,
    keep_id: bool = False,
    flags: Iterable[str] = (),
    pwd: str | None = None,
) -> list[str]:
    """`podman [GLOBALS] run --rm --read-only --network=host --ipc=host --pid=host
    [--userns=keep-id] [--ulimit=U]... [--device=nvidia.com/gpu=all] [-v B]...
    [--env-file=F] [--env=NAME]... [--env=K=V]... [flags] [--workdir=PWD] --rootfs TREE
    COMMAND...`: the host's network, IPC and PID namespaces (MPI and NCCL shared memory
    across ranks, PMIx), the image's variables (``env_file``), then the host's named in
    ``host_env`` (names or ``PREFIX*``), then ours, each value literal."""
    argv = [rt, *globals_, "run", "--rm", "--read-only"]
    argv += ["--network=host", "--ipc=host", "--pid=host"]
    if keep_id:
        argv.append("--userns=keep-id")
    argv += [f"--ulimit={u}" for u in ulimits]
    if nv:
        argv.append(f"--device={PODMAN_CDI_GPUS}")
    for bind in binds:
        argv += ["-v", bind]
    if env_file:
        argv.append(f"--env-file={env_file}")
    argv += [f"--env={name}" for name in host_env]
    argv += [f"--env={key}={value}" for key, value in env]
    argv += list(flags)
    if pwd:
        argv.append(f"--workdir={pwd}")
    return [*argv, "--rootfs", tree, *command]


def run(argv: Sequence[str], cwd: str | Path | None = None) -> int:
    """Run a command with the terminal attached; its exit status is ours."""
    try:
        return subprocess.run(list(argv), cwd=cwd, check=False).returncode
    except FileNotFoundError:
        raise UsageError(f"{argv[0]}: not found") from None


def run_redacted(argv: Sequence[str], secrets: Sequence[str] = ()) -> tuple[int, str]:
    """Run a command that may be handed registry credentials, its output captured and
    returned without them (in clear or base64): (status, output). Nothing is printed,
    so a refusal stays one line (callers quote :func:`last_line`)."""
    try:
        proc = subprocess.run(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            check=False,
        )
    except FileNotFoundError:
        raise UsageError(f"{argv[0]}: not found") from None
    return proc.returncode, redact_secrets(proc.stdout, list(secrets))


def last_line(output: str, status: int) -> str:
    """The last non-empty line a failed command printed (its reason), or its status."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit {status}"


def check_image_file(image: str) -> Path:
    """A local image must exist and be a file; one clear error otherwise."""
    p = Path(image)
    if not p.exists():
        raise UsageError(f"image not found: {image}")
    if not p.is_file():
        raise UsageError(f"image is not a file: {image} (a sandbox directory is not supported)")
    if not os.access(p, os.R_OK):
        raise UsageError(f"image not readable: {image}")
    return p
