#!/usr/bin/env bash
# SLURM: one task per node, all GPUs of a node to its task; jax.distributed reads SLURM's variables.
#   sbatch --nodes=2 launch/slurm.sh configs/demo.py /shared/runs/x [--config.key=value ...]
#SBATCH --job-name=flax-ift
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --output=flax-ift-%j.log
# Preemption / time limit: SLURM sends SIGTERM to the tasks 120 s before it kills them; the trainer
# finishes its step, checkpoints it and exits 0, and the requeued job resumes there (same command).
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
. .venv/bin/activate  # created beforehand on shared storage: pip install -e . "jax[cuda12]"
# --kill-on-bad-exit: when one task fails, SLURM stops the others instead of letting them wait on a
# dead peer in a collective.
srun --kill-on-bad-exit=1 python -m trainer.train --config "$CONFIG" --workdir "$WORKDIR" --distributed=auto "$@"
