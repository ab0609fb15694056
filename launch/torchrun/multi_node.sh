#!/usr/bin/env bash
# The reference trainer on SEVERAL machines with torchrun (c10d rendezvous). Run this script
# once on every machine, with the same settings (only LOCAL_ADDR differs):
#
#   # on every node (e.g. 2 nodes x 8 GPUs):
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node01:29400 RDZV_ID=exp42 \
#       OUTPUT_DIR=s3://bucket/exp bash launch/torchrun/multi_node.sh [key=value ...]
#
# The run id is torchrun-<RDZV_ID> (unless RUN_ID is set): launching again with the same
# RDZV_ID continues the run from its `latest` committed checkpoint (auto_resume=true), on any
# number of nodes (a checkpoint saved on N ranks loads on M ranks). The first node to reach
# RDZV_ENDPOINT's host hosts the rendezvous store; set RDZV_CONF=is_host=1 on that node and
# is_host=0 on the others when the host name does not tell (containers, network namespaces).
#
# Checkpoints must go where every node can read what it needs: a shared file system or
# s3://. With node-local disks, set checkpointer.node_local=true (each node then keeps a
# complete copy of the small shared files and resumes on the same placement).
#
# Preemption: send SIGUSR1 or SIGTERM to this script on ANY node (e.g. `kill -USR1 <pid>`):
# it passes SIGUSR1 on to the training processes on this node (the children of torchrun);
# all ranks agree at the next step boundary, save and commit one checkpoint together and
# exit 0. torchrun runs with SIGUSR1 ignored, because its elastic agent has no handler for
# SIGUSR1 (the default action kills it, which orphans the workers) and it kills its workers
# on SIGTERM/SIGINT/SIGHUP/SIGQUIT: signals for the workers must go to the workers.
set -euo pipefail

# ---- the options you edit (or set in the environment) -----------------------------------
NNODES=${NNODES:-2}                      # machines in the job (or MIN:MAX for elastic)
NPROC_PER_NODE=${NPROC_PER_NODE:-2}      # processes per machine (one per GPU)
RDZV_ENDPOINT=${RDZV_ENDPOINT:-}         # host:port of the rendezvous, reachable from every node
RDZV_ID=${RDZV_ID:-}                     # the same on every node; names the run (torchrun-<id>)
RDZV_CONF=${RDZV_CONF:-}                 # extra rendezvous settings, e.g. is_host=1,join_timeout=600
LOCAL_ADDR=${LOCAL_ADDR:-}               # this node's address as the others reach it (default: hostname)
ND_ROOT=${ND_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}   # the noether_dist checkout
CONFIG=${CONFIG:-$ND_ROOT/launch/configs/cpu_tiny.yaml}   # the trainer's YAML config
OUTPUT_DIR=${OUTPUT_DIR:-runs}           # shared path or s3://bucket/prefix
RUN_ID=${RUN_ID:-}                       # empty: torchrun-<RDZV_ID>
MAX_RESTARTS=${MAX_RESTARTS:-0}          # torchrun restarts of failed workers (they resume `latest`)
PYTHON=${PYTHON:-python3}                # the interpreter that has torch and noether_dist
SHUTDOWN_TIMEOUT_S=${SHUTDOWN_TIMEOUT_S:-600}   # after a SIGTERM to torchrun: seconds its workers get to save
                                         # before SIGKILL (cover one checkpoint; torch's default is 30)
# For gloo across machines with several interfaces: export GLOO_SOCKET_IFNAME=<interface>.
# --------------------------------------------------------------------------------------------

if [[ -z "$RDZV_ENDPOINT" || -z "$RDZV_ID" ]]; then
    echo "multi_node.sh: set RDZV_ENDPOINT=<host:port> and RDZV_ID=<id>, the same on every node" >&2
    exit 2
fi

run=(--nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --rdzv-backend c10d
     --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" --max-restarts "$MAX_RESTARTS")
[[ -n "$RDZV_CONF" ]] && run+=(--rdzv-conf "$RDZV_CONF")
[[ -n "$LOCAL_ADDR" ]] && run+=(--local-addr "$LOCAL_ADDR")
args=("output_dir=$OUTPUT_DIR" "auto_resume=true")
[[ -n "$RUN_ID" ]] && args+=("run_id=$RUN_ID")

# torchrun's agent, on SIGTERM to itself (`scancel --signal=TERM`, a drain, a stopped
# container), sends SIGTERM to the workers (they save at the next step) and SIGKILLs them after
# its shutdown timeout, which torchrun reads from here (torch 2.13; torch 2.11 keeps 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="$SHUTDOWN_TIMEOUT_S"

TORCHRUN_PID=
forward_to_workers() {
    echo "[multi_node.sh $(hostname)] got SIG$1: SIGUSR1 to the training processes (children of torchrun ${TORCHRUN_PID:-not started yet})" >&2
    [[ -n "$TORCHRUN_PID" ]] && pkill -USR1 -P "$TORCHRUN_PID" 2>/dev/null
    return 0
}
trap 'forward_to_workers USR1' USR1
trap 'forward_to_workers TERM' TERM

# SIGUSR1 ignored in torchrun (and, until the trainer installs its handler, in the workers).
( trap '' USR1; exec "$PYTHON" -m torch.distributed.run "${run[@]}" \
      -m noether_dist.trainer --config "$CONFIG" "${args[@]}" "$@" ) &
TORCHRUN_PID=$!
# `wait` returns early when a trapped signal arrives: wait again until torchrun has exited.
while kill -0 "$TORCHRUN_PID" 2>/dev/null; do
    wait "$TORCHRUN_PID" || true
done
wait "$TORCHRUN_PID"   # torchrun's exit status (bash keeps it): the script's status
