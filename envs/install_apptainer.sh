#!/usr/bin/env bash
# Install Apptainer (default 1.4.5) from Debian's own packages, for the TEST environment only.
#
# Called by envs/test_env.sh (`./setup.sh --test-env`, as CI does); never run on a user's
# machine unasked: it puts binaries into system paths. Users install Apptainer the way
# their site does (https://apptainer.org/docs/admin/main/installation.html).
#
# Why this way: Apptainer is neither in Debian 12 (bookworm) nor on PyPI, but Debian's
# unstable suite packages it. Its binaries need a newer glibc (2.38) than bookworm's (2.36),
# and installing unstable's libc6 would replace the system's C library. So:
#   1. a temporary apt configuration for the unstable suite only DOWNLOADS the apptainer and
#      libc6 packages (nothing from unstable is installed);
#   2. `dpkg -x` unpacks both; the unpacked glibc goes to a private directory ($GLIBC_DIR);
#   3. patchelf points apptainer's two ELF programs (apptainer, starter) at that private
#      loader and library path; the rest of the system keeps its own libc;
#   4. the files go to the system paths the binary has compiled in (/etc/apptainer,
#      /usr/lib/x86_64-linux-gnu/apptainer, /usr/bin/apptainer).
# The mirror is read at run time from this machine's apt sources; no host is written here.
# Idempotent: a working apptainer of the wanted version makes it exit at once.
#
# Env: APPTAINER_VERSION (1.4.5), SCALELAB_DEBIAN_MIRROR (override the mirror URI),
#      GLIBC_DIR (/opt/scalelab/apptainer-glibc)
set -euo pipefail

want="${APPTAINER_VERSION:-1.4.5}"
glibc_dir="${GLIBC_DIR:-/opt/scalelab/apptainer-glibc}"
arch_lib=usr/lib/x86_64-linux-gnu

say() { echo "install_apptainer: $*"; }
die() { echo "install_apptainer: error: $*" >&2; exit 1; }

if command -v apptainer >/dev/null 2>&1; then
  have="$(apptainer --version 2>/dev/null | awk '{print $NF}')" || have=""
  if [ "$have" = "$want" ]; then
    say "apptainer $have already installed ($(command -v apptainer))"
    exit 0
  fi
  [ -n "$have" ] && die "apptainer $have is installed ($(command -v apptainer)); this script installs $want only where none is present"
fi

[ "$(id -u)" -eq 0 ] || die "run as root (it writes /usr/bin/apptainer and /etc/apptainer)"
[ "$(dpkg --print-architecture)" = amd64 ] || die "only amd64 is handled (got $(dpkg --print-architecture))"

# The Debian mirror this machine already uses: deb822 .sources files first, then sources.list.
mirror_uri() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # The first URIs: line of a stanza whose suites are not *-security.
    uri="$(awk 'BEGIN{RS=""; FS="\n"}
      { u=""; s="";
        for (i=1;i<=NF;i++) { if ($i ~ /^URIs:/) u=$i; if ($i ~ /^Suites:/) s=$i }
        if (u != "" && s !~ /-security/) { sub(/^URIs:[ \t]*/, "", u); split(u, a, /[ \t]+/); print a[1]; exit } }' "$f")"
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri="$(awk '$1=="deb" && $0 !~ /-security/ { for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "$f")"
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
}

mirror="${SCALELAB_DEBIAN_MIRROR:-$(mirror_uri)}"
[ -n "$mirror" ] || die "no Debian mirror found in /etc/apt/sources.list*; set SCALELAB_DEBIAN_MIRROR"
if [ -r /etc/os-release ] && ! grep -q '^ID=debian' /etc/os-release && [ -z "${SCALELAB_DEBIAN_MIRROR:-}" ]; then
  die "this machine's apt sources are not Debian's; set SCALELAB_DEBIAN_MIRROR to a Debian mirror URI"
fi

helpers=(squashfs-tools uidmap fuse2fs squashfuse fuse-overlayfs debootstrap patchelf libseccomp2
         containernetworking-plugins ca-certificates debian-archive-keyring)
missing=()
for p in "${helpers[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "bookworm helpers: ${missing[*]}"
  apt_wait=(-o DPkg::Lock::Timeout=900)   # other apt runs (e.g. the rest of test_env.sh)
  env DEBIAN_FRONTEND=noninteractive apt-get "${apt_wait[@]}" update -qq
  env DEBIAN_FRONTEND=noninteractive apt-get "${apt_wait[@]}" install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
fi

work="$(mktemp -d)"
chmod 755 "$work"   # apt fetches as user _apt
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/debs"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || die "$keyring missing (package debian-archive-keyring)"
echo "deb [signed-by=$keyring] $mirror unstable main" > "$work/unstable.list"
apt_tmp=(-o "Dir::Etc::SourceList=$work/unstable.list" -o Dir::Etc::SourceParts=/dev/null
         -o "Dir::State::Lists=$work/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=)
say "reading the unstable suite's package list from $mirror (download only, nothing installed)"
apt-get "${apt_tmp[@]}" update -qq
version="$(apt-cache "${apt_tmp[@]}" show apptainer 2>/dev/null | awk '/^Version:/{print $2}' \
           | grep -E "^${want//./\\.}-" | head -n1 || true)"
[ -n "$version" ] || die "the unstable suite has no apptainer $want (it has: $(apt-cache "${apt_tmp[@]}" show apptainer 2>/dev/null | awk '/^Version:/{print $2}' | tr '\n' ' '))"
(cd "$work/debs" && apt-get "${apt_tmp[@]}" download -qq "apptainer=$version" libc6)

dpkg -x "$work"/debs/apptainer_*.deb "$work/apptainer"
dpkg -x "$work"/debs/libc6_*.deb "$work/libc6"
[ -e "$work/libc6/$arch_lib/ld-linux-x86-64.so.2" ] || die "libc6 package has no $arch_lib/ld-linux-x86-64.so.2"

say "private glibc $(ls "$work"/debs/libc6_*.deb | sed 's/.*libc6_\(.*\)_amd64.deb/\1/') in $glibc_dir (the system libc is untouched)"
rm -rf "$glibc_dir.new"
mkdir -p "$(dirname "$glibc_dir")"
cp -a "$work/libc6/$arch_lib" "$glibc_dir.new"
rm -rf "$glibc_dir"
mv "$glibc_dir.new" "$glibc_dir"

for elf in usr/bin/apptainer "$arch_lib/apptainer/bin/starter"; do
  [ -f "$work/apptainer/$elf" ] || die "apptainer package has no $elf"
  patchelf --set-interpreter "$glibc_dir/ld-linux-x86-64.so.2" --set-rpath "$glibc_dir" \
    "$work/apptainer/$elf"
done

say "apptainer $version into /usr/bin, /$arch_lib/apptainer, /etc/apptainer"
mkdir -p /etc/apptainer "/$arch_lib/apptainer"
cp -a "$work/apptainer/etc/apptainer/." /etc/apptainer/
cp -a "$work/apptainer/$arch_lib/apptainer/." "/$arch_lib/apptainer/"
install -m 0755 "$work/apptainer/usr/bin/apptainer" /usr/bin/apptainer.new
mv /usr/bin/apptainer.new /usr/bin/apptainer
mkdir -p /var/lib/apptainer/mnt/session

# Root builds the image's %post in a user namespace that maps ids 0-65535 onto themselves
# (`unshare --user --map-users=0,0,65536`, see `scalelab container build`), so files of the
# root-owned base stay writable there: newuidmap needs that range for root.
for f in /etc/subuid /etc/subgid; do
  grep -qx 'root:0:65536' "$f" 2>/dev/null || echo "root:0:65536" >> "$f"
done

apptainer --version >/dev/null || die "the installed apptainer does not run"
say "$(apptainer --version) ($(command -v apptainer)); root runs images with --userns here"
