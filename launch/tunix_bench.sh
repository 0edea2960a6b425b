#!/usr/bin/env bash
# Ours vs Tunix's PeftTrainer step, and each side's model build + first step, at the three shapes of
# the README's Tunix table, each side in the same process, ROUNDS rounds (default 5) in which the sides
# take turns, REPEATS processes per shape (default 1; medians: python -m trainer.benchmarks.tunix_step OUTDIR):
#   [ROUNDS=5] [REPEATS=1] bash launch/tunix_bench.sh [OUTDIR]      (JSON rows in OUTDIR, default runs/tunix_bench)
#
# Tunix is a bench-only extra, installed here with --no-deps: google-tunix 0.1.7 declares
# safetensors<0.8, and the transformers this project locks (5.24) needs safetensors>=0.8, so pip
# cannot resolve both. The step timed here never touches safetensors (Tunix uses it for its checkpoint
# loader only); these are the modules its trainer and Llama 3 model import.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/tunix_bench}; mkdir -p "$out"
# the project's venv (launch/test.sh makes it) unless PYTHON says otherwise: a bare `python` may be
# the system one, and the pip install below would go there
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
$PY -m pip install -q --no-deps google-tunix==0.1.7 google-metrax==0.2.4 clu==0.0.12 wrapt==2.5.2 \
  jaxtyping==0.3.11 wadler-lindig==0.1.8 sentencepiece==0.2.3 perfetto==0.59.1
L7="--config.model.hidden_size=256 --config.model.intermediate_size=688 --config.model.num_hidden_layers=4 --config.model.num_attention_heads=8 --config.model.num_key_value_heads=8 --config.model.head_dim=32 --config.model.tie_word_embeddings=False"
L27="--config.model.hidden_size=512 --config.model.intermediate_size=1376 --config.model.num_hidden_layers=6 --config.model.num_attention_heads=8 --config.model.num_key_value_heads=8 --config.model.head_dim=64 --config.model.tie_word_embeddings=False"
SMOL="--config.model.hidden_size=576 --config.model.intermediate_size=1536 --config.model.num_hidden_layers=30 --config.model.num_attention_heads=9 --config.model.num_key_value_heads=3 --config.model.head_dim=64 --config.model.tie_word_embeddings=True --config.model.rope_theta=100000"
for r in $(seq 1 "${REPEATS:-1}"); do
  $PY -m trainer.bench --config configs/demo.py $L7 --config.data.max_length=256 --batch 8 --seq 256 --steps 3 --vocab 8000 --tunix --notorch --rounds ${ROUNDS:-5} --json "$out/l7m_$r.json"
  $PY -m trainer.bench --config configs/demo.py $L27 --config.data.max_length=512 --batch 4 --seq 512 --steps 3 --vocab 8000 --tunix --notorch --rounds ${ROUNDS:-5} --json "$out/l27m_$r.json"
  $PY -m trainer.bench --config configs/demo.py $SMOL --config.data.max_length=128 --batch 4 --seq 128 --steps 3 --vocab 49152 --tunix --notorch --rounds ${ROUNDS:-5} --json "$out/smollm2_$r.json"
  # the same with our layers scanned (one layer compiled, not 30)
  $PY -m trainer.bench --config configs/demo.py $SMOL --config.model.scan_layers=True --config.data.max_length=128 --batch 4 --seq 128 --steps 3 --vocab 49152 --tunix --notorch --rounds ${ROUNDS:-5} --json "$out/smollm2-scanned_$r.json"
done
