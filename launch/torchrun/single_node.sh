#!/usr/bin/env bash
# The reference trainer on ONE machine with torchrun (standalone rendezvous).
#
#   bash launch/torchrun/single_node.sh [key=value ...]          e.g. trainer.epochs=8
#   NPROC_PER_NODE=8 OUTPUT_DIR=s3://bucket/exp bash launch/torchrun/single_node.sh
#
# Continue a run (after a crash, a preemption, a reboot): launch again with the same RUN_ID;
# the trainer resumes that run's `latest` committed checkpoint (auto_resume=true).
#
# Preemption: send SIGUSR1 or SIGTERM to THIS script (kill -USR1 <pid of the script>). It
# passes SIGUSR1 on to the training processes (the children of torchrun); they agree at the
# next step boundary, save and commit one checkpoint together, and exit 0. torchrun itself
# is started with SIGUSR1 ignored: its elastic agent has no handler for SIGUSR1 (the default
# action would kill it and orphan the workers), and on SIGTERM/SIGINT/SIGHUP/SIGQUIT it kills
# its workers, so a signal meant for the workers must never be sent to torchrun itself.
# Ctrl-C (SIGINT) still aborts the run without a checkpoint.
set -euo pipefail

# ---- the options you edit (or set in the environment) -----------------------------------
NPROC_PER_NODE=${NPROC_PER_NODE:-2}      # processes on this machine (one per GPU)
ND_ROOT=${ND_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}   # the noether_dist checkout
CONFIG=${CONFIG:-$ND_ROOT/launch/configs/cpu_tiny.yaml}   # the trainer's YAML config
OUTPUT_DIR=${OUTPUT_DIR:-runs}           # local path, file://..., or s3://bucket/prefix
RUN_ID=${RUN_ID:-}                       # empty: a new run (date + random); set: continue that run
PYTHON=${PYTHON:-python3}                # the interpreter that has torch and noether_dist
SHUTDOWN_TIMEOUT_S=${SHUTDOWN_TIMEOUT_S:-600}   # after a SIGTERM to torchrun: seconds its workers get to save
                                         # before SIGKILL (cover one checkpoint; torch's default is 30)
# --------------------------------------------------------------------------------------------

args=("output_dir=$OUTPUT_DIR")
if [[ -n "$RUN_ID" ]]; then
    args+=("run_id=$RUN_ID" "auto_resume=true")
fi

# torchrun's agent, on SIGTERM to itself (`scancel --signal=TERM`, a drain, a stopped
# container), sends SIGTERM to the workers (they save at the next step) and SIGKILLs them after
# its shutdown timeout, which torchrun reads from here (torch 2.13; torch 2.11 keeps 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="$SHUTDOWN_TIMEOUT_S"

TORCHRUN_PID=
forward_to_workers() {
    echo "[single_node.sh $(hostname)] got SIG$1: SIGUSR1 to the training processes (children of torchrun ${TORCHRUN_PID:-not started yet})" >&2
    [[ -n "$TORCHRUN_PID" ]] && pkill -USR1 -P "$TORCHRUN_PID" 2>/dev/null
    return 0
}
trap 'forward_to_workers USR1' USR1
trap 'forward_to_workers TERM' TERM

# SIGUSR1 ignored in torchrun (and, until the trainer installs its handler, in the workers).
( trap '' USR1; exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC_PER_NODE" \
      --max-restarts 0 -m noether_dist.trainer --config "$CONFIG" "${args[@]}" "$@" ) &
TORCHRUN_PID=$!
# `wait` returns early when a trapped signal arrives: wait again until torchrun has exited.
while kill -0 "$TORCHRUN_PID" 2>/dev/null; do
    wait "$TORCHRUN_PID" || true
done
wait "$TORCHRUN_PID"   # torchrun's exit status (bash keeps it): the script's status
