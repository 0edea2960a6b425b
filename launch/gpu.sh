#!/usr/bin/env bash
# One machine with one (or several) NVIDIA GPUs. Installs JAX's CUDA build into .venv, then trains and
# evaluates. The mesh's `data` axis spans all local GPUs by default.
#   bash launch/gpu.sh configs/demo.py runs/gpu_demo [--config.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q -c launch/constraints.txt -e . "jax[cuda12]"  # the tested versions
# Let XLA take what it needs instead of 75% of the GPU up front (eval + train share the device).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
python -m trainer.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
python -m trainer.eval --workdir "$WORKDIR"
