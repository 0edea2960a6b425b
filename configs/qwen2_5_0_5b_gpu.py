"""Qwen2.5-0.5B (base) -> GSM8K instruct model on one GPU.

Edit the two paths (or set HF_MODEL / FLAX_IFT_DATA), then:

    python -m data_pipeline.inspect --config configs/qwen2_5_0_5b_gpu.py
    bash launch/gpu.sh configs/qwen2_5_0_5b_gpu.py runs/qwen05b
    python -m trainer.eval --workdir runs/qwen05b
    python -m trainer.export --workdir runs/qwen05b --out exports/qwen05b-gsm8k

MODEL is a local Hugging Face directory (config.json, *.safetensors, tokenizer files), e.g. from
``huggingface-cli download Qwen/Qwen2.5-0.5B --local-dir ...``; nothing is downloaded at run time.
"""

import os

from configs import gsm8k

MODEL = os.environ.get("HF_MODEL", "checkpoints/Qwen2.5-0.5B")


def get_config():
    c = gsm8k.get_config()
    c.model.hf_path = MODEL
    c.model.arch_json = "configs/hf/qwen2_5_0_5b.json"  # its config.json, for --dry_run without it
    c.model.scan_layers = True        # compile time independent of depth
    # Under scan every layer's residuals are stacked: without remat the 1B preset needs 160 GB per
    # device (dry run); "dots_with_context" keeps the weight matmuls' outputs and attention's output
    # and log-sum-exp, and recomputes the rest (on an H200 at 8 x 4,096: 44.7% MFU with the Pallas
    # kernel on packed rows, 42.4% under "dots", for 50.1 GB against 47.8).
    c.model.remat = "dots_with_context"
    c.model.dtype = "bfloat16"        # compute; master weights and Adam moments stay float32
    c.model.param_dtype = "float32"
    c.tokenizer.kind = "hf"           # the model's own tokenizer (tokenizer.path "" = model.hf_path)
    c.data.template = "chatml"        # Qwen's tokenizer has <|im_start|>/<|im_end|>
    c.data.max_length = 1024
    c.data.packing = "best_fit"
    c.optimizer.learning_rate = 2e-5
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 0.0
    c.optimizer.b2 = 0.95
    c.train.num_steps = 1000
    c.train.batch_size = 16           # packed rows of 1024 tokens (~40 GSM8K examples per step)
    c.train.grad_accum_steps = 1
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.train.eval_batch_size = 32
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.eval.few_shot_k = 4
    c.eval.max_new_tokens = 320
    c.eval.batch_size = 64
    c.eval.stop = ("<|endoftext|>",)
    return c
