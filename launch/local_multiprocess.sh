#!/usr/bin/env bash
# Rehearse a multi-host run on one CPU machine: N processes (default 2), each with 2 virtual CPU
# devices, talking through gloo collectives, exactly as hosts of a pod slice would.
#   bash launch/local_multiprocess.sh configs/tiny.py runs/mp [--config.key=value ...]
# When one process fails the others are stopped at once (SIGTERM, then SIGKILL after 25 s), as a pod
# scheduler would: a survivor would otherwise wait on its dead peer in a collective. Ctrl-C or
# SIGTERM to this script is passed on to every process (each checkpoints its step and exits).
set -uo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
NPROC=${NPROC:-2}
PORT=${PORT:-$((20000 + RANDOM % 10000))}
[ -f .venv/bin/activate ] && . .venv/bin/activate
pids=()
stop_all() { kill -TERM "${pids[@]}" 2>/dev/null; }
trap 'stop_all' TERM INT
for ((i = 0; i < NPROC; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}" JAX_PLATFORMS=cpu \
    python -m trainer.train --config "$CONFIG" --workdir "$WORKDIR" --distributed=explicit \
      --coordinator_address="127.0.0.1:$PORT" --num_processes="$NPROC" --process_id="$i" "$@" \
      > "${LOGDIR:-/tmp}/ift_process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  wait -n -p done_pid "${running[@]}"; rc=$?
  [ -z "${done_pid:-}" ] && continue  # a trapped signal interrupted the wait
  running=("${running[@]/$done_pid}"); running=(${running[@]})
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "a process exited with status $rc: stopping the others" >&2
    stop_all
    ( sleep 25; kill -KILL "${pids[@]}" 2>/dev/null ) &
  fi
done
cat "${LOGDIR:-/tmp}/ift_process_0.log"
exit $status
