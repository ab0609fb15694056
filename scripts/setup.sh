#!/usr/bin/env bash
# Set up a fresh Debian machine for noether_dist: Python packages (torch pinned to the CPU
# build 2.13.0, the upper end of the supported range), the package itself in editable mode
# with its test extra, the system packages the integration tests use (slurm, munge,
# iproute2), and the cached Noether test environment (scripts/setup_noether_env.sh).
# Idempotent and quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore
if ! "$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
    "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
fi
here=$(pwd -P)
installed=$(cd / && "$PY" -c 'import noether_dist, moto, s3fs, yaml, numpy, pytest, xdist, os; print(os.path.dirname(os.path.dirname(os.path.realpath(noether_dist.__file__))))' 2>/dev/null || true)
if [ "$installed" != "$here" ]; then
    "$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    bash .ci/install_system.sh
fi
# The Noether test environment (Python 3.12, torch 2.11.0, emmiai-noether): built once, cached.
bash scripts/setup_noether_env.sh
