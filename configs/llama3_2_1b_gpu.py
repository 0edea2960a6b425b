"""Llama 3.2 1B (base) -> GSM8K instruct model on one GPU: 8 packed rows of 4,096 tokens per step.

    bash launch/gpu.sh configs/llama3_2_1b_gpu.py runs/llama1b
    python -m trainer.train --config configs/llama3_2_1b_gpu.py --dry_run --device_memory_gb 80

The reference shape of the README's "Performance" section (vocabulary 128,256, bf16 compute, float32
master weights and Adam moments). Layers are scanned; the loss never materialises the 4 GB of
[32k tokens, 128k vocabulary] logits.
"""

import os

from configs import qwen2_5_0_5b_gpu

MODEL = os.environ.get("HF_MODEL", "checkpoints/Llama-3.2-1B")


def get_config():
    c = qwen2_5_0_5b_gpu.get_config()
    c.model.hf_path = MODEL
    c.model.arch_json = "configs/hf/llama3_2_1b.json"
    c.data.template = "alpaca"       # the base model's tokenizer has no chat template
    c.data.max_length = 4096
    c.train.batch_size = 8
    c.train.eval_batch_size = 8
    c.optimizer.learning_rate = 1e-5
    c.eval.stop = ()
    return c
