"""Hugging Face checkpoints <-> our parameters: config mapping, weight layout, safetensors I/O.

HF stores linear weights as ``[out, in]``; we store ``[in, out]`` with attention split per head
(``q: [embed, heads, head_dim]``), so every mapping is a transpose plus a reshape (GPT-2's Conv1D
weights are already ``[in, out]``, and its q/k/v are one fused matrix). Both sides use the "rotate
half" RoPE layout, so q/k need no permutation.

Each family's layout is one table of *links* -- (our leaves, HF tensors, to_ours, to_hf) -- read in
one direction by import and in the other by export, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from trainer.io import gguf as gguf_io
from trainer.models.config import ModelConfig

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
SUPPORTED = (*LLAMA_LIKE, "gpt2")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "gelu": "gelu"}


HFError = gguf_io.GGUFError  # one error type for every base-model format this module reads

# ---------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# ---------------------------------------------------------------------------------------------

def normalized_config(hf: Mapping[str, Any]):
    """transformers' own config object for a ``config.json`` dict, in its current normal form.

    Hub repos ship config.json files in the form the transformers release of their day wrote (Gemma 2
    without ``layer_types``, Gemma 3 with ``sliding_window_pattern``/``rope_local_base_freq``, Gemma 1
    with ``hidden_act: gelu`` meaning the tanh form, ``rope_scaling`` for ``rope_parameters`` ...).
    transformers' config classes normalise every one of those vintages (needing no torch); we read
    their normalised attributes rather than re-implement the legacy rules.
    """
    import transformers  # noqa: PLC0415
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise HFError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED)}")
    kw = {k: v for k, v in hf.items() if k != "model_type"}
    try:
        return transformers.AutoConfig.for_model(mt, **kw)
    except (ValueError, TypeError, KeyError) as e:
        raise HFError(f"transformers cannot read this {mt} config: {e}") from e


def _rope(c) -> dict[str, Any]:
    rp = dict(getattr(c, "rope_parameters", None) or {})
    full, local = (rp.get("full_attention", {}), rp.get("sliding_attention", {})) \
        if "full_attention" in rp else (rp, {})
    kind = full.get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise HFError(f"RoPE type {kind!r} is not supported (default, linear, llama3)")
    out = {"rope_theta": float(full.get("rope_theta", 10000.0)), "rope_type": kind,
           "rope_factor": float(full.get("factor", 1.0))}
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(full["low_freq_factor"]),
                   rope_high_freq_factor=float(full["high_freq_factor"]),
                   rope_original_max_position_embeddings=int(full["original_max_position_embeddings"]))
    if local.get("rope_type", "default") != "default":
        raise HFError("scaled RoPE on sliding-window layers is not supported")
    if local.get("rope_theta"):
        out["rope_local_theta"] = float(local["rope_theta"])
    return out


def model_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Our ``ModelConfig`` from an HF ``config.json`` dict of any vintage (see ``normalized_config``)."""
    c = normalized_config(hf)
    mt = c.model_type
    if mt == "gpt2":
        if c.scale_attn_by_inverse_layer_idx or c.reorder_and_upcast_attn:
            raise HFError("GPT-2 variants with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn "
                          "are not supported")
        e = c.n_embd
        kw = dict(vocab_size=c.vocab_size, hidden_size=e, intermediate_size=c.n_inner or 4 * e,
                  num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                  num_key_value_heads=c.n_head, rms_norm_eps=c.layer_norm_epsilon,
                  tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=c.n_positions,
                  qkv_bias=True, o_bias=True, mlp_bias=True, norm="layer", mlp="plain",
                  position_embedding="learned", activation=_activation_of(c.activation_function))
        return ModelConfig(**{**kw, **overrides})
    if getattr(c, "mlp_bias", False):
        raise HFError("mlp_bias=True is not supported")
    gemma = mt.startswith("gemma")
    # Gemma 2/3 name their activation hidden_activation; the others (and Gemma 1, normalised to the
    # tanh form by its config class) hidden_act.
    act = _activation_of(getattr(c, "hidden_activation", None) or c.hidden_act)
    window = int(getattr(c, "sliding_window", None) or 0)
    layer_types = tuple(getattr(c, "layer_types", None) or ()) if window else ()
    kw = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads or c.num_attention_heads,
        head_dim=getattr(c, "head_dim", None), rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=bool(c.tie_word_embeddings), max_position_embeddings=c.max_position_embeddings,
        qkv_bias=mt == "qwen2" or bool(getattr(c, "attention_bias", False)),
        o_bias=mt != "qwen2" and bool(getattr(c, "attention_bias", False)),
        qk_norm=mt in ("qwen3", "gemma3_text"), norm_offset=1.0 if gemma else 0.0,
        activation=act, embed_scale=gemma, post_norms=mt in ("gemma2", "gemma3_text"),
        attn_logit_softcap=float(getattr(c, "attn_logit_softcapping", None) or 0.0),
        final_logit_softcap=float(getattr(c, "final_logit_softcapping", None) or 0.0),
        query_pre_attn_scalar=float(getattr(c, "query_pre_attn_scalar", None) or 0.0),
        sliding_window=window, layer_types=layer_types, **_rope(c))
    return ModelConfig(**{**kw, **overrides})


def _activation_of(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise HFError(f"activation {name!r} is not supported ({', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """A Llama ``config.json`` for a model trained from scratch (imported runs keep their own)."""
    if cfg.position_embedding != "rope" or cfg.norm != "rms" or cfg.mlp != "gated" or cfg.norm_offset:
        raise HFError("only Llama-architecture models trained from scratch can get a generated config")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_size,
            "rms_norm_eps": cfg.rms_norm_eps, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.qkv_bias,
            "max_position_embeddings": rope_positions(cfg), "torch_dtype": "float32"}


def rope_positions(cfg: ModelConfig) -> int:
    """The ``max_position_embeddings`` an exported from-scratch model states: the largest power of two
    within the longest RoPE wavelength, ``2 pi theta^((d - 2) / d)``.

    A RoPE model has no position table, so the training length (36 tokens for the demo) is no limit;
    past the longest wavelength, though, its slowest rotation wraps around and positions alias. How
    well it *attends* that far depends on what it was trained on (the export says nothing about that).
    """
    d = cfg.head_size
    wavelength = 2 * math.pi * cfg.rope_theta ** ((d - 2) / d)
    return max(2 ** int(math.log2(wavelength)), cfg.max_position_embeddings)


# ---------------------------------------------------------------------------------------------
# Weight layout: one table of links per family, read both ways
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Link:
    ours: tuple[tuple[Any, ...], ...]  # paths into our param dict
    hf: tuple[str, ...]                # HF tensor names
    to_ours: Callable[..., tuple[np.ndarray, ...]]
    to_hf: Callable[..., tuple[np.ndarray, ...]]


def _one(ours, hf, fwd, back) -> Link:
    return Link((ours,), (hf,), lambda x: (fwd(x),), lambda x: (back(x),))


def _same(ours, hf) -> Link:
    return _one(ours, hf, lambda x: x, lambda x: x)


def _linear(ours, hf) -> Link:  # HF [out, in] <-> ours [in, out]
    return _one(ours, hf, lambda x: x.T, lambda x: x.T)


def _heads_in(ours, hf, e, h, d) -> Link:  # HF [h*d, e] <-> ours [e, h, d]
    return _one(ours, hf, lambda x: x.T.reshape(e, h, d), lambda x: x.reshape(e, h * d).T)


def _heads_out(ours, hf, e, h, d) -> Link:  # HF [e, h*d] <-> ours [h, d, e]
    return _one(ours, hf, lambda x: x.T.reshape(h, d, e), lambda x: x.reshape(h * d, e).T)


def _head_bias(ours, hf, h, d) -> Link:  # HF [h*d] <-> ours [h, d]
    return _one(ours, hf, lambda x: x.reshape(h, d), lambda x: x.reshape(h * d))


def links(cfg: ModelConfig, model_type: str, prefix: str = "") -> list[Link]:
    """The layout table for ``model_type``; ``prefix`` is GPT-2's optional ``transformer.``."""
    e, h, k, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    out: list[Link] = []
    if model_type == "gpt2":
        p = prefix
        out += [_same(("embed",), p + "wte.weight"), _same(("pos_embed",), p + "wpe.weight"),
                _same(("final_norm", "scale"), p + "ln_f.weight"),
                _same(("final_norm", "bias"), p + "ln_f.bias")]
        for i in range(cfg.num_hidden_layers):
            L, q = ("layers", i), f"{p}h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out += [_same((*L, ours, "scale"), f"{q}{theirs}.weight"),
                        _same((*L, ours, "bias"), f"{q}{theirs}.bias")]
            out.append(Link(  # Conv1D [e, 3e] = [q | k | v], already [in, out]
                ((*L, "attn", "q"), (*L, "attn", "k"), (*L, "attn", "v")), (f"{q}attn.c_attn.weight",),
                lambda w: tuple(x.reshape(e, h, d) for x in np.split(w, 3, axis=1)),
                lambda a, b, c: (np.concatenate([x.reshape(e, h * d) for x in (a, b, c)], axis=1),)))
            out.append(Link(
                ((*L, "attn", "q_bias"), (*L, "attn", "k_bias"), (*L, "attn", "v_bias")),
                (f"{q}attn.c_attn.bias",),
                lambda b: tuple(x.reshape(h, d) for x in np.split(b, 3)),
                lambda a, b, c: (np.concatenate([x.reshape(h * d) for x in (a, b, c)]),)))
            out += [_one((*L, "attn", "o"), f"{q}attn.c_proj.weight", lambda x: x.reshape(h, d, e),
                         lambda x: x.reshape(h * d, e)),
                    _same((*L, "attn", "o_bias"), f"{q}attn.c_proj.bias"),
                    _same((*L, "mlp", "up"), f"{q}mlp.c_fc.weight"),
                    _same((*L, "mlp", "up_bias"), f"{q}mlp.c_fc.bias"),
                    _same((*L, "mlp", "down"), f"{q}mlp.c_proj.weight"),
                    _same((*L, "mlp", "down_bias"), f"{q}mlp.c_proj.bias")]
        return out

    out += [_same(("embed",), "model.embed_tokens.weight"), _same(("final_norm", "scale"), "model.norm.weight")]
    if not cfg.tie_word_embeddings:
        out.append(_linear(("lm_head",), "lm_head.weight"))
    for i in range(cfg.num_hidden_layers):
        L, q = ("layers", i), f"model.layers.{i}."
        out += [_same((*L, "attn_norm", "scale"), q + "input_layernorm.weight"),
                _heads_in((*L, "attn", "q"), q + "self_attn.q_proj.weight", e, h, d),
                _heads_in((*L, "attn", "k"), q + "self_attn.k_proj.weight", e, k, d),
                _heads_in((*L, "attn", "v"), q + "self_attn.v_proj.weight", e, k, d),
                _heads_out((*L, "attn", "o"), q + "self_attn.o_proj.weight", e, h, d),
                _linear((*L, "mlp", "gate"), q + "mlp.gate_proj.weight"),
                _linear((*L, "mlp", "up"), q + "mlp.up_proj.weight"),
                _linear((*L, "mlp", "down"), q + "mlp.down_proj.weight")]
        if cfg.qkv_bias:
            out += [_head_bias((*L, "attn", "q_bias"), q + "self_attn.q_proj.bias", h, d),
                    _head_bias((*L, "attn", "k_bias"), q + "self_attn.k_proj.bias", k, d),
                    _head_bias((*L, "attn", "v_bias"), q + "self_attn.v_proj.bias", k, d)]
        if cfg.o_bias:
            out.append(_same((*L, "attn", "o_bias"), q + "self_attn.o_proj.bias"))
        if cfg.qk_norm:
            out += [_same((*L, "attn", "q_norm", "scale"), q + "self_attn.q_norm.weight"),
                    _same((*L, "attn", "k_norm", "scale"), q + "self_attn.k_norm.weight")]
        if cfg.post_norms:  # Gemma 2/3 name the norm *after* attention post_attention_layernorm
            out += [_same((*L, "post_attn_norm", "scale"), q + "post_attention_layernorm.weight"),
                    _same((*L, "mlp_norm", "scale"), q + "pre_feedforward_layernorm.weight"),
                    _same((*L, "post_mlp_norm", "scale"), q + "post_feedforward_layernorm.weight")]
        else:  # ... where Llama uses that name for the norm *before* the MLP
            out.append(_same((*L, "mlp_norm", "scale"), q + "post_attention_layernorm.weight"))
    return out


def _set(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: Any, path: tuple) -> Any:
    """``tree[path[0]][path[1]]...``"""
    for key in path:
        tree = tree[key]
    return tree


def params_from_hf(get: Callable[[str], np.ndarray], cfg: ModelConfig, model_type: str,
                   place: Callable[[tuple, np.ndarray], Any] = lambda path, x: x, prefix: str = "",
                   source: str = "") -> dict[str, Any]:
    """Our pure param dict from HF tensors (``get(name) -> array``), one link at a time.

    ``place(path, array)`` puts each converted leaf where it belongs (e.g. straight into its sharding),
    so no more than one HF tensor is ever held whole, on the host. A tensor whose shape does not fit
    (``place`` raises ``ValueError``) is an ``HFError`` naming ``source`` and the HF tensor.

    With ``cfg.scan_layers`` the per-layer leaves are stacked on the host into ``[layers, ...]`` before
    ``place``: the links are visited one leaf kind at a time (all layers' ``q``, then all ``k`` ...), so
    one kind's layers are held at once, never the whole model.
    """
    dtype = np_dtype(cfg.param_dtype)
    params: dict[str, Any] = {}
    table = links(cfg, model_type, prefix)
    stacked: dict[tuple, list[np.ndarray]] = {}
    n_layers = cfg.num_hidden_layers
    if cfg.scan_layers:  # group each leaf kind's layers together (stable: layer order kept)
        table.sort(key=lambda link: tuple(str(x) for x in _unlayered(link.ours[0])))

    def put(path, value):
        if not (cfg.scan_layers and path[0] == "layers"):
            _set(params, path, place(path, value))
            return
        kind = _unlayered(path)
        stacked.setdefault(kind, []).append(value)
        if len(stacked[kind]) == n_layers:
            _set(params, kind, place(kind, np.stack(stacked.pop(kind))))

    for link in table:
        tensors = [get(n) for n in link.hf]
        try:
            for path, value in zip(link.ours, link.to_ours(*tensors), strict=True):
                put(path, np.asarray(value).astype(dtype))
        except ValueError as e:  # a reshape that cannot work, or ``place``'s shape check
            shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(link.hf, tensors))
            raise HFError(f"{source or 'checkpoint'}: tensor {shapes} does not fit the model its config "
                          f"describes ({e})") from e
    return params


def _unlayered(path: tuple) -> tuple:
    """``("layers", i, *rest)`` -> ``("layers", *rest)``: a leaf's path in the scanned layout."""
    return (path[0], *path[2:]) if path and path[0] == "layers" else path


def params_to_hf(params: Any, cfg: ModelConfig, model_type: str) -> dict[str, np.ndarray]:
    """HF tensors (numpy) from our (host) params: the same table read the other way (scanned
    params are unstacked first)."""
    if cfg.scan_layers:
        from trainer.models.transformer import unstack_layers  # noqa: PLC0415
        params = unstack_layers(params, cfg.num_hidden_layers)
    out = {}
    for link in links(cfg, model_type):
        for name, value in zip(link.hf, link.to_hf(*(np.asarray(get_path(params, p)) for p in link.ours)),
                               strict=True):
            out[name] = np.ascontiguousarray(value)
    return out


def np_dtype(name: str) -> np.dtype:
    """The numpy dtype for ``name``, including ``bfloat16`` (from ml_dtypes, a jax dependency)."""
    import ml_dtypes  # noqa: PLC0415
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


# ---------------------------------------------------------------------------------------------
# Checkpoint directories
# ---------------------------------------------------------------------------------------------

def read_hf_config(path: str) -> dict[str, Any]:
    """The ``config.json`` dict of a base model: an HF directory, or a ``.gguf`` file's metadata."""
    if gguf_io.is_gguf(path):
        return gguf_io.GGUFCheckpoint(path).config
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise HFError(f"{path!r} is not a Hugging Face model directory (no config.json) or a .gguf file")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise HFError(f"{cfg_path}: not readable JSON ({e})") from e
    if hf.get("model_type") == "gemma3":  # a multimodal Gemma 3 checkpoint: use its text model
        raise HFError("model_type 'gemma3' (multimodal) is not supported; use a text-only "
                      "Gemma3ForCausalLM checkpoint (model_type 'gemma3_text')")
    return hf


class SafetensorsReader:
    """Reads tensors by name from a directory's ``*.safetensors`` (single file or sharded + index).

    Only safetensors: pickled ``.bin`` checkpoints can run code when loaded, so they are refused.
    """

    def __init__(self, path: str):
        from safetensors import safe_open  # noqa: PLC0415
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            bins = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
            raise HFError(f"no *.safetensors in {path!r}" + (
                " (found PyTorch pickle files, which are refused because loading them can run code; "
                "convert them to safetensors first)" if bins else ""))
        self._files = {f: safe_open(f, framework="np") for f in files}
        self._where = {name: f for f, h in self._files.items() for name in h.keys()}

    def names(self) -> set[str]:
        return set(self._where)

    def __call__(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise HFError(f"tensor {name!r} not found in the checkpoint's safetensors files")
        return self._files[self._where[name]].get_tensor(name)


def open_weights(path: str) -> SafetensorsReader | gguf_io.GGUFCheckpoint:
    """``reader(hf_tensor_name) -> np.ndarray`` (and ``reader.names()``) for an HF directory or a GGUF
    file: GGUF tensors come back dequantised, under their HF names and in HF's layout."""
    return gguf_io.GGUFCheckpoint(path) if gguf_io.is_gguf(path) else SafetensorsReader(path)


def load_hf(path: str, cfg: ModelConfig, model_type: str,
            place: Callable[[tuple, np.ndarray], Any] = lambda path, x: x) -> dict[str, Any]:
    """Reads a checkpoint's weights (HF directory or GGUF file) into our param dict
    (see ``params_from_hf``)."""
    reader = open_weights(path)
    prefix = "transformer." if model_type == "gpt2" and "transformer.wte.weight" in reader.names() else ""
    return params_from_hf(reader, cfg, model_type, place, prefix, source=path)


def load_model(path: str):
    """``(graphdef, params, cfg)`` of an HF directory or GGUF file through our import, on the default
    device, unsharded: for tools and tests that want the model as it is (benchmarks, parity checks);
    training goes through ``modeling.ModelSpec`` (shardings, LoRA)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from trainer.models.transformer import Transformer  # noqa: PLC0415
    raw = read_hf_config(path)
    cfg = model_config_from_hf(raw)
    params = jax.tree.map(jnp.asarray, load_hf(path, cfg, raw["model_type"]))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return graphdef, params, cfg


def save_hf(tensors: dict[str, np.ndarray], out: str, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes tensors as ``model.safetensors``, or shards + ``model.safetensors.index.json``."""
    from safetensors.numpy import save_file  # noqa: PLC0415
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
                   "weight_map": weight_map}, f, indent=2)
    return names
