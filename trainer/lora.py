"""LoRA: which params train, the frozen base, and the Hugging Face PEFT adapter format.

The adapters themselves live in the model (``trainer.model``: ``<proj>_lora_a`` / ``<proj>_lora_b``
``nnx.LoRAParam``s beside each targeted projection). This module is everything around them:

  * ``LoraConfig`` -- the ``lora`` config section, checked;
  * ``split`` / ``combine`` -- a model's param dict <-> (trainable, frozen). With LoRA on only the
    adapters are trainable; the train step differentiates them alone and the optimizer holds state
    for them alone. Off, everything is trainable and the frozen part is empty: one code path;
  * ``freeze_leaf`` -- the frozen base as stored: cast to ``lora.base_dtype``, or quantised
    (``lora.base_quant``, ``trainer.quant``) for QLoRA;
  * PEFT: ``peft_tensors`` / ``adapter_config`` write an adapter ``peft.PeftModel.from_pretrained``
    loads, ``read_peft`` reads one back (``lora.init_from``), ``merge`` folds adapters into the
    weights for a plain HF export;
  * ``fingerprint`` -- the base model's identity, kept in each checkpoint so a resume refuses
    another base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

from trainer import quant
from trainer.model import LORA_TARGETS, ModelConfig

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


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(LORA_TARGETS)
    init: str = "peft"
    base_dtype: str = ""   # "" = model.param_dtype
    base_quant: str = ""   # "" | int8 | nf4
    init_from: str = ""    # a PEFT adapter directory

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @classmethod
    def from_config(cls, config: Any) -> LoraConfig:
        section = dict(config.get("lora", {}) or {})
        targets = section.get("targets", cls.targets)
        if isinstance(targets, str):
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        section["targets"] = tuple(targets)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in section.items() if k in names})

    def problems(self) -> list[str]:
        out = []
        if self.rank < 0:
            out.append(f"lora.rank must be >= 0 (0: off), got {self.rank}")
        if not self.enabled:
            for key in ("base_quant", "init_from"):
                if getattr(self, key):
                    out.append(f"lora.{key} is set but lora.rank is 0 (LoRA off); set lora.rank")
            return out
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            out.append(f"lora.targets: unknown {', '.join(map(repr, bad))}; valid: {', '.join(LORA_TARGETS)}")
        if not self.targets:
            out.append(f"lora.targets is empty; valid: {', '.join(LORA_TARGETS)}")
        if self.alpha <= 0:
            out.append(f"lora.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            out.append(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.init != "peft":
            out.append(f"lora.init must be 'peft' (A Kaiming-uniform, B zeros), got {self.init!r}")
        if self.base_dtype not in ("", "float32", "bfloat16", "float16"):
            out.append(f"lora.base_dtype must be float32, bfloat16 or float16 (or empty), got {self.base_dtype!r}")
        if self.base_quant not in ("", *quant.KINDS):
            out.append(f"lora.base_quant must be {' or '.join(quant.KINDS)} (or empty), got {self.base_quant!r}")
        return out

    def model_fields(self) -> dict[str, Any]:
        """The ``ModelConfig`` fields this section sets."""
        if not self.enabled:
            return {"lora_rank": 0}
        return {"lora_rank": self.rank, "lora_alpha": float(self.alpha), "lora_dropout": float(self.dropout),
                "lora_targets": tuple(self.targets)}


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
    from trainer.hf_io import np_dtype  # noqa: PLC0415
    return x.astype(np_dtype(dtype))


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
        for name in LORA_TARGETS:
            if f"{name}_lora_a" in tree:
                w, a, b = (np.asarray(x) for x in (tree[name], tree[f"{name}_lora_a"], tree[f"{name}_lora_b"]))
                if cfg.scan_layers:  # stacked: one delta per layer
                    out[name] = w.astype(np.float32) + np.stack([delta(a[i], b[i], cfg) for i in range(len(a))])
                else:
                    out[name] = w.astype(np.float32) + delta(a, b, cfg)
        return out
    return walk(params)


def _check_peft_family(model_type: str) -> None:
    from trainer.hf_io import LLAMA_LIKE  # noqa: PLC0415
    if model_type not in LLAMA_LIKE:
        raise LoraError(f"PEFT adapters are written for the Llama-like families ({', '.join(LLAMA_LIKE)}), "
                        f"not {model_type!r} (GPT-2 fuses q/k/v into one matrix); export the merged model "
                        "instead (trainer.export without --adapter)")


def peft_name(layer: int, target: str, which: str) -> str:
    return f"base_model.model.model.layers.{layer}.{PEFT_MODULES[target]}.lora_{which}.weight"


def peft_tensors(params: dict[str, Any], cfg: ModelConfig, model_type: str) -> dict[str, np.ndarray]:
    """PEFT's ``adapter_model.safetensors`` tensors from our (host) params: ``lora_A [r, in]``,
    ``lora_B [out, r]`` with ``in``/``out`` flattened as HF flattens them (``[heads * head_dim]``)."""
    _check_peft_family(model_type)
    out = {}
    for i, layer in enumerate(_layers(params, cfg)):
        for target in cfg.lora_targets:
            part = layer["attn" if PEFT_MODULES[target].startswith("self_attn") else "mlp"]
            if f"{target}_lora_a" not in part:
                continue
            a, b = np.asarray(part[f"{target}_lora_a"]), np.asarray(part[f"{target}_lora_b"])
            out[peft_name(i, target, "A")] = np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
            out[peft_name(i, target, "B")] = np.ascontiguousarray(b.reshape(b.shape[0], -1).T)
    return out


def adapter_config(cfg: ModelConfig, base: str, model_type: str) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for our adapters."""
    _check_peft_family(model_type)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": sorted(PEFT_MODULES[t].split(".")[-1] for t in cfg.lora_targets),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}


def read_peft(path: str, cfg: ModelConfig, model_type: str, expected: dict[str, Any]) -> dict[str, Any]:
    """Our adapter params (numpy, in our layout; scanned if ``cfg.scan_layers``) from a PEFT adapter
    directory. ``expected``: the adapter part of our params (shapes), which the file must fill.
    Anything that does not fit -- another PEFT type, other r/alpha/targets, another base -- is one
    ``LoraError`` line."""
    _check_peft_family(model_type)
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise LoraError(f"lora.init_from: {path!r} is not a PEFT adapter directory (no adapter_config.json)")
    with open(cfg_path) as f:
        ac = json.load(f)
    if ac.get("peft_type") != "LORA":
        raise LoraError(f"lora.init_from: {cfg_path} is a {ac.get('peft_type')!r} adapter; only LORA is supported")
    for key, ok in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False)):
        if bool(ac.get(key, False)) != ok:
            raise LoraError(f"lora.init_from: {cfg_path} sets {key}={ac.get(key)}; not supported")
    if ac.get("bias", "none") != "none" or ac.get("modules_to_save"):
        raise LoraError(f"lora.init_from: {cfg_path} trains biases or whole modules "
                        f"(bias={ac.get('bias')!r}, modules_to_save={ac.get('modules_to_save')}); not supported")
    if ac.get("rank_pattern") or ac.get("alpha_pattern"):
        raise LoraError(f"lora.init_from: {cfg_path} has per-module ranks/alphas; not supported")
    targets = ac.get("target_modules") or []
    if isinstance(targets, str):
        raise LoraError(f"lora.init_from: {cfg_path} gives target_modules as a pattern ({targets!r}); "
                        "only a list of module names is supported")
    ours = {PEFT_MODULES[t].split(".")[-1]: t for t in PEFT_MODULES}
    theirs = sorted(ours[t] for t in targets if t in ours)
    if len(theirs) != len(targets):
        raise LoraError(f"lora.init_from: {cfg_path} targets {targets}; the modules we know are "
                        f"{sorted(ours)}")
    want = {"lora.rank": (ac.get("r"), cfg.lora_rank), "lora.alpha": (ac.get("lora_alpha"), cfg.lora_alpha),
            "lora.targets": (",".join(theirs), ",".join(sorted(cfg.lora_targets)))}
    diff = [f"{k}={v[0]}" for k, v in want.items()
            if (v[0] != v[1] if k == "lora.targets" else float(v[0] or 0) != float(v[1]))]
    if diff:
        raise LoraError(f"lora.init_from: the adapter in {path} was trained with {', '.join(diff)}; pass "
                        "the same values (--config." + " --config.".join(diff) + ")")
    from safetensors.numpy import load_file  # noqa: PLC0415
    files = [f for f in ("adapter_model.safetensors",) if os.path.isfile(os.path.join(path, f))]
    if not files:
        raise LoraError(f"lora.init_from: no adapter_model.safetensors in {path} (pickled .bin adapters "
                        "are refused: loading them can run code)")
    tensors = load_file(os.path.join(path, files[0]))
    tensors = {k.replace(".default.", "."): v for k, v in tensors.items()}
    layers = []
    for i in range(cfg.num_hidden_layers):
        layer: dict[str, dict[str, np.ndarray]] = {}
        for target in cfg.lora_targets:
            part = "attn" if PEFT_MODULES[target].startswith("self_attn") else "mlp"
            got = []
            for which in ("A", "B"):
                name = peft_name(i, target, which)
                if name not in tensors:
                    raise LoraError(f"lora.init_from: {path} has no tensor {name} (an adapter for "
                                    "another model?)")
                got.append(tensors[name])
            want_a = _expected_leaf(expected, cfg, i, part, f"{target}_lora_a")
            want_b = _expected_leaf(expected, cfg, i, part, f"{target}_lora_b")
            a_hf, b_hf = got
            if a_hf.shape != (cfg.lora_rank, int(np.prod(want_a[:-1]))) or \
                    b_hf.shape != (int(np.prod(want_b[1:])), cfg.lora_rank):
                raise LoraError(
                    f"lora.init_from: {path}: {peft_name(i, target, 'A')} is {tuple(a_hf.shape)} and lora_B "
                    f"{tuple(b_hf.shape)}, but this base's {PEFT_MODULES[target]} needs "
                    f"({cfg.lora_rank}, {int(np.prod(want_a[:-1]))}) and ({int(np.prod(want_b[1:]))}, "
                    f"{cfg.lora_rank}): the adapter was trained on another base model")
            layer.setdefault(part, {})[f"{target}_lora_a"] = a_hf.T.reshape(want_a)
            layer[part][f"{target}_lora_b"] = b_hf.T.reshape(want_b)
        layers.append(layer)
    if cfg.scan_layers:
        import jax  # noqa: PLC0415
        return {"layers": jax.tree.map(lambda *xs: np.stack(xs), *layers)}
    return {"layers": dict(enumerate(layers))}


def _expected_leaf(expected, cfg: ModelConfig, i: int, part: str, name: str) -> tuple[int, ...]:
    leaf = expected["layers"][part][name] if cfg.scan_layers else expected["layers"][i][part][name]
    shape = tuple(leaf.shape)
    return shape[1:] if cfg.scan_layers else shape


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
