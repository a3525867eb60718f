#!/usr/bin/env bash
# What only the test suite needs, installed on request (`./setup.sh --test-env`, as CI does).
# Each step is idempotent: it does nothing where its tool is already present.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo_cmd=()
[ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
# The Slurm test cluster (slurmctld/slurmd in network namespaces, munge, PMIx for srun --mpi=pmix)
# and what builds Horovod and the tools the tests run. Never part of a plain ./setup.sh.
# docker-registry (the CNCF distribution 2.8), openssl (its test CA and the signing keys) and
# apache2-utils (htpasswd, bcrypt) serve tests/test_container_registry.py's real registry.
# charliecloud-runtime (0.31: ch-run) and squashfs-tools (unsquashfs) run the image as
# Charliecloud does in tests/test_container_charliecloud.py (the `charliecloud` metapackage
# would also pull docker.io and buildah through charliecloud-builders; no test needs them).
# podman (4.3.1) runs the same tree in tests/test_container_podman.py, installed without its
# recommends (buildah, slirp4netns, fuse-overlayfs, uidmap, catatonit: the tests run it as
# root on the host network with --rootfs, so none is needed); it pulls conmon, crun (its
# first choice of runtime) and golang-github-containers-common. runc is named too: crun 1.8
# refuses this machine's hybrid cgroup v1/v2 layout, and scalelab then runs podman with
# --runtime=runc (src/scalelab/container/podman.py).
apt_packages=(build-essential cmake python3-dev git slurm-wlm munge libpmix2 libpmix-dev
              iproute2 util-linux procps docker-registry openssl apache2-utils ca-certificates
              charliecloud-runtime squashfs-tools)
no_recommends=(podman runc)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing system packages for the test cluster: ${missing[*]}"
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
for p in "${no_recommends[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends "$p"
  fi
done
# Chromium (Debian's package) renders the Snakemake report headless in
# tests/test_report_headless.py.
if ! command -v chromium >/dev/null 2>&1; then
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
# Apptainer 1.4.5 from Debian's packages with a private glibc (see the script's header).
bash envs/install_apptainer.sh
# A "site MPI module" in its own prefix (Debian's Open MPI 4.1.4) for tests/test_site_mpi.py.
bash envs/install_site_mpi.sh
