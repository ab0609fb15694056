#!/usr/bin/env bash
# Install the system packages needed by the noether_dist integration tests
# (a single-node Slurm cluster with munge, and iproute2 for network namespaces).
#
# Idempotent: does nothing when every package is already installed, runs
# `apt-get update` only when the package lists are missing or lack a candidate
# (or when a first install attempt fails), and keeps output quiet.
# Must run as root on Debian 12 (bookworm). Exits non-zero on failure.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge iproute2 procps)

log() { echo "install_system: $*" >&2; }

if [[ "$(id -u)" -ne 0 ]]; then
    log "must be run as root"
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    log "apt-get not found (Debian/Ubuntu required)"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == "installed" ]]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    is_installed "$pkg" || missing+=("$pkg")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

has_candidate() {
    local cand
    cand="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')"
    [[ -n "$cand" && "$cand" != "(none)" ]]
}

# apt/dpkg/debconf chatter goes to a log that is shown only on failure.
APT_LOG="$(mktemp -t install_system.XXXXXX.log)"
trap 'rm -f "$APT_LOG"' EXIT
show_log() { tail -n 40 "$APT_LOG" >&2 || true; }

updated=0
apt_update() {
    log "running apt-get update"
    if ! apt-get update -qq >>"$APT_LOG" 2>&1; then
        show_log
        log "apt-get update failed"
        exit 1
    fi
    updated=1
}

for pkg in "${missing[@]}"; do
    if ! has_candidate "$pkg"; then
        apt_update
        break
    fi
done

apt_install() {
    apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Use-Pty=0 "${missing[@]}" >>"$APT_LOG" 2>&1
}

log "installing: ${missing[*]}"
if ! apt_install; then
    if [[ $updated -eq 1 ]]; then
        show_log
        log "apt-get install failed"
        exit 1
    fi
    # Stale package lists are the usual cause (404 on an old .deb): refresh once.
    apt_update
    apt_install || { show_log; log "apt-get install failed"; exit 1; }
fi

for pkg in "${missing[@]}"; do
    if ! is_installed "$pkg"; then
        log "package $pkg is not installed after apt-get install"
        exit 1
    fi
done
log "done"
