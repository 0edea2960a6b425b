"""LoRA: which params train, the frozen base, merging, and the base's identity.

The adapters themselves live in the model (``trainer.models.transformer``: ``<proj>_lora_a`` / ``<proj>_lora_b``
``nnx.LoRAParam``s beside each targeted projection). This module is everything around them:

  * ``LoraConfig`` (defined in ``trainer.settings.spec``) -- the ``lora`` section of the run spec;
  * ``split`` / ``combine`` -- a model's param dict <-> (trainable, frozen). With LoRA on only the
    adapters are trainable; the train step differentiates them alone and the optimizer holds state
    for them alone. Off, everything is trainable and the frozen part is empty: one code path;
  * ``freeze_leaf`` -- the frozen base as stored: cast to ``lora.base_dtype``, or quantised
    (``lora.base_quant``, ``trainer.models.quant``) for QLoRA;
  * ``merge`` folds adapters into the weights for a plain HF export (PEFT's adapter files are
    ``trainer.io.peft``);
  * ``fingerprint`` -- the base model's identity, kept in each checkpoint so a resume refuses
    another base.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import ml_dtypes
import numpy as np

from trainer.models import quant
from trainer.models.config import ModelConfig
from trainer.settings import options
from trainer.settings.spec import LoraConfig

ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
# our projection -> its HF/PEFT module name (Llama-like families) and the submodule it sits in
PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                "down": "mlp.down_proj"}
# the block projections (quantised by QLoRA) -> their input axes, negative: the same for a weight
# and for its [layers, ...] stack (q: [embed, heads, head_dim] -> (-3,); o: [heads, head_dim, embed])
_FROZEN_PROJECTIONS = {("attn", "q"): (-3,), ("attn", "k"): (-3,), ("attn", "v"): (-3,),
                       ("attn", "o"): (-3, -2), ("mlp", "gate"): (-2,), ("mlp", "up"): (-2,),
                       ("mlp", "down"): (-2,)}


class LoraError(ValueError):
    """A LoRA setting or adapter that cannot be used; the message is one line for the user."""


def rank_problem(cfg: ModelConfig) -> str | None:
    """A rank larger than a targeted projection's smaller side (the update could not be low-rank)."""
    if not cfg.lora_rank:
        return None
    e, f, h, k, d = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                     cfg.num_key_value_heads, cfg.head_size)
    sides = {"q": (e, h * d), "k": (e, k * d), "v": (e, k * d), "o": (h * d, e), "gate": (e, f),
             "up": (e, f), "down": (f, e)}
    if cfg.mlp != "gated":
        sides.pop("gate")
    too_big = [f"{t} ({sides[t][0]}x{sides[t][1]})" for t in cfg.lora_targets
               if t in sides and cfg.lora_rank > min(sides[t])]
    if too_big:
        return (f"lora.rank={cfg.lora_rank} is larger than the projection it adapts: "
                f"{', '.join(too_big)}; use a rank of at most the smaller side")
    return None


# ---------------------------------------------------------------------------------------------
# Trainable / frozen
# ---------------------------------------------------------------------------------------------

def is_adapter(path: tuple) -> bool:
    return bool(path) and str(path[-1]).endswith(ADAPTER_SUFFIXES)


def _partition(tree: Any, pred, path: tuple = ()) -> tuple[Any, Any]:
    if not isinstance(tree, dict):
        return (tree, None) if pred(path) else (None, tree)
    yes, no = {}, {}
    for key, value in tree.items():
        a, b = _partition(value, pred, (*path, key))
        if a is not None and not (isinstance(a, dict) and not a):
            yes[key] = a
        if b is not None and not (isinstance(b, dict) and not b):
            no[key] = b
    return yes, no


def split(params: dict[str, Any], lora: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(trainable, frozen)``: the adapters and the rest with LoRA, else everything and ``{}``.
    Works on any tree shaped like the params (arrays, shardings, shapes)."""
    if not lora:
        return params, {}
    return _partition(params, is_adapter)


def combine(frozen: dict[str, Any], trainable: dict[str, Any]) -> dict[str, Any]:
    """The model's full param dict from its two parts (a merge of nested dicts; no copies)."""
    if not frozen:
        return trainable
    out = dict(frozen)
    for key, value in trainable.items():
        out[key] = combine(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def frozen_projection(path: tuple) -> tuple[int, ...] | None:
    """The input axes (negative) of the weight at ``path``, if it is a block projection."""
    names = tuple(str(p) for p in path if not isinstance(p, int) and not str(p).isdigit())
    return _FROZEN_PROJECTIONS.get(names[-2:]) if len(names) >= 2 else None


def freeze_leaf(path: tuple, x: Any, lcfg: LoraConfig, param_dtype: str) -> Any:
    """A frozen base leaf as stored: block projections quantised (``base_quant``), everything else
    (and all of it without quantisation) cast to ``base_dtype``. ``x``: numpy or jax."""
    in_axes = frozen_projection(path)
    if lcfg.base_quant and in_axes is not None:
        return quant.quantize(x, lcfg.base_quant, in_axes)
    dtype = lcfg.base_dtype or param_dtype
    return x.astype(np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype))


def map_frozen(params: dict[str, Any], fn, path: tuple = ()) -> dict[str, Any]:
    """``fn(path, leaf)`` applied to every non-adapter leaf of a param dict."""
    if not isinstance(params, dict):
        return params if is_adapter(path) else fn(path, params)
    return {k: map_frozen(v, fn, (*path, k)) for k, v in params.items()}


# ---------------------------------------------------------------------------------------------
# Merging and the PEFT format
# ---------------------------------------------------------------------------------------------

def _layers(params: dict[str, Any], cfg: ModelConfig) -> list[dict[str, Any]]:
    """Per-layer dicts (scanned params unstacked)."""
    if cfg.scan_layers:
        return [{k: _slice(v, i) for k, v in params["layers"].items()} for i in range(cfg.num_hidden_layers)]
    return [params["layers"][i] for i in range(cfg.num_hidden_layers)]


def _slice(tree, i):
    return {k: _slice(v, i) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree)[i]


def delta(a: np.ndarray, b: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """The weight update ``(alpha / rank) A B`` in the weight's layout (float32). a: [in..., r]."""
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.tensordot(a32, b32, axes=1) * np.float32(cfg.lora_alpha / cfg.lora_rank)


def merge(params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """Host params with every adapter folded into its weight (``W + (alpha/r) A B``) and removed: the
    plain model, for export. Weights are float32 afterwards."""
    def walk(tree):
        if not isinstance(tree, dict):
            return tree
        out = {k: walk(v) for k, v in tree.items() if not str(k).endswith(ADAPTER_SUFFIXES)}
        for name in options.LORA_TARGETS:
            if f"{name}_lora_a" in tree:
                w, a, b = (np.asarray(x) for x in (tree[name], tree[f"{name}_lora_a"], tree[f"{name}_lora_b"]))
                if cfg.scan_layers:  # stacked: one delta per layer
                    out[name] = w.astype(np.float32) + np.stack([delta(a[i], b[i], cfg) for i in range(len(a))])
                else:
                    out[name] = w.astype(np.float32) + delta(a, b, cfg)
        return out
    return walk(params)


# ---------------------------------------------------------------------------------------------
# The base's identity
# ---------------------------------------------------------------------------------------------

def fingerprint(path: str, seed: int | None = None) -> str:
    """A quick identity of a base model: sha256 over its config and, for each weight file, name, size
    and its first and last MiB (a different checkpoint differs there; reading all of a 16 GB base
    for this would take minutes). A model trained from scratch is its init: ``init:seed=N``."""
    if not path:
        return f"init:seed={seed}"
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path)
        if f == "config.json" or f.endswith((".safetensors", ".gguf")))
    for name in files:
        size = os.path.getsize(name)
        h.update(f"{os.path.basename(name)}:{size}".encode())
        with open(name, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return "sha256:" + h.hexdigest()[:32]
