#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every host; jax.distributed finds its peers itself.
# The workdir must be on storage every host sees (a gs:// bucket or a shared filesystem).
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
