#!/usr/bin/env bash
# The demo: install, fine-tune a small Llama on the built-in synthetic tasks, evaluate it against
# zero-/few-shot prompting of the untrained base. Extra arguments go to trainer.train, e.g.
#   bash launch/demo.sh --config.train.num_steps=200
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORKDIR=${WORKDIR:-runs/demo}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
echo "== installing flax-ift into .venv"
python -m pip install -q --upgrade pip
python -m pip install -q -e .
start=$(date +%s)
echo "== fine-tuning (workdir $WORKDIR)"
python -m trainer.train --config configs/demo.py --workdir "$WORKDIR" "$@"
echo "== evaluating"
python -m trainer.eval --workdir "$WORKDIR"
echo "== train + eval took $(( $(date +%s) - start ))s"
