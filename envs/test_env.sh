#!/usr/bin/env bash
# What only the test suite needs, installed on request (`./setup.sh --test-env`, as CI does).
# Each step is idempotent: it does nothing where its tool is already present.
set -euo pipefail
cd "$(dirname "$0")/.."
