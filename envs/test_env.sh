#!/usr/bin/env bash
# What only the test suite needs, installed on request (`./setup.sh --test-env`, as CI does).
# Each step is idempotent: it does nothing where its tool is already present.
set -euo pipefail
cd "$(dirname "$0")/.."
# Chromium (Debian's package) renders the Snakemake report headless in
# tests/test_report_headless.py.
if ! command -v chromium >/dev/null 2>&1; then
  sudo_cmd=()
  [ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
# Apptainer 1.4.5 from Debian's packages with a private glibc (see the script's header).
bash envs/install_apptainer.sh
