"""A base model converted once into the run's layout and saved as a sharded Orbax checkpoint.

An HF directory is read tensor by tensor on every host, each converted to float32 on the host and
sliced there (``trainer.io.hf``): on a pod every host reads the whole checkpoint. A converted base
(``python -m trainer.convert``) holds the parameters as the run keeps them -- stacked layers for
scanned models, ``model.param_dtype`` -- in Orbax's sharded format, so a restore with the target
shardings has each process read only the chunks its devices hold (TensorStore reads by chunk).

The directory is a whole base model: ``config.json``, the tokenizer and generation files copied from
the source, ``params/`` (Orbax) and ``flax_ift_base.json`` (the layout). ``model.hf_path`` takes it
like an HF directory; local paths and ``gs://`` both work (``trainer.io.paths``).
"""

from __future__ import annotations

import json
from typing import Any

import orbax.checkpoint as ocp

from trainer.io import paths

MARKER = "flax_ift_base.json"
PARAMS = "params"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".safetensors.index.json", ".bin.index.json")


SKIP_IN_LOCAL_COPY = (PARAMS,)  # Orbax reads these from where they are


def is_converted(path: str) -> bool:
    return bool(path) and not path.endswith(".gguf") and paths.exists(paths.join(path, MARKER))


def write(params: Any, out: str, source: str, layout: dict[str, Any]) -> None:
    """Saves ``params`` (sharded arrays, the run's layout) under ``out/params`` and copies the source
    directory's other files (config, tokenizer, generation config) beside them. Every process calls
    this (Orbax writes each process's shards)."""
    import jax  # noqa: PLC0415
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(paths.abspath(paths.join(out, PARAMS)), params)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        if paths.isdir(source):
            for name in paths.listdir(source):
                src = paths.join(source, name)
                if not name.endswith(WEIGHT_SUFFIXES) and paths.isfile(src):
                    paths.write_bytes(paths.join(out, name), paths.path(src).read_bytes())
        paths.write_text(paths.join(out, MARKER), json.dumps({**layout, "source": source}, indent=1))


def layout_problem(path: str, layout: dict[str, Any]) -> str:
    """"" when the converted base at ``path`` has ``layout`` (scan_layers, param_dtype), else one line
    saying what differs."""
    saved = json.loads(paths.read_text(paths.join(path, MARKER)))
    diff = {k: (saved.get(k), v) for k, v in layout.items() if saved.get(k) != v}
    if not diff:
        return ""
    what = ", ".join(f"{k}={a!r} there, {b!r} in this run" for k, (a, b) in diff.items())
    return (f"the converted base {path} has another layout ({what}); convert it again with this "
            f"config: python -m trainer.convert --hf_path {saved.get('source', '...')} --out DIR "
            "--config C")


def read(path: str, target: Any) -> Any:
    """The parameters at ``path``, restored straight into ``target``'s shardings
    (``ShapeDtypeStruct``s with shardings): each process reads only its devices' chunks."""
    where = paths.join(paths.source_of(path), PARAMS)  # a local copy of a gs:// base: the bucket's
    return ocp.StandardCheckpointer().restore(paths.abspath(where), target)
