#!/usr/bin/env bash
# The Noether test environment's versions and path, in one place. Executed: prints the path.
# Sourced: sets NOETHER_ENV_* for scripts/setup_noether_env.sh and scripts/test.sh.
NOETHER_ENV_PYTHON=3.12
NOETHER_ENV_TORCH=2.11.0           # emmiai-noether 2026.4.0 pins it; the lower end of our torch range
NOETHER_ENV_NOETHER=2026.4.0
NOETHER_ENV_NUMPY=2.3.1            # emmiai-noether pins it
NOETHER_ENV_DIR="${NOETHER_DIST_CACHE:-$HOME/.cache/noether_dist}/py${NOETHER_ENV_PYTHON/./}-torch${NOETHER_ENV_TORCH}-noether${NOETHER_ENV_NOETHER}"
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "$NOETHER_ENV_DIR"
fi
