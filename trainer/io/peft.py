"""Hugging Face PEFT adapter files: ``peft_tensors`` / ``adapter_config`` write an adapter that
``peft.PeftModel.from_pretrained`` loads; ``read_peft`` reads one back (``lora.init_from``) into our
layout, refusing in one line what we cannot represent (IA3, DoRA, another rank or base)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from trainer.io.hf import LLAMA_LIKE
from trainer.models.config import ModelConfig
from trainer.models.lora import (  # noqa: F401
    ADAPTER_SUFFIXES,
    PEFT_MODULES,
    LoraConfig,
    LoraError,
    _layers,
    _slice,
)


def _check_peft_family(model_type: str) -> None:
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
