#!/usr/bin/env bash
# The test suite's "site MPI module": Debian's Open MPI 4.1.4 (built against the system's
# PMIx, the one Slurm's pmix plugin uses), unpacked into a prefix of its own as a site's
# module tree would be, never onto the system's library path: a second libmpi.so.40 there
# would be found by the lock's mpi4py wheel in every other test.
#   /opt/site-openmpi/usr/...   the packages' files (Debian's layout, relocated by OPAL_PREFIX)
#   /opt/site-openmpi/bin/      mpicc, mpicxx, mpirun, mpiexec (what `module load` puts on PATH)
#   /opt/site-openmpi/env.sh    the module: PATH, LD_LIBRARY_PATH, OPAL_PREFIX
# Used by tests/test_site_mpi.py to test envs/use_site_mpi.sh across the test cluster.
# Idempotent; needs apt-get (download only: nothing is installed) and dpkg-deb.
set -euo pipefail
prefix="${SITE_MPI_PREFIX:-/opt/site-openmpi}"
if [ -x "$prefix/bin/mpicc" ] && [ -f "$prefix/env.sh" ]; then
  echo "install_site_mpi: present in $prefix"
  exit 0
fi
debs=(libopenmpi3 openmpi-bin openmpi-common libopenmpi-dev libfabric1 libibverbs1 librdmacm1
      libucx0 libpsm2-2 libpsm-infinipath1 libnl-3-200 libnl-route-3-200 libgfortran5)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
fetch() { (cd "$work" && apt-get download -qq "${debs[@]}" 2>&1 | grep -v "unsandboxed" || true); }
fetch
if ! ls "$work"/libopenmpi3_*.deb >/dev/null 2>&1; then
  apt-get update -qq  # no package lists yet on this machine
  fetch
fi
ls "$work"/libopenmpi3_*.deb >/dev/null
rm -rf "$prefix.tmp"
mkdir -p "$prefix.tmp/bin"
for d in "$work"/*.deb; do dpkg-deb -x "$d" "$prefix.tmp"; done
usr="$prefix/usr"
for t in mpicc mpicxx mpic++ mpirun mpiexec; do
  ln -s "$usr/bin/$t.openmpi" "$prefix.tmp/bin/$t"
done
lib="$usr/lib/$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo "$(uname -m)-linux-gnu")"
cat > "$prefix.tmp/env.sh" <<ENV
# The site MPI module (envs/install_site_mpi.sh): source it, as \`module load openmpi\` would.
export PATH="$prefix/bin:$usr/bin\${PATH:+:\$PATH}"
export LD_LIBRARY_PATH="$lib:$lib/openmpi/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export OPAL_PREFIX="$usr"
# Components for fabrics this machine lacks (EFA, PSM, netlink) fail to load, harmlessly.
export OMPI_MCA_mca_base_component_show_load_errors=0
ENV
rm -rf "$prefix"
mv "$prefix.tmp" "$prefix"
# shellcheck disable=SC1091
(. "$prefix/env.sh" && mpicc --showme:version && mpirun --version | head -n1)
