"""Every check of a run's config that needs no data and no model work, run before either.

``problems(config, ...)`` returns *all* problems, one line each, so a user fixes a config in one go
instead of discovering its mistakes one slow start-up at a time. ``trainer.train`` calls it first
(``experiment.validate_config``); nothing here reads data, builds a tokenizer or touches a device
beyond counting them.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from typing import Any

from data_pipeline import templating
from trainer.settings import options
from trainer.settings.spec import RunSpec
from trainer.sharding import mesh_sizes

DTYPES = options.DTYPES


def _data_parallel(sizes: dict[str, int], rules: list[tuple[str, Any]]) -> int:
    """How many ways the batch is split: the product of the mesh axes the ``batch`` rule names."""
    batch = dict(rules).get("batch")
    axes = (batch,) if isinstance(batch, str) else tuple(batch or ())
    return math.prod(sizes.get(a, 1) for a in axes)


class _Problems(list):
    """The problems found so far, one line each."""

    def need(self, ok: bool, msg: str) -> None:
        if not ok:
            self.append(msg)


def problems(config: RunSpec, device_count: int | None = 1, process_count: int = 1,
             base_positions: int | None = None, check_paths: bool = True) -> list[str]:
    """Everything wrong with ``config``, one line per problem (empty: fine), section by section.

    Args:
      device_count, process_count: of the run (divisibility of batches by the mesh and by hosts);
        ``device_count=None`` skips those checks (a preset checked away from its pod).
      base_positions: ``max_position_embeddings`` of the base model, when there is one.
      check_paths: whether files the config names (data, base model, tokenizer) must exist here.
    """
    out = _Problems()
    _training(config.train, config.optimizer, out)
    _data(config.data, check_paths, out)
    _model(config, check_paths, out)
    _evaluation(config, out)
    if device_count:
        _devices(config, device_count, process_count, out)
    if base_positions:
        _positions(config.data, config.eval, base_positions, out)
    return list(out)


def _training(t, o, out: _Problems) -> None:
    for key in ("num_steps", "batch_size", "grad_accum_steps", "log_every", "eval_every", "checkpoint_every",
                "eval_batch_size", "keep_checkpoints"):
        out.need(getattr(t, key) >= 1, f"train.{key} must be at least 1, got {getattr(t, key)}")
    out.need(o.learning_rate > 0, f"optimizer.learning_rate must be positive, got {o.learning_rate}")
    out.need(o.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {o.warmup_steps}")
    out.need(0 <= o.end_lr_ratio <= 1, f"optimizer.end_lr_ratio must be in [0, 1], got {o.end_lr_ratio}")
    for key in ("b1", "b2"):
        out.need(0 <= getattr(o, key) < 1, f"optimizer.{key} must be in [0, 1), got {getattr(o, key)}")
    out.need(o.eps > 0, f"optimizer.eps must be positive, got {o.eps}")
    out.need(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
    out.need(o.max_grad_norm >= 0,
             f"optimizer.max_grad_norm must be >= 0 (0: no clipping), got {o.max_grad_norm}")


def _data(d, check_paths: bool, out: _Problems) -> None:
    out.need(d.max_length >= 2, f"data.max_length must be at least 2, got {d.max_length}")
    fr = dict(d.split_fractions)
    out.need(all(v >= 0 for v in fr.values()) and abs(sum(fr.values()) - 1) <= 1e-6,
             f"data.split_fractions must be >= 0 and sum to 1, got {fr}")
    out.need(fr.get("train", 0) > 0, f"data.split_fractions.train must be positive, got {fr}")
    out.need(fr.get("validation", 0) > 0, "data.split_fractions.validation must be positive: validation "
             "loss picks the best checkpoint")
    for key, allowed in (("length_policy", ("drop", "truncate")), ("packing", ("none", "best_fit", "first_fit")),
                         ("on_bad_row", ("error", "skip")), ("loss_on", ("all", "last")),
                         ("template", (*templating.BUILTIN_TEMPLATES, "tokenizer"))):
        out.need(getattr(d, key) in allowed,
                 f"data.{key} must be one of {', '.join(allowed)}, got {getattr(d, key)!r}")
    out.need(d.max_segments_per_row >= 0, f"data.max_segments_per_row must be >= 0 (0: no limit), got "
             f"{d.max_segments_per_row}")
    for name, src in dict(d.sources).items() if check_paths else ():
        src = dict(src)
        if src.get("type", "files") != "files":
            continue
        for p in [p for p in [src.get("path"), *dict(src.get("splits") or {}).values()] if p]:
            out.need(bool(glob.glob(os.path.expanduser(p))), f"data.sources.{name}: no file matches {p!r}")


def _model(config: RunSpec, check_paths: bool, out: _Problems) -> None:
    """The model, its LoRA and its tokenizer."""
    m, lcfg, tk = config.model, config.lora, config.tokenizer
    hf, gg = m.hf_path, m.gguf_path
    out.need(not (hf and gg), "model.hf_path and model.gguf_path are both set; set one")
    # A gs:// base is copied (or read by chunk) when the model is built: its errors name it there.
    out.need(not check_paths or not hf or "://" in hf or os.path.isdir(hf),
             f"model.hf_path: {hf!r} is not a directory")
    out.need(not check_paths or not gg or "://" in gg or os.path.isfile(gg),
             f"model.gguf_path: {gg!r} is not a file")
    for key in ("dtype", "param_dtype"):
        out.need(getattr(m, key) in DTYPES,
                 f"model.{key} must be one of {', '.join(DTYPES)}, got {getattr(m, key)!r}")
    out.need(m.remat in options.REMAT,
             f"model.remat must be one of {', '.join(options.REMAT)}, got {m.remat!r}")
    out.need(m.splash_block_size >= 0 and m.splash_block_size % 128 == 0,
             f"model.splash_block_size must be 0 (auto) or a multiple of 128, got {m.splash_block_size}")
    out.need(m.attention_impl in options.ATTENTION_IMPLS, f"model.attention_impl must be one of "
             f"{', '.join(options.ATTENTION_IMPLS)}, got {m.attention_impl!r}")
    if not (hf or gg):  # a model trained from scratch: its shape comes from config.model
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads"):
            out.need(getattr(m, key) >= 1, f"model.{key} must be at least 1, got {getattr(m, key)}")
        out.need(m.num_key_value_heads < 1 or m.num_attention_heads % m.num_key_value_heads == 0,
                 f"model.num_attention_heads ({m.num_attention_heads}) must be a multiple of "
                 f"model.num_key_value_heads ({m.num_key_value_heads})")
    out += lcfg.problems()
    out.need(not check_paths or not lcfg.init_from or os.path.isdir(lcfg.init_from),
             f"lora.init_from: {lcfg.init_from!r} is not a directory")
    out.need(tk.kind in ("train_bpe", "hf"), f"tokenizer.kind must be train_bpe or hf, got {tk.kind!r}")
    out.need(tk.kind != "hf" or bool(tk.path or hf or gg),
             "tokenizer.kind='hf' needs tokenizer.path, model.hf_path or model.gguf_path")
    out.need(not check_paths or not tk.path or os.path.exists(tk.path),
             f"tokenizer.path: {tk.path!r} does not exist")


def _evaluation(config: RunSpec, out: _Problems) -> None:
    """Evaluation, the divergence stop and the checkpoint selection it feeds."""
    t, e, ck = config.train, config.eval, config.checkpoint
    out.need(t.max_bad_steps >= 1, f"train.max_bad_steps must be at least 1, got {t.max_bad_steps}")
    out.need(e.batch_size >= 1, f"eval.batch_size must be at least 1, got {e.batch_size}")
    out.need(e.max_new_tokens >= 1, f"eval.max_new_tokens must be at least 1, got {e.max_new_tokens}")
    out.need(e.few_shot_k >= 0, f"eval.few_shot_k must be >= 0, got {e.few_shot_k}")
    out.need(e.max_examples >= 0, f"eval.max_examples must be >= 0 (0: all), got {e.max_examples}")
    out.need(e.every_steps >= 0, f"eval.every_steps must be >= 0 (0: off), got {e.every_steps}")
    *first, last = options.GATHER_WEIGHTS
    out.need(e.gather_weights in options.GATHER_WEIGHTS, f"eval.gather_weights must be "
             f"{', '.join(first)} or {last}, got {e.gather_weights!r}")
    out.need(e.in_training_examples >= 1,
             f"eval.in_training_examples must be at least 1, got {e.in_training_examples}")
    try:
        options.parse_baselines(e.baselines, e.few_shot_k)
    except ValueError as err:
        out.append(f"eval.baselines: {err}")
    if pattern := e.answer_pattern:
        try:
            out.need(re.compile(pattern).groups >= 1,
                     f"eval.answer_pattern {pattern!r} needs one group: the answer it extracts")
        except re.error as err:
            out.append(f"eval.answer_pattern {pattern!r} is not a regular expression: {err}")
    known = ("val/loss", "val/token_accuracy", *(f"val/{m}" for m in options.METRICS))
    out.need(ck.best_metric in known,
             f"checkpoint.best_metric must be one of {', '.join(known)}, got {ck.best_metric!r}")
    out.need(ck.best_mode in ("auto", "min", "max"),
             f"checkpoint.best_mode must be auto, min or max, got {ck.best_mode!r}")


def _devices(config: RunSpec, device_count: int, process_count: int, out: _Problems) -> None:
    """The mesh against the devices, and the batches against the mesh and the hosts."""
    t = config.train
    try:
        sizes = mesh_sizes(dataclasses.asdict(config.mesh), device_count)
    except ValueError as err:
        out.append(str(err))
        return
    dp = _data_parallel(sizes, list(config.sharding.rules))
    if t.batch_size >= 1 and t.grad_accum_steps >= 1:
        out.need(t.batch_size % (dp * t.grad_accum_steps) == 0,
                 f"train.batch_size={t.batch_size} must be divisible by the data-parallel size {dp} x "
                 f"train.grad_accum_steps={t.grad_accum_steps}")
    if t.eval_batch_size >= 1:
        out.need(t.eval_batch_size % dp == 0 and t.eval_batch_size % process_count == 0,
                 f"train.eval_batch_size={t.eval_batch_size} must be divisible by the data-parallel size "
                 f"{dp} and the process count {process_count} (rows would be dropped)")
    out.need(t.batch_size % process_count == 0,
             f"train.batch_size={t.batch_size} must be divisible by the process count {process_count}")


def _positions(d, e, base_positions: int, out: _Problems) -> None:
    """Training rows and eval prompts plus generation against the base model's positions."""
    out.need(d.max_length <= base_positions, f"data.max_length={d.max_length} exceeds the base model's "
             f"{base_positions} positions (max_position_embeddings)")
    prompt = e.prompt_budget(d.max_length)
    out.need(prompt + e.max_new_tokens <= base_positions,
             f"eval prompts ({prompt} tokens: eval.max_prompt_length, or data.max_length x "
             f"(eval.few_shot_k + 1)) + eval.max_new_tokens={e.max_new_tokens} exceed the base model's "
             f"{base_positions} positions; lower them or set eval.max_prompt_length")
