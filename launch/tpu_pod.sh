#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every host; jax.distributed finds its peers itself.
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh [--print] CONFIG WORKDIR [--config...]
#
# Every host runs this repository at the commit checked out here (COMMIT, default `git rev-parse
# HEAD`: commit and push first), installed with the `gcs` extra (gs:// workdirs, base checkpoints)
# and the `tpu-aot` extra (jax[tpu]), every package at the version the tests last passed with
# (launch/constraints.txt): every host runs the same stack.
# The trainer runs detached from the ssh session (setsid + nohup: a dropped connection does not
# stop it), logging to ~/flax-ift.log on each host. JAX's persistent compilation cache lives under
# the workdir (gs:// works), so a restarted or requeued run does not compile again. Variables named
# in PASS_ENV (default: HF_MODEL SMOLLM2_GGUF HF_TOKEN) are passed on to every host.
# --print: show the command each host would run, and run nothing.
#
# The workdir must be on storage every host sees: a gs:// bucket or a shared filesystem.
# Spot/preemptible TPU VMs: on a preemption notice (SIGTERM, or a maintenance event) JAX's
# preemption sync point makes every host finish the same step, checkpoint it and exit 0; rerun this
# script on the recreated slice to resume from that step.
set -euo pipefail
PRINT=0
if [ "${1:-}" = "--print" ]; then PRINT=1; shift; fi
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
cd "$(dirname "$0")/.."
REPO=${REPO:-$(git remote get-url origin 2>/dev/null || echo https://github.com/flax-ift/flax-ift)}
COMMIT=${COMMIT:-$(git rev-parse HEAD)}
CACHE=${COMPILE_CACHE:-${WORKDIR%/}/compile_cache}
exports="export JAX_COMPILATION_CACHE_DIR=$(printf %q "$CACHE");"
for name in ${PASS_ENV:-HF_MODEL SMOLLM2_GGUF HF_TOKEN}; do
  if [ -n "${!name:-}" ]; then exports+=" export $name=$(printf %q "${!name}");"; fi
done
args=$(printf ' %q' "$@")
remote="set -e
[ -d flax-ift ] || git clone -q $(printf %q "$REPO") flax-ift
cd flax-ift && git fetch -q origin && git checkout -q --detach $COMMIT
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -c launch/constraints.txt -e '.[gcs,tpu-aot]'
$exports
setsid nohup .venv/bin/python -m trainer.train --config $(printf %q "$CONFIG") \
--workdir $(printf %q "$WORKDIR") --distributed=auto$args > ~/flax-ift.log 2>&1 < /dev/null &
echo \"\$(hostname): started (pid \$!), log ~/flax-ift.log\""
if ((PRINT)); then
  echo "# on every host of $TPU_NAME ($ZONE):"
  echo "$remote"
  exit 0
fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$remote"
echo "follow process 0: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=0 --command 'tail -f ~/flax-ift.log'"
