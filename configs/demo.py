"""The embedded default: a small Llama trained from scratch on the built-in synthetic tasks.

Needs no network and no files outside the repo; trains in a few minutes on 2 CPU cores.

    python -m trainer.train --config configs/demo.py --workdir runs/demo
    python -m trainer.eval --workdir runs/demo
"""

from ml_collections import ConfigDict

from data_pipeline import sources


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0  # model init (and thus the "base" model of the eval) and data order

    # ---- data (see data_pipeline/sources.py for every source key) -----------------------------
    c.data = ConfigDict()
    # name -> source. A mixture is several entries (with `weight`s); each row remembers its source.
    c.data.sources = ConfigDict({"synthetic": sources.source(type="synthetic")})
    # Payload words over a 10-letter alphabet: every letter is seen often, so a tiny model learns
    # letter-level reverse/sort in minutes; there are still ~110k distinct words.
    c.data.synthetic = ConfigDict(dict(num_rows=10000, seed=0, min_word_len=3, max_word_len=5,
                                       alphabet="ABCDEFGHIJ", max_first_addend=999,
                                       max_second_addend=9, words="random"))
    # Addition needs the most examples (a 100-entry digit table); counting the fewest.
    c.data.synthetic.task_weights = ConfigDict(dict(reverse=1.0, sort=1.0, double=1.0, count=0.5,
                                                    upper=0.0, first=0.0, add=2.0))
    c.data.split_fractions = ConfigDict(dict(train=0.8, validation=0.1, test=0.1))
    c.data.split_salt = "flax-ift"
    c.data.mixture_rows = 0  # train rows per mixture epoch when sources have weights (0: sum of sizes)
    c.data.template = "chatml"  # chatml | alpaca | plain | tokenizer (its own chat template)
    c.data.end_of_turn = ""  # text that ends a reply ("": the template's, else the tokenizer's EOS)
    c.data.loss_on = "all"  # all assistant turns | last
    c.data.allow_special_tokens_in_text = False  # True: "<|im_end|>" in data becomes the control token
    # Rows of 72 tokens hold ~2.8 packed examples (p50 25 tokens) instead of one padded one: 1.7x the
    # supervised tokens per second, so 900 steps of 32 rows reach what 1,800 steps of 64 padded rows did.
    c.data.max_length = 72  # model sequence length
    c.data.length_policy = "drop"  # drop | truncate (oldest turns, then the prompt from the left)
    c.data.packing = "best_fit"  # none (one example per row, padded) | best_fit | first_fit
    c.data.on_bad_row = "error"  # error (file:line) | skip (counted in the report)
    c.data.max_row_bytes = 1_000_000  # a longer line is a bad row
    c.data.cache = True  # cache tokenised splits (keyed by data, tokenizer, template, lengths)
    c.data.cache_dir = ""  # "": ~/.cache/flax_ift/tokenized
    c.data.num_proc = 0  # tokenisation processes (0: one per 50k rows, up to the CPU count)
    c.data.loader = ConfigDict(dict(read_threads=2, prefetch=8, worker_count=0))

    # ---- tokenizer --------------------------------------------------------------------------
    c.tokenizer = ConfigDict()
    c.tokenizer.kind = "train_bpe"  # train_bpe: learn a small BPE on the train split | hf: load `path`
    c.tokenizer.path = ""
    c.tokenizer.vocab_size = 512
    c.tokenizer.min_frequency = 64
    c.tokenizer.train_sample_rows = 20000  # train_bpe learns from a seeded sample of this many rows

    # ---- model (Llama architecture; vocab_size comes from the tokenizer) ---------------------
    c.model = ConfigDict()
    c.model.hidden_size = 128
    c.model.intermediate_size = 384
    c.model.num_hidden_layers = 4
    c.model.num_attention_heads = 4
    c.model.num_key_value_heads = 2
    c.model.head_dim = 32
    c.model.rope_theta = 10000.0
    c.model.rms_norm_eps = 1e-5
    c.model.tie_word_embeddings = True
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    # auto: splash on TPU; cuDNN (unpacked) or the Pallas flash kernel (packed) for bf16 on GPU; else
    # xla (blockwise: query blocks of attention_block_size skip the blocks above the diagonal).
    c.model.attention_impl = "auto"  # auto | xla | cudnn | flash | splash
    c.model.attention_block_size = 128
    c.model.remat = "none"  # none | full | dots: recompute block activations in the backward pass
    # Layers under lax.scan with stacked params: compile time independent of depth (accelerator presets
    # set it); the checkpoint keeps the run's layout, HF import/export converts.
    c.model.scan_layers = False
    # A Hugging Face checkpoint directory (config.json + *.safetensors) to start from. When set, the
    # architecture keys above are ignored (its config.json decides) and tokenizer.kind="hf" with an
    # empty tokenizer.path uses its tokenizer.
    c.model.hf_path = ""
    # ... or a GGUF file (llama.cpp; Llama/Qwen2/Qwen3 architectures, F32/F16/BF16/Q8_0/Q4_0/Q4_1/
    # Q5_x/K-quants), dequantised to model.param_dtype on load; tokenizer.kind="hf" uses its tokenizer.
    c.model.gguf_path = ""
    # A copy of the base model's config.json: what --dry_run compiles when the checkpoint is not here.
    c.model.arch_json = ""

    # ---- LoRA (trainer.models.lora): train low-rank adapters, keep the base frozen ------------------
    c.lora = ConfigDict()
    c.lora.rank = 0  # 0: full fine-tuning
    c.lora.alpha = 16.0  # the update is (alpha / rank) A B, as in PEFT
    c.lora.dropout = 0.0  # on the adapters' input (PEFT's lora_dropout)
    c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")  # projections of every block
    c.lora.init = "peft"  # A Kaiming-uniform, B zeros: step 0 is the base model exactly
    c.lora.base_dtype = ""  # the frozen base's storage dtype ("": model.param_dtype), e.g. bfloat16
    c.lora.base_quant = ""  # QLoRA: "int8" (per channel) or "nf4" (blockwise 4-bit), dequantised per layer
    c.lora.init_from = ""  # a PEFT adapter directory to start from (continue training, or evaluate)

    # ---- optimiser --------------------------------------------------------------------------
    c.optimizer = ConfigDict(dict(learning_rate=3e-3, warmup_steps=50, end_lr_ratio=0.05, b1=0.9,
                                  b2=0.98, eps=1e-8, weight_decay=0.1, max_grad_norm=1.0))

    # ---- training loop ----------------------------------------------------------------------
    c.train = ConfigDict()
    c.train.num_steps = 900
    c.train.batch_size = 32  # global, in (packed) rows
    c.train.grad_accum_steps = 1
    # The loss applies the LM head to this many tokens per device at a time (float32 logits
    # [chunk, vocab]): on an H200 8,192 ran the 1B preset 10% faster than 1,024, in less memory.
    c.train.loss_chunk_tokens = 8192
    c.train.log_every = 25
    c.train.eval_every = 300  # validation loss
    c.train.eval_batch_size = 128
    c.train.checkpoint_every = 300
    c.train.keep_checkpoints = 2  # the last N, plus the best by checkpoint.best_metric
    c.train.progress_bar = True
    # A step with a non-finite loss or gradient norm is skipped (params unchanged); this many in a
    # row stop the run (divergence).
    c.train.max_bad_steps = 20
    # Resuming with another num_steps bends the LR schedule of a run in progress: refused unless True.
    c.train.allow_num_steps_change = False

    # ---- parallelism: a mesh with named axes (sizes multiply to the device count) ------------
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # logical axis -> mesh axes. The model only knows the logical names.
    c.sharding = ConfigDict()
    c.sharding.rules = (
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("layers", None),  # the stacked axis of scanned layers
        ("norm", None),
    )

    # ---- checkpoint selection ------------------------------------------------------------------
    c.checkpoint = ConfigDict()
    # What `--checkpoint best` means: val/loss, or an in-training eval metric (val/exact_match,
    # val/rougeL, val/chrf, ...: eval.every_steps then also runs at every checkpoint).
    c.checkpoint.best_metric = "val/loss"
    c.checkpoint.best_mode = "auto"  # auto (min for losses, max otherwise) | min | max
    # The longest a checkpoint save may block training; past it the run stops with one line (Orbax's
    # async writer can hang instead of failing on a full disk).
    c.checkpoint.timeout_s = 1800.0

    # ---- evaluation (trainer.eval, and generation eval during training) ----------------------
    c.eval = ConfigDict()
    c.eval.split = "test"
    c.eval.max_examples = 0  # 0 = the whole split
    c.eval.batch_size = 128
    c.eval.max_new_tokens = 12
    c.eval.few_shot_k = 3  # exemplars (same task, from train) for the base model's few-shot row
    # Longer prompts lose exemplars first, then are cut from the left (0: max_length x (k + 1)).
    c.eval.max_prompt_length = 0
    c.eval.stop = ()  # stop strings: a prediction ends at the first one (EOS always ends it)
    c.eval.answer_pattern = ""  # regex with one group: compare only the extracted answers
    # Exact match compares the texts after these (the default trims the ends only).
    c.eval.normalize = ConfigDict(dict(strip=True, lowercase=False, whitespace=False, punctuation=False))
    c.eval.baselines = "zero_shot,few_shot"  # base-model rows of trainer.eval (few_shot:K sets K)
    # Generation eval during training: every N steps on a fixed seeded sample of validation rows,
    # logged as val/exact_match, val/rougeL, val/chrf, ... (0: off).
    c.eval.every_steps = 300
    c.eval.in_training_examples = 64
    return c
