"""Gemma 2 2B (base) -> GSM8K instruct model on one GPU (80 GB; FSDP over several GPUs also works:
``--config.mesh.data=1 --config.mesh.fsdp=-1``).

Edit the two paths (or set HF_MODEL / FLAX_IFT_DATA), then see ``configs/qwen2_5_0_5b_gpu.py`` for the
commands. Gemma 2 soft-caps attention logits, so attention runs the written-out (XLA) path.
"""

import os

from configs import qwen2_5_0_5b_gpu

MODEL = os.environ.get("HF_MODEL", "checkpoints/gemma-2-2b")


def get_config():
    c = qwen2_5_0_5b_gpu.get_config()
    c.model.hf_path = MODEL
    c.model.arch_json = "configs/hf/gemma2_2b.json"
    c.data.template = "tokenizer"  # Gemma's own <start_of_turn> template
    c.data.end_of_turn = "<end_of_turn>"
    c.model.remat = "dots"  # the soft-capped attention keeps [heads, seq, seq] scores otherwise
    c.optimizer.learning_rate = 1e-5
    c.train.batch_size = 8
    c.train.grad_accum_steps = 2
    c.eval.stop = ("<end_of_turn>",)
    return c
