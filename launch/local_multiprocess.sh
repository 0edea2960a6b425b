#!/usr/bin/env bash
# Rehearse a multi-host run on one CPU machine: N processes (default 2), each with 2 virtual CPU
# devices, talking through gloo collectives, exactly as hosts of a pod slice would.
#   bash launch/local_multiprocess.sh configs/tiny.py runs/mp [--config.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
NPROC=${NPROC:-2}
PORT=${PORT:-$((20000 + RANDOM % 10000))}
[ -f .venv/bin/activate ] && . .venv/bin/activate
pids=()
for ((i = 0; i < NPROC; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}" JAX_PLATFORMS=cpu \
    python -m trainer.train --config "$CONFIG" --workdir "$WORKDIR" --distributed=explicit \
      --coordinator_address="127.0.0.1:$PORT" --num_processes="$NPROC" --process_id="$i" "$@" \
      > "${LOGDIR:-/tmp}/ift_process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
cat "${LOGDIR:-/tmp}/ift_process_0.log"
exit $status
