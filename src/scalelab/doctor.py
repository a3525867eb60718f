"""`scalelab doctor`: what this machine offers the pipeline, and what is missing.

Each probe runs the real tool (or imports the real module in a child Python,
so a crashing extension cannot take the doctor down) and reports a version or
the reason it is unavailable. A mode (local, slurm, container) names the probes
it needs; the exit status says whether that mode can run here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from scalelab import energy
from scalelab.container import root_lacks_capabilities
from scalelab.tools import which

PROBE_TIMEOUT_S = 60


@dataclass
class Probe:
    """One component: found or not, its version/details, and how to get it."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


# What each mode needs. `local` runs the embedded default with mpirun/torchrun;
# `slurm` adds the Slurm clients and the Snakemake executor plugin; `container`
# runs the same through Apptainer.
MODE_REQUIRES: dict[str, list[str]] = {
    "local": ["python", "torch", "mpirun", "mpi4py", "horovod", "snakemake"],
    "slurm": [
        "python",
        "torch",
        "mpirun",
        "mpi4py",
        "horovod",
        "snakemake",
        "snakemake-slurm-plugin",
        "sbatch",
        "srun",
        "squeue",
        "scontrol",
        "slurmctld",
        "srun-pmix",
    ],
    "container": ["python", "snakemake", "apptainer"],
}

SETUP_HINT = "run ./setup.sh (installs the pinned stack in .venv)"
SLURM_HINT = (
    "install the Slurm clients (Debian/Ubuntu: apt-get install slurm-client) "
    "or load your site's slurm module"
)


def _run(cmd: list[str], timeout: float = PROBE_TIMEOUT_S) -> tuple[int, str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return 127, f"{cmd[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, f"{cmd[0]}: timed out after {timeout:.0f}s"
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _python_probe(code: str) -> tuple[bool, dict | str]:
    """Run `code` in a child interpreter; it must print one JSON object."""
    rc, out = _run([sys.executable, "-c", code])
    if rc != 0:
        last = out.splitlines()[-1] if out else f"exit {rc}"
        return False, last
    try:
        return True, json.loads(out.splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return False, out[-200:]


def probe_python() -> Probe:
    v = sys.version_info
    return Probe(
        "python",
        v >= (3, 11),
        f"{v.major}.{v.minor}.{v.micro} ({sys.executable})",
        "use Python >= 3.11 (the Snakemake slurm executor plugin needs it)",
    )


def probe_torch() -> Probe:
    ok, info = _python_probe(
        "import json, torch, torch.distributed as d\n"
        "cuda = torch.cuda.is_available()\n"
        "nccl = '.'.join(map(str, torch.cuda.nccl.version())) if cuda else None\n"
        "print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda,"
        " 'gpus': torch.cuda.device_count() if cuda else 0, 'nccl': nccl,"
        " 'gloo': d.is_gloo_available(), 'mpi': d.is_mpi_available()}))"
    )
    if not ok:
        return Probe("torch", False, str(info), SETUP_HINT)
    detail = f"{info['version']}, gloo={'yes' if info['gloo'] else 'no'}"
    if info["gpus"]:
        detail += f", CUDA {info['cuda']}, {info['gpus']} GPU(s), NCCL {info['nccl']}"
    else:
        detail += ", CPU only"
    return Probe("torch", bool(info["gloo"]), detail, SETUP_HINT)


def probe_mpirun() -> Probe:
    path = which("mpirun")
    if not path:
        return Probe("mpirun", False, "not on PATH", SETUP_HINT + " and put .venv/bin on PATH")
    rc, out = _run([path, "--version"])
    first = out.splitlines()[0] if out else ""
    return Probe("mpirun", rc == 0, f"{first} ({path})", SETUP_HINT)


def probe_mpi4py() -> Probe:
    ok, info = _python_probe(
        "import json, mpi4py\nfrom mpi4py import MPI\n"
        "print(json.dumps({'version': mpi4py.__version__,"
        " 'lib': MPI.Get_library_version().split(',')[0].strip()}))"
    )
    if not ok:
        return Probe("mpi4py", False, str(info), SETUP_HINT)
    return Probe("mpi4py", True, f"{info['version']} on {info['lib']}")


def probe_horovod() -> Probe:
    ok, info = _python_probe(
        "import json, horovod, horovod.torch as hvd\n"
        "print(json.dumps({'version': horovod.__version__,"
        " 'controllers': [n for n, f in (('mpi', hvd.mpi_built), ('gloo', hvd.gloo_built)) if f()],"
        " 'ops': [n for n, f in (('nccl', hvd.nccl_built), ('ddl', hvd.ddl_built),"
        " ('ccl', hvd.ccl_built), ('cuda', hvd.cuda_built), ('rocm', hvd.rocm_built)) if f()]}))"
    )
    if not ok:
        return Probe("horovod", False, str(info), "run envs/build_horovod.sh .venv (or ./setup.sh)")
    ops = ["gloo-cpu"] + info["ops"]
    controllers = ",".join(info["controllers"])
    detail = (
        f"{info['version']}, frameworks: pytorch, controllers: {controllers}"
        f", tensor ops: {','.join(ops)}"
    )
    return Probe("horovod", bool(info["controllers"]), detail, "rebuild with envs/build_horovod.sh")


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def probe_snakemake() -> Probe:
    v = _dist_version("snakemake")
    return Probe("snakemake", v is not None, v or "not installed", SETUP_HINT)


def probe_slurm_plugin() -> Probe:
    v = _dist_version("snakemake-executor-plugin-slurm")
    return Probe("snakemake-slurm-plugin", v is not None, v or "not installed", SETUP_HINT)


NO_CONF = "installed, but no Slurm configuration found (set SLURM_CONF or /etc/slurm/slurm.conf)"


def probe_slurm_client(name: str) -> Probe:
    path = shutil.which(name)
    if not path:
        return Probe(name, False, "not on PATH", SLURM_HINT)
    rc, out = _run([path, "--version"])
    detail = out.splitlines()[0] if rc == 0 and out else NO_CONF
    return Probe(name, True, f"{detail} ({path})", SLURM_HINT)


def probe_slurm_controller() -> Probe:
    """The clients are useless without a reachable slurmctld."""
    path = shutil.which("scontrol")
    if not path:
        return Probe("slurmctld", False, "scontrol not on PATH", SLURM_HINT)
    rc, out = _run([path, "ping"], timeout=20)
    ok = rc == 0 and " UP" in out
    detail = out.splitlines()[-1] if out else f"exit {rc}"
    if "resolve_ctls" in out or "Could not establish a configuration" in out:
        detail = NO_CONF
    return Probe(
        "slurmctld",
        ok,
        detail,
        "point SLURM_CONF at your cluster's slurm.conf, or start the test cluster: "
        "scalelab testcluster up",
    )


def probe_srun_mpi() -> Probe:
    """List srun's --mpi plugin types; the pipeline launches with --mpi=pmix."""
    path = shutil.which("srun")
    if not path:
        return Probe("srun-pmix", False, "srun not on PATH", SLURM_HINT)
    rc, out = _run([path, "--mpi=list"])
    if rc != 0:
        return Probe("srun-pmix", False, NO_CONF, SLURM_HINT)
    types = sorted(
        {
            line.split()[-1].removeprefix("mpi/")
            for line in out.splitlines()
            if line.strip() and "MPI plugin types" not in line and "specific" not in line
        }
    )
    ok = rc == 0 and any(t.startswith("pmix") for t in types)
    return Probe(
        "srun-pmix",
        ok,
        "types: " + (", ".join(types) or out[-120:]),
        "install libpmix2 + libpmix-dev before slurmd starts (Debian), or ask your admins",
    )


def probe_apptainer() -> Probe:
    for name in ("apptainer", "singularity"):
        path = shutil.which(name)
        if path:
            rc, out = _run([path, "--version"])

            mode = (
                "exec needs --userns here: root's capability set is not full "
                "(container.userns auto passes it)"
                if root_lacks_capabilities()
                else "exec runs without --userns"
            )
            return Probe(
                "apptainer",
                rc == 0,
                f"{out.splitlines()[0] if out else ''} ({path}); {mode}; {gpu_driver_note()}",
                ""
                if rc == 0
                else "the binary does not run: reinstall it "
                "(test environment: bash envs/install_apptainer.sh)",
            )
    return Probe(
        "apptainer",
        False,
        "neither apptainer nor singularity on PATH",
        "install Apptainer (https://apptainer.org/docs/admin/main/installation.html) "
        "or load your site's apptainer module",
    )


#: The GPU image is torch's CUDA 13.0 build (containers/gpu/): the host driver must be R580+.
GPU_IMAGE_DRIVER_MIN = 580


def gpu_driver_note(smi_output: str | None = None) -> str:
    """What the host's NVIDIA driver means for the GPU image (CUDA 13.0 needs R580+)."""
    if smi_output is None:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return (
                f"GPU image: CUDA 13.0, needs NVIDIA driver R{GPU_IMAGE_DRIVER_MIN}+ "
                "(no nvidia-smi here)"
            )
        rc, smi_output = _run([smi, "--query-gpu=driver_version", "--format=csv,noheader"])
        if rc != 0:
            return (
                f"GPU image: CUDA 13.0, needs NVIDIA driver R{GPU_IMAGE_DRIVER_MIN}+ "
                f"(nvidia-smi: {smi_output.splitlines()[0] if smi_output else rc})"
            )
    version = (smi_output.strip().splitlines() or [""])[0].strip()
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return f"GPU image: CUDA 13.0, needs NVIDIA driver R{GPU_IMAGE_DRIVER_MIN}+ (driver ?)"
    if major >= GPU_IMAGE_DRIVER_MIN:
        return f"GPU image: CUDA 13.0 runs on this driver {version}"
    return (
        f"GPU image: CUDA 13.0 needs driver R{GPU_IMAGE_DRIVER_MIN}+, this host has "
        f"{version}: use the cu126 variant (containers/recipe.py) or update the driver"
    )


def probe_energy() -> Probe:
    """The energy counters a run could read here (joules per sample; optional)."""

    parts, ok = [], False
    try:
        zones = energy.Rapl().zones
        parts.append(f"rapl: {len(zones)} zone(s) readable (packages + dram)")
        ok = True
    except Exception as exc:  # noqa: BLE001 - any failure: not readable here
        parts.append(f"rapl: {type(exc).__name__}: {exc}".splitlines()[0])
    try:
        import pynvml

        pynvml.nvmlInit()
        parts.append(f"nvml: {pynvml.nvmlDeviceGetCount()} GPU(s)")
        ok = True
    except ImportError:
        parts.append("nvml: nvidia-ml-py not installed (pip install 'scalelab[gpu]')")
    except Exception as exc:  # noqa: BLE001 - NVMLError: no driver, no GPU
        parts.append(f"nvml: {type(exc).__name__}: {exc}".splitlines()[0])
    return Probe(
        "energy",
        ok,
        "; ".join(parts),
        ""
        if ok
        else "optional: joules per sample need NVML (NVIDIA GPUs) or "
        "readable RAPL counters (x86, /sys/class/powercap; root-only since Linux 5.10)",
    )


PROBES = {
    "python": probe_python,
    "torch": probe_torch,
    "mpirun": probe_mpirun,
    "mpi4py": probe_mpi4py,
    "horovod": probe_horovod,
    "snakemake": probe_snakemake,
    "snakemake-slurm-plugin": probe_slurm_plugin,
    "sbatch": lambda: probe_slurm_client("sbatch"),
    "srun": lambda: probe_slurm_client("srun"),
    "squeue": lambda: probe_slurm_client("squeue"),
    "scontrol": lambda: probe_slurm_client("scontrol"),
    "slurmctld": probe_slurm_controller,
    "srun-pmix": probe_srun_mpi,
    "apptainer": probe_apptainer,
    "energy": probe_energy,
}


def run_probes() -> list[Probe]:
    return [fn() for fn in PROBES.values()]


def missing_for(mode: str, probes: list[Probe], without: Iterable[str] = ()) -> list[Probe]:
    """The mode's required probes that failed, less those the user chose to go without."""
    by_name = {p.name: p for p in probes}
    return [by_name[n] for n in MODE_REQUIRES[mode] if n not in without and not by_name[n].ok]


def _print_table(probes: list[Probe], mode: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    needed = set(MODE_REQUIRES[mode])
    table = Table(title=f"scalelab doctor (mode: {mode})")
    table.add_column("component")
    table.add_column("status")
    table.add_column("details", overflow="fold")
    for p in probes:
        status = "ok" if p.ok else ("MISSING" if p.name in needed else "absent")
        style = "green" if p.ok else ("bold red" if p.name in needed else "yellow")
        table.add_row(p.name, f"[{style}]{status}[/]", escape(p.detail))  # 'x[gpu]' is text
    Console(width=max(100, shutil.get_terminal_size().columns)).print(table)


def cmd_doctor(args: argparse.Namespace) -> int:
    probes = run_probes()
    missing = missing_for(args.mode, probes, args.without)
    if args.json:
        print(
            json.dumps(
                {
                    "mode": args.mode,
                    "ok": not missing,
                    "missing": [p.name for p in missing],
                    "probes": [asdict(p) for p in probes],
                },
                indent=2,
            )
        )
    else:
        _print_table(probes, args.mode)
    for p in missing:
        print(
            f"missing for --mode {args.mode}: {p.name} ({p.detail}); fix: {p.fix}", file=sys.stderr
        )
    if not missing and not args.json:
        print(f"mode {args.mode}: ready")
    return 1 if missing else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="check what this machine offers the pipeline",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--mode",
        choices=sorted(MODE_REQUIRES),
        default="local",
        help="what you want to run: local (default), slurm or container",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--without",
        action="append",
        default=[],
        metavar="COMPONENT",
        choices=sorted({n for need in MODE_REQUIRES.values() for n in need}),
        help="a component the mode may go without (repeatable); setup.sh passes "
        "--without horovod where it could not build Horovod",
    )
    p.set_defaults(func=cmd_doctor)
