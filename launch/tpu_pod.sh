#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every host; jax.distributed finds its peers itself.
# The workdir must be on storage every host sees: a gs:// bucket (every file of the run goes through
# trainer.io.paths / etils.epath and Orbax; install the `gcs` extra, pip install -e ".[gcs]") or a shared
# filesystem (e.g. Filestore mounted on every host).
#
# Spot/preemptible TPU VMs: create them with `--spot` (or queued resources with `--spot`). On a
# preemption notice GCE sends SIGTERM (about 30 s before the stop); JAX's preemption sync point and
# the SIGTERM handler make every host finish the same step, checkpoint it and exit 0. Rerun this
# script on the recreated slice to resume from that step.
#   TPU_NAME=my-v5e-64 ZONE=us-west4-a bash launch/tpu_pod.sh configs/demo.py gs://bucket/runs/x [--config...]
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO=${REPO:-https://github.com/flax-ift/flax-ift}
EXTRA="$*"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d flax-ift ] || git clone $REPO flax-ift
  cd flax-ift && git pull -q
  [ -x .venv/bin/python ] || python3 -m venv .venv
  . .venv/bin/activate && pip install -q -e . 'jax[tpu]'
  python -m trainer.train --config $CONFIG --workdir $WORKDIR --distributed=auto $EXTRA
"
