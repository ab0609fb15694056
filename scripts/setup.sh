#!/usr/bin/env bash
# Set up a fresh Debian machine for noether_dist: Python packages (torch pinned to the CPU
# build 2.13.0), the package itself in editable mode with its test extra, and the system
# packages the integration tests use (slurm, munge, iproute2). Idempotent and quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
    "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
fi
if ! "$PY" -c 'import noether_dist, moto, s3fs, yaml, numpy, pytest' 2>/dev/null \
   || ! "$PY" -m pip show -q noether_dist >/dev/null 2>&1; then
    "$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    bash .ci/install_system.sh
fi
