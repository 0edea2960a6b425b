r"""Writes a run's checkpoint as a standard Hugging Face model directory.

    python -m trainer.export --workdir runs/x [--checkpoint best|latest|STEP] --out DIR [--dtype auto]

DIR gets ``config.json``, ``model.safetensors`` (or shards + index above ``--max_shard_gb``),
``generation_config.json`` and the tokenizer with the chat template the run trained with, so
``transformers`` (and anything that reads its format, such as vLLM) loads it directly. Models imported
from HF keep their original ``config.json``; models trained from scratch are written as Llama.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import flags

from trainer import cli
from trainer.cli import UserError, launch

FLAGS = flags.FLAGS


def export(workdir: str, out: str, checkpoint: str = "best", dtype: str = "auto",
           max_shard_bytes: int = 5 * 2**30) -> dict[str, Any]:
    """Exports ``workdir``'s checkpoint to ``out``; returns what was written."""
    # Imported here so that ``--help`` answers without loading JAX and transformers.
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    from data_pipeline import pipeline, templating  # noqa: PLC0415
    from trainer import experiment, hf_io, metrics as metrics_lib  # noqa: PLC0415
    from trainer.checkpoint import Checkpointer  # noqa: PLC0415
    config = experiment.load_config(workdir)
    tok = experiment.build_or_load_tokenizer(config, workdir, train_rows=None)
    mesh = experiment.make_mesh(config)
    spec = experiment.model_spec(config, len(tok), mesh)
    ckpt = Checkpointer(workdir, read_only=True)
    step = ckpt.resolve(checkpoint)
    params = ckpt.restore_params(step, experiment.abstract_with_shardings(spec.init_params_fn(0),
                                                                          spec.param_shardings))
    ckpt.close()
    # Gather to host memory (every process holds a copy; process 0 writes).
    host = multihost_utils.process_allgather(params, tiled=True) if jax.process_count() > 1 else \
        jax.device_get(params)

    if spec.hf_path:
        hf_config = hf_io.read_hf_config(spec.hf_path)
        source_dtype = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    else:
        hf_config = hf_io.hf_config_from_model(spec.cfg)
        source_dtype = "float32"
    dtype = source_dtype if dtype == "auto" else dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"cannot export as {dtype!r}; pass --dtype")
    tensors = hf_io.params_to_hf(host, spec.cfg, hf_config["model_type"])
    tensors = {k: np.asarray(v, np.float32).astype(hf_io.np_dtype(dtype)) for k, v in tensors.items()}

    template = pipeline.template_for(config.data, tok)
    eot_ids = template.stop_ids
    hf_config = {**hf_config, "torch_dtype": dtype, "bos_token_id": tok.bos_token_id,
                 "eos_token_id": eot_ids if len(eot_ids) > 1 else eot_ids[0],
                 "pad_token_id": tok.pad_token_id}
    if jax.process_index() == 0:
        if os.path.isdir(out) and os.listdir(out):
            raise UserError(f"--out {out!r} exists and is not empty")
        os.makedirs(out, exist_ok=True)
        files = hf_io.save_hf(tensors, out, max_shard_bytes)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": tok.bos_token_id, "eos_token_id": hf_config["eos_token_id"],
                       "pad_token_id": tok.pad_token_id, "do_sample": False}, f, indent=2)
        # The chat template the run trained with (a built-in one, or the tokenizer's own).
        if config.data.template in templating.BUILTIN_TEMPLATES:
            tok.chat_template = templating.BUILTIN_TEMPLATES[config.data.template]
        tok.padding_side = "left"  # batched generation (transformers' generate) wants left padding
        tok.save_pretrained(out)
        metrics_lib.log(f"exported step {step} of {workdir} to {out} ({len(files)} safetensors "
                        f"file(s), {dtype}, {sum(x.nbytes for x in tensors.values()) / 1e6:.1f} MB)")
    return {"step": step, "out": out, "dtype": dtype, "tensors": len(tensors)}


def _define_flags() -> None:
    """Defined when the entry point runs, not on import (see ``data_pipeline.cli``)."""
    flags.DEFINE_string("workdir", None, "A trainer.train run directory.")
    flags.DEFINE_string("checkpoint", "best", "best (lowest validation loss) | latest | a step number.")
    flags.DEFINE_string("out", None, "Output directory (created; must be empty if it exists).")
    flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16", "float16"],
                      "Weight dtype (auto: the imported checkpoint's, else float32).")
    flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors file before sharding.")
    flags.adopt_module_key_flags(cli)


def run() -> None:
    """Entry point (``python -m trainer.export`` and the ``ift-export`` console script)."""
    _define_flags()
    launch(lambda: export(FLAGS.workdir, FLAGS.out, FLAGS.checkpoint, FLAGS.dtype,
                          int(FLAGS.max_shard_gb * 2**30)), required=("workdir", "out"))


if __name__ == "__main__":
    run()
