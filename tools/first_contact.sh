#!/usr/bin/env bash
# A new user's first contact, for real: a clean clone of this checkout's HEAD, set up with
# another Python and pip reading only PyPI (no local wheel directory, no extra index, no
# Horovod wheel cache), then the README's main job. Prints the time and the download size.
# Takes 20 to 30 minutes (PyPI's torch is the CUDA build: about 4 GB), so it is not in CI.
#
# Usage: tools/first_contact.sh PYTHON [WORKDIR]
#   PYTHON   the interpreter, e.g. "$(pyenv root)/versions/3.13.0/bin/python3"
#   WORKDIR  where the clone, pip's cache and the wheel cache go (default: a new temp dir);
#            it is kept, so the venv can be inspected afterwards
# Env: PIP_CERT is kept (a TLS-intercepting proxy's CA bundle); every other PIP_* is dropped.
set -euo pipefail
python="${1:?usage: tools/first_contact.sh PYTHON [WORKDIR]}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${2:-$(mktemp -d -t scalelab-first-contact.XXXXXX)}"
mkdir -p "$work"
git clone --quiet "$repo" "$work/scalelab"
conf="$work/pip.conf"
printf '[global]\n' > "$conf"
[ -n "${PIP_CERT:-}" ] && printf 'cert = %s\n' "$PIP_CERT" >> "$conf"
clean_env=(env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_NO_INDEX
           PIP_CONFIG_FILE="$conf" PIP_CACHE_DIR="$work/pip-cache"
           SCALELAB_CACHE="$work/scalelab-cache" PYTHON="$python")
echo "first contact: $("$python" --version) ($python), pip reading only PyPI, in $work/scalelab"
rx_bytes() {  # bytes received on every interface but loopback (other traffic included)
  awk -F'[: ]+' 'NR > 2 && $2 != "lo" {s += $3} END {printf "%.0f", s}' /proc/net/dev
}
rx0=$(rx_bytes)
start=$(date +%s)
rc=0
(cd "$work/scalelab" && "${clean_env[@]}" ./setup.sh) > "$work/setup.log" 2>&1 || rc=$?
end=$(date +%s)
download_mb=$(( ($(rx_bytes) - rx0) / 1000000 ))
venv_mb=$(du -sm "$work/scalelab/.venv" 2>/dev/null | awk '{print $1}')
grep -E '^(==>|setup.sh:)' "$work/setup.log" || true
echo "first contact: exit $rc after $(( (end - start) / 60 )) min $(( (end - start) % 60 )) s;" \
     "received ${download_mb} MB over the network (this machine's interfaces, other traffic" \
     "included), .venv ${venv_mb:-0} MB; log: $work/setup.log"
exit "$rc"
