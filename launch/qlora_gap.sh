#!/usr/bin/env bash
# The QLoRA loss gap on the real SmolLM2-135M base (README, "LoRA and QLoRA"): LoRA on the float base
# vs int8 vs nf4, the same data, seed and steps; then each run's eval (base vs fine-tuned).
#   bash launch/qlora_gap.sh [runs/qlora]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/qlora}
for q in none int8 nf4; do
  extra=()
  [ "$q" != none ] && extra=(--config.lora.base_quant="$q")
  python -m trainer.train --config configs/smollm2_135m.py --workdir "$OUT/$q" \
    --config.lora.rank=16 --config.lora.alpha=32 --config.optimizer.learning_rate=5e-4 \
    --config.train.progress_bar=False "${extra[@]}"
  python -m trainer.eval --workdir "$OUT/$q" --checkpoint latest --baselines zero_shot --limit 200
done
