#!/usr/bin/env bash
# Throughput and MFU of the train step on one GPU, for the Llama-3.2-1B-shaped preset (random weights
# of its architecture: no checkpoint needed), with each GPU attention kernel under remat
# dots_with_context and dots; attention alone (trainer.benchmarks.attention_kernels); the GPU-only
# kernel tests; the dry run on the device. Writes JSON rows to $OUT (default runs/gpu_bench).
#
#   bash launch/gpu_bench.sh [extra trainer.bench flags]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
run() {  # name, then trainer.bench flags
  name=$1; shift
  timeout 240 $PY -m trainer.bench --config configs/llama3_2_1b_gpu.py --batch 8 --seq 4096 --steps 5 \
    --notorch --json "$OUT/$name.json" "$@" 2>&1 | grep -v "^WARNING\|^I0000\|^E0000" | tail -8
}
for remat in dots_with_context dots; do
  run flash_$remat --config.model.attention_impl=flash --config.model.remat=$remat "$@"
  run cudnn_$remat --config.model.attention_impl=cudnn --config.data.packing=none --config.model.remat=$remat "$@"
  if [ $remat = dots_with_context ]; then  # attention alone: XLA, cuDNN, the Pallas kernel's block sizes
    timeout 200 $PY -m trainer.benchmarks.attention_kernels --json "$OUT/attention_kernels.json" 2>&1 \
      | grep -v "^WARNING\|^I0000\|^E0000"
  fi
done
JAX_PLATFORMS=cuda timeout 200 $PY -m pytest -q -p no:cacheprovider tests/attention_test.py \
  -k "gpu or forward_once" 2>&1 | tail -15
# The ahead-of-time check on the real device (its compiler's memory numbers), against 80 GB.
timeout 150 $PY -m trainer.train --config configs/llama3_2_1b_gpu.py --dry_run --device_memory_gb 80 2>&1 \
  | grep -v "^WARNING\|^I0000\|^E0000" | tail -8
