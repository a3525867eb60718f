#!/usr/bin/env bash
# What only the test suite needs, installed on request (`./setup.sh --test-env`, as CI does).
# Each step is idempotent: it does nothing where its tool is already present.
set -euo pipefail
cd "$(dirname "$0")/.."
# Apptainer 1.4.5 from Debian's packages with a private glibc (see the script's header).
bash envs/install_apptainer.sh
