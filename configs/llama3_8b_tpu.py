"""Llama 3.1 8B (base) -> GSM8K instruct model on a TPU pod slice (v5p-64, v6e-256), fully sharded.

Convert the base once (a sharded Orbax checkpoint every host reads by chunk), check the fit with the
TPU compiler, then launch (README, "Scaling out"):

    python -m trainer.convert --config configs/llama3_8b_tpu.py --hf_path /models/Meta-Llama-3.1-8B \
        --out gs://bucket/bases/llama3_1_8b
    python -m trainer.train --config configs/llama3_8b_tpu.py --dry_run --topology v5p:4x4x2
    HF_MODEL=gs://bucket/bases/llama3_1_8b TPU_NAME=... ZONE=... \
        bash launch/tpu_pod.sh configs/llama3_8b_tpu.py gs://bucket/runs/llama8b

256 rows of 2,048 tokens per step divide over every slice from v5p-8 (4 chips) to v6e-256; on slices
of 8 chips or fewer the step does not fit as it is: accumulate (e.g. --config.train.grad_accum_steps=8
--config.model.remat=full) and check with --dry_run --topology.

FSDP over every chip: parameters, gradients and Adam moments are split across the slice; the batch
is split over the same axis. The base model's tokenizer has no chat template, so the prompt format is
Alpaca's (ending each reply with EOS).
"""

import os

from configs import qwen2_5_0_5b_gpu

MODEL = os.environ.get("HF_MODEL", "/mnt/disks/models/Meta-Llama-3.1-8B")


def get_config():
    c = qwen2_5_0_5b_gpu.get_config()
    c.model.hf_path = MODEL
    c.model.arch_json = "configs/hf/llama3_1_8b.json"
    c.data.template = "alpaca"
    # dots_with_context: keep the matmul outputs and splash's output and log-sum-exp, recompute the
    # rest (not attention's forward). The TPU compiler says the train step fits on a v5p-64 (68.8 of
    # 95 GB per chip; "dots", which runs splash's forward again in the backward, 64.4) and a v6e-256
    # (17.2 of 32 GB); "full" needs 23.1 / 6.9 GB but recomputes every block (about 25% more FLOPs).
    # On 8 chips or fewer, see the module docstring.
    c.model.remat = "dots_with_context"
    c.data.max_length = 2048
    c.optimizer.learning_rate = 1e-5
    # 256 rows of 2,048 tokens divide over every slice from v5p-8 to v6e-256 (1 row per chip there);
    # no accumulation: under FSDP a bigger per-chip batch costs memory, not extra gathers.
    c.train.batch_size = 256
    c.train.grad_accum_steps = 1
    c.train.eval_batch_size = 256
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.eval.batch_size = 256  # divides every slice: on a v6e-256, 128 rows would be replicated (56 GB of KV cache)
    c.eval.stop = ()
    return c
