#!/usr/bin/env bash
# Create (once, cached between runs) the Noether test environment: Python 3.12 from pyenv,
# torch 2.11.0 (the CUDA build from the package index, ~2.6 GB; it runs on CPU), the real
# emmiai-noether 2026.4.0 installed --no-deps plus what it imports at run time, our runtime
# and test dependencies; then, on every run (cheap), this checkout with --no-deps -e .
# Path: `bash scripts/noether_env.sh`. A complete environment is never rebuilt; `--check`
# only says whether it is complete.
#
# Crash safety: the environment is built at its final path (a venv's scripts hold that path
# in their shebangs, so it cannot be moved afterwards) under a lock, with a marker file
# .noether-dist-building that is removed only when everything is installed. A folder that
# still holds that marker (a killed build) or fails the import check is removed and built
# again. A folder without the marker that passes the import check is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/noether_env.sh
ENV=$NOETHER_ENV_DIR
BUILDING="$ENV/.noether-dist-building"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

env_complete() {
    [ -x "$ENV/bin/python" ] && [ ! -e "$BUILDING" ] || return 1
    (cd / && env -u PYTHONPATH "$ENV/bin/python" - "$NOETHER_ENV_PYTHON" "$NOETHER_ENV_TORCH" "$NOETHER_ENV_NOETHER" "$NOETHER_ENV_NUMPY") <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
py, torch_v, noether_v, numpy_v = sys.argv[1:]
assert "%d.%d" % sys.version_info[:2] == py
import torch, noether, numpy, pydantic, hydra, omegaconf, yaml, einops, psutil, tqdm, packaging, attrs
import fsspec, s3fs, pytest, moto, moto.server
assert torch.__version__.split("+")[0] == torch_v, torch.__version__
assert version("emmiai-noether") == noether_v
assert numpy.__version__ == numpy_v
PY
}

find_python() {
    local root cand
    if command -v pyenv >/dev/null 2>&1 && root=$(pyenv root 2>/dev/null); then
        for cand in $(ls -d "$root"/versions/"$NOETHER_ENV_PYTHON"* 2>/dev/null | sort -rV); do
            if [ -x "$cand/bin/python$NOETHER_ENV_PYTHON" ]; then echo "$cand/bin/python$NOETHER_ENV_PYTHON"; return; fi
        done
    fi
    for cand in "python$NOETHER_ENV_PYTHON" python3; do
        if "$cand" -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$NOETHER_ENV_PYTHON')" 2>/dev/null; then
            command -v "$cand"; return
        fi
    done
    echo "setup_noether_env: no Python $NOETHER_ENV_PYTHON found (neither \$(pyenv root)/versions/$NOETHER_ENV_PYTHON* nor python$NOETHER_ENV_PYTHON on PATH); install one, e.g. 'pyenv install $NOETHER_ENV_PYTHON'" >&2
    exit 1
}

quiet_pip() {  # pip's output without the notes about index folders this machine lacks
    grep -v "^WARNING: Location 'file:" || true
}

build() {
    local python
    python=$(find_python)
    echo "setup_noether_env: building $ENV with $python (torch $NOETHER_ENV_TORCH is a ~2.6 GB download)" >&2
    rm -rf "$ENV"
    mkdir -p "$ENV"
    touch "$BUILDING"
    "$python" -m venv "$ENV"
    # torch and what Noether imports at run time (its full dependency list pulls in pyvista,
    # h5py, aistore, ... that a training run does not use), our runtime and test
    # dependencies; then Noether itself without its dependencies (pip then lists the ones
    # left out: expected).
    "$ENV/bin/python" -m pip install -q --no-cache-dir "torch==$NOETHER_ENV_TORCH" "numpy==$NOETHER_ENV_NUMPY" \
        pydantic hydra-core omegaconf pyyaml einops psutil tqdm packaging attrs fsspec s3fs isal pytest "moto[server]" \
        setuptools 2>&1 | quiet_pip
    "$ENV/bin/python" -m pip install -q --no-cache-dir --no-deps "emmiai-noether==$NOETHER_ENV_NOETHER" 2>&1 | quiet_pip
    rm -f "$BUILDING"
}

if [ "${1:-}" = "--check" ]; then  # only tell: exit 0 when the environment is complete
    env_complete && echo "complete: $ENV" || { echo "missing or incomplete: $ENV"; exit 1; }
    exit 0
fi
mkdir -p "$(dirname "$ENV")"
exec 9>"$ENV.lock"
flock -w 1800 9 || { echo "setup_noether_env: another setup held $ENV.lock for 30 minutes" >&2; exit 1; }
if env_complete; then
    :
else
    build
    env_complete || { echo "setup_noether_env: $ENV was built but fails its import check" >&2; exit 1; }
fi
# Runtime dependencies added since an environment was built are installed into it (cheap),
# rather than rebuilding the whole environment.
(cd / && env -u PYTHONPATH "$ENV/bin/python" -c "import isal" 2>/dev/null) \
    || "$ENV/bin/python" -m pip install -q --no-cache-dir isal 2>&1 | quiet_pip
# This checkout, editable and without dependencies (the environment has them): cheap, every run.
here=$(pwd -P)
where_installed() {
    (cd / && env -u PYTHONPATH "$ENV/bin/python" -c \
        'import os, noether, noether_dist; print(os.path.dirname(os.path.dirname(os.path.realpath(noether_dist.__file__))))' \
        2>/dev/null) || true
}
if [ "$(where_installed)" != "$here" ]; then
    "$ENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
    [ "$(where_installed)" = "$here" ] || {
        echo "setup_noether_env: noether_dist (from $here) and noether do not import together in $ENV" >&2; exit 1; }
fi
