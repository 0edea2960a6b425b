#!/usr/bin/env bash
# The four CPU shapes of the README's Performance table: ours vs PyTorch in one process, ROUNDS rounds
# (default 5) in which the sides take turns; REPEATS processes per shape (default 1).
#   [ROUNDS=5] [REPEATS=1] bash launch/cpu_bench.sh [OUTDIR]      (JSON rows in OUTDIR, default runs/cpu_bench)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/cpu_bench}; mkdir -p "$out"
PY=${PYTHON:-python}
L7="--config.model.hidden_size=256 --config.model.intermediate_size=688 --config.model.num_hidden_layers=4 --config.model.num_attention_heads=8 --config.model.num_key_value_heads=8 --config.model.head_dim=32 --config.model.tie_word_embeddings=False"
L33="--config.model.hidden_size=512 --config.model.intermediate_size=2048 --config.model.num_hidden_layers=6 --config.model.num_attention_heads=8 --config.model.num_key_value_heads=8 --config.model.head_dim=64 --config.model.tie_word_embeddings=False"
R="--rounds ${ROUNDS:-5}"
for r in $(seq 1 "${REPEATS:-1}"); do
  $PY -m trainer.bench --config configs/demo.py --batch 16 --seq 128 --steps 5 --vocab 512 $R --json "$out/demo512_$r.json"
  $PY -m trainer.bench --config configs/demo.py --batch 16 --seq 128 --steps 5 --vocab 32000 $R --json "$out/demo32k_$r.json"
  $PY -m trainer.bench --config configs/demo.py $L7 --config.data.max_length=256 --batch 8 --seq 256 --steps 3 --vocab 8000 $R --json "$out/l7m_$r.json"
  $PY -m trainer.bench --config configs/demo.py $L33 --config.data.max_length=512 --batch 4 --seq 512 --steps 3 --vocab 8000 $R --json "$out/l33m_$r.json"
done
