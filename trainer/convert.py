r"""Converts a base model once into the run's layout, as a sharded Orbax checkpoint.

    python -m trainer.convert --hf_path DIR --out DIR|gs://... [--config configs/llama3_8b_tpu.py]

The parameters are imported as a run of ``--config`` would (its ``model.scan_layers`` and
``model.param_dtype``: stacked layers, storage dtype) over ``config.mesh`` on this machine's devices,
and saved with Orbax beside the source's config and tokenizer files (``trainer.io.base_checkpoint``).
Point ``model.hf_path`` at ``--out`` afterwards: on a pod every process then reads only its devices'
chunks instead of the whole checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import flags

from trainer import cli
from trainer.cli import launch, run_spec
from trainer.errors import UserError

FLAGS = flags.FLAGS


def convert(config: Any, hf_path: str, out: str, chunk_mb: float | None = None) -> dict[str, Any]:
    """Imports ``hf_path`` as the run of ``config`` (a ``RunSpec``) would, without LoRA, and writes
    it to ``out`` in chunks of at most ``chunk_mb`` MiB (None: ``base_checkpoint.CHUNK_BYTES``)."""
    from trainer.console import log  # noqa: PLC0415
    from trainer.io import base_checkpoint, paths  # noqa: PLC0415
    from trainer.io import hf as hf_io
    from trainer.training import modeling  # noqa: PLC0415
    if chunk_mb is not None and not chunk_mb > 0:
        raise UserError(f"--chunk_mb must be positive, got {chunk_mb}")
    if paths.exists(paths.join(out, base_checkpoint.PARAMS)):
        raise UserError(f"--out {out} already holds a converted base; choose a new directory")
    # The whole base, unfrozen: LoRA runs freeze it when they load it.
    config = config.replace(model=dataclasses.replace(config.model, hf_path=hf_path, gguf_path=""),
                            lora=dataclasses.replace(config.lora, rank=0))
    try:
        hf_config = hf_io.read_hf_config(hf_path)
    except hf_io.HFError as e:
        raise UserError(f"--hf_path: {e}") from e
    spec = modeling.model_spec(config, int(hf_config["vocab_size"]), modeling.make_mesh(config),
                               hf_config)
    params = spec.load_base()
    layout = {"scan_layers": spec.cfg.scan_layers, "param_dtype": spec.cfg.param_dtype}
    chunk_bytes = base_checkpoint.CHUNK_BYTES if chunk_mb is None else max(1024, int(chunk_mb * 2**20))
    base_checkpoint.write(params, out, hf_path, layout, chunk_bytes)
    import jax  # noqa: PLC0415
    n = sum(x.size for x in jax.tree.leaves(params))
    log(f"converted {hf_path} ({n / 1e6:,.1f}M parameters, scan_layers={layout['scan_layers']}, "
        f"{layout['param_dtype']}) to {out}; use it with --config.model.hf_path={out}")
    return {"out": out, "parameters": n, **layout}


def _define_flags() -> None:
    from ml_collections import config_flags  # noqa: PLC0415
    config_flags.DEFINE_config_file("config", "configs/demo.py", "The config whose layout to convert to "
                                    "(model.scan_layers, model.param_dtype, config.mesh).", lock_config=True)
    flags.DEFINE_string("hf_path", None, "A Hugging Face model directory (config.json + *.safetensors).")
    flags.DEFINE_string("out", None, "Output directory (local or gs://).")
    flags.DEFINE_float("chunk_mb", None, "Largest stored chunk, MiB (default: "
                       "trainer.io.base_checkpoint.CHUNK_BYTES). A process reads the chunks its "
                       "devices' slices touch: smaller chunks read closer to its share, larger ones "
                       "make fewer requests to a bucket.")
    flags.adopt_module_key_flags(cli)


def run() -> None:
    """Entry point (``python -m trainer.convert``)."""
    _define_flags()
    launch(lambda: convert(run_spec(), FLAGS.hf_path, FLAGS.out, FLAGS.chunk_mb),
           required=("hf_path", "out"))


if __name__ == "__main__":
    run()
