r"""Writes a run's checkpoint as a standard Hugging Face model directory, or a LoRA run's adapters as a
PEFT adapter directory.

    python -m trainer.export --workdir runs/x [--checkpoint best|latest|STEP] --out DIR [--dtype auto]
    python -m trainer.export --workdir runs/lora --adapter --out DIR

DIR gets ``config.json``, ``model.safetensors`` (or shards + index above ``--max_shard_gb``),
``generation_config.json`` and the tokenizer with the chat template the run trained with, so
``transformers`` (and anything that reads its format, such as vLLM) loads it directly. Models imported
from HF keep their original ``config.json``; models trained from scratch are written as Llama. A LoRA
run's adapters are merged into its (unquantised) base for this.

``--adapter`` (LoRA runs) writes ``adapter_config.json`` + ``adapter_model.safetensors`` under PEFT's
names, which ``peft.PeftModel.from_pretrained(base, DIR)`` loads, and the tokenizer.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import flags

from trainer import cli
from trainer.cli import launch
from trainer.errors import UserError

FLAGS = flags.FLAGS


def export(workdir: str, out: str, checkpoint: str = "best", dtype: str = "auto",
           max_shard_bytes: int = 5 * 2**30, adapter: bool = False) -> dict[str, Any]:
    """Exports ``workdir``'s checkpoint to ``out`` (``adapter``: the PEFT adapter alone); returns
    what was written."""
    # Imported here so that ``--help`` answers without loading JAX and transformers.
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    from data_pipeline import pipeline  # noqa: PLC0415
    from trainer import console  # noqa: PLC0415
    from trainer.io import hf as hf_io  # noqa: PLC0415
    from trainer.models import lora
    from trainer.training.runs import open_run  # noqa: PLC0415
    run = open_run(workdir)
    config, tok, spec = run.config, run.tok, run.spec
    if adapter and not spec.lora.enabled:
        raise UserError(f"--adapter: {workdir} is a full fine-tuning run (lora.rank=0); it has no "
                        "adapters. Export the model without --adapter")
    step, params = run.restore(checkpoint)
    run.close()
    # Gather to host memory (every process holds a copy; process 0 writes).
    host = multihost_utils.process_allgather(params, tiled=True) if jax.process_count() > 1 else \
        jax.device_get(params)
    model_type = (hf_io.read_hf_config(spec.hf_path)["model_type"] if spec.hf_path
                  else hf_io.hf_config_from_model(spec.cfg)["model_type"])
    if adapter:
        return _write_adapter(spec, config, tok, host, model_type, step, workdir, out, dtype)
    if spec.lora.enabled:  # adapters onto the unquantised base, then folded in: the plain model
        host = lora.merge(lora.combine(_host_base(spec, config.seed), host), spec.cfg)

    if spec.hf_path:
        hf_config = hf_io.read_hf_config(spec.hf_path)
        source_dtype = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    else:
        hf_config = hf_io.hf_config_from_model(spec.cfg)
        source_dtype = "float32"
    dtype = source_dtype if dtype == "auto" else dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"cannot export as {dtype!r}; pass --dtype")
    tensors = hf_io.params_to_hf(host, spec.cfg, model_type)
    tensors = {k: np.asarray(v, np.float32).astype(hf_io.np_dtype(dtype)) for k, v in tensors.items()}

    template = pipeline.template_for(config.data, tok)
    eot_ids = template.stop_ids
    hf_config = {**hf_config, "torch_dtype": dtype, "bos_token_id": tok.bos_token_id,
                 "eos_token_id": eot_ids if len(eot_ids) > 1 else eot_ids[0],
                 "pad_token_id": tok.pad_token_id}
    if jax.process_index() == 0:
        target, out = out, _local_out(out)
        files = hf_io.save_hf(tensors, out, max_shard_bytes)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": tok.bos_token_id, "eos_token_id": hf_config["eos_token_id"],
                       "pad_token_id": tok.pad_token_id, "do_sample": False}, f, indent=2)
        _save_tokenizer(tok, config, out)
        out = _upload(out, target)
        console.log(f"exported step {step} of {workdir} to {out} ({len(files)} safetensors "
                    f"file(s), {dtype}, {sum(x.nbytes for x in tensors.values()) / 1e6:.1f} MB)")
    return {"step": step, "out": out, "dtype": dtype, "tensors": len(tensors)}


def _save_tokenizer(tok, config, out: str) -> None:
    """The tokenizer with the chat template the run trained with (a built-in one, or the
    tokenizer's own), padding on the left (what transformers' batched generate wants)."""
    from data_pipeline import templating  # noqa: PLC0415
    if config.data.template in templating.BUILTIN_TEMPLATES:
        tok.chat_template = templating.BUILTIN_TEMPLATES[config.data.template]
    tok.padding_side = "left"
    tok.save_pretrained(out)


def _local_out(out: str) -> str:
    """The local directory the export is written to: ``out`` itself, or for ``gs://`` a local
    staging copy uploaded at the end (safetensors and transformers write local files)."""
    from trainer.io import paths  # noqa: PLC0415
    if paths.listdir(out):
        raise UserError(f"--out {out!r} exists and is not empty")
    local = paths.fresh_local_dir(out)
    os.makedirs(local, exist_ok=True)
    return local


def _upload(local: str, out: str) -> str:
    from trainer.io import paths  # noqa: PLC0415
    if paths.is_remote(out):
        paths.upload_dir(local, out)
    return out


def _host_base(spec, seed: int) -> dict[str, Any]:
    """The frozen base in float, on the host: read again from the HF/GGUF files (a QLoRA run's
    quantised copy is not what the adapters are merged into), or the seeded init."""
    import jax  # noqa: PLC0415

    from trainer.io import hf as hf_io  # noqa: PLC0415
    if spec.hf_path:
        try:
            return hf_io.load_hf(spec.hf_path, spec.cfg, hf_io.read_hf_config(spec.hf_path)["model_type"])
        except hf_io.HFError as e:
            raise UserError(f"base model: {e}") from e
    return spec.split(jax.device_get(jax.jit(spec.init_params_fn(seed))()))[1]


def _write_adapter(spec, config, tok, host, model_type: str, step: int, workdir: str, out: str,
                   dtype: str) -> dict[str, Any]:
    """A PEFT adapter directory: adapter_config.json, adapter_model.safetensors, the tokenizer."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from safetensors.numpy import save_file  # noqa: PLC0415

    from trainer import console  # noqa: PLC0415
    from trainer.io import hf as hf_io  # noqa: PLC0415
    from trainer.io import peft as peft_io
    from trainer.models import lora
    from trainer.training import modeling  # noqa: PLC0415
    if not spec.hf_path:
        raise UserError(f"--adapter: {workdir} trained adapters on a model initialised from scratch, which "
                        "has no Hugging Face base for PEFT to load them onto; export the merged model "
                        "(without --adapter)")
    dtype = "float32" if dtype == "auto" else dtype
    try:
        tensors = peft_io.peft_tensors(host, spec.cfg, model_type)
        adapter_cfg = peft_io.adapter_config(spec.cfg, os.path.abspath(spec.hf_path), model_type)
    except lora.LoraError as e:
        raise UserError(f"--adapter: {e}") from e
    tensors = {k: np.asarray(v, np.float32).astype(hf_io.np_dtype(dtype)) for k, v in tensors.items()}
    if jax.process_index() == 0:
        target, out = out, _local_out(out)
        save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out, "adapter_config.json"), "w") as f:
            json.dump(adapter_cfg, f, indent=2)
        with open(os.path.join(out, "flax_ift.json"), "w") as f:  # where it came from, for people
            json.dump({"workdir": workdir if "://" in workdir else os.path.abspath(workdir), "step": step,
                       "base": modeling.base_identity(spec, config.seed)}, f, indent=2)
        _save_tokenizer(tok, config, out)
        out = _upload(out, target)
        console.log(f"exported the LoRA adapters of step {step} of {workdir} to {out} (PEFT, "
                    f"{len(tensors)} tensors, {dtype}, "
                    f"{sum(x.nbytes for x in tensors.values()) / 1e6:.2f} MB)")
    return {"step": step, "out": out, "dtype": dtype, "tensors": len(tensors), "adapter": True}


def _define_flags() -> None:
    """Defined when the entry point runs, not on import (see ``data_pipeline.cli``)."""
    flags.DEFINE_string("workdir", None, "A trainer.train run directory.")
    flags.DEFINE_string("checkpoint", "best", "best (by the run's checkpoint.best_metric) | latest | a step number.")
    flags.DEFINE_string("out", None, "Output directory (created; must be empty if it exists).")
    flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16", "float16"],
                      "Weight dtype (auto: the imported checkpoint's, else float32).")
    flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors file before sharding.")
    flags.DEFINE_bool("adapter", False, "LoRA runs: write the PEFT adapter directory (adapter_config.json "
                      "+ adapter_model.safetensors) instead of the merged model.")
    flags.adopt_module_key_flags(cli)


def run() -> None:
    """Entry point (``python -m trainer.export`` and the ``ift-export`` console script)."""
    _define_flags()
    launch(lambda: export(FLAGS.workdir, FLAGS.out, FLAGS.checkpoint, FLAGS.dtype,
                          int(FLAGS.max_shard_gb * 2**30), FLAGS.adapter), required=("workdir", "out"))


if __name__ == "__main__":
    run()
