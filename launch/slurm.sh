#!/usr/bin/env bash
# SLURM: one task per node, all GPUs of a node to its task; jax.distributed reads SLURM's variables.
#   sbatch --nodes=2 launch/slurm.sh configs/demo.py /shared/runs/x [--config.key=value ...]
#SBATCH --job-name=flax-ift
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --output=flax-ift-%j.log
# Time limit: SLURM signals this script (B:) 120 s before it kills the job. The trap passes SIGTERM
# to srun, which passes it to every task; the trainer finishes its step, checkpoints it and exits 0;
# then the trap's `scontrol requeue` puts the job back in the queue, and the requeued job resumes at
# that checkpoint (same command). A preemption by a higher-priority job (PreemptMode=REQUEUE) sends
# SIGTERM the same way, and SLURM requeues it itself.
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
set -uo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# created beforehand on shared storage: pip install -c launch/constraints.txt -e ".[gcs]" "jax[cuda12]"
[ -f .venv/bin/activate ] && . .venv/bin/activate
stopping=0
on_term() {
  stopping=1
  echo "flax-ift: SIGTERM (time limit or preemption): the trainer checkpoints its step, then the job is requeued" >&2
  kill -TERM "$srun_pid" 2>/dev/null
}
trap on_term TERM HUP
# --kill-on-bad-exit: when one task fails, SLURM stops the others instead of letting them wait on a
# dead peer in a collective.
srun --kill-on-bad-exit=1 python -m trainer.train --config "$CONFIG" --workdir "$WORKDIR" \
  --distributed=auto "$@" &
srun_pid=$!
rc=0
wait "$srun_pid" || rc=$?
while kill -0 "$srun_pid" 2>/dev/null; do  # a trapped signal interrupted the wait: wait again
  rc=0
  wait "$srun_pid" || rc=$?
done
if ((stopping && rc == 0)); then
  echo "flax-ift: checkpoint saved; requeueing job ${SLURM_JOB_ID:?}" >&2
  scontrol requeue "$SLURM_JOB_ID" || rc=$?
fi
exit "$rc"
