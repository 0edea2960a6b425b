"""GGUF files (llama.cpp's format) -> an HF-style config and HF-named float tensors.

No torch: the ``gguf`` package reads the file and dequantises with numpy (``gguf.quants.dequantize``);
transformers contributes only its torch-free metadata key table (``integrations.ggml.GGUF_CONFIG_MAPPING``).
Its own GGUF loader needs torch even for metadata, so it cannot be called at run time. The file's
tokenizer is built in ``data_pipeline.tokenizer.gguf_tokenizer`` (the data pipeline imports no
trainer code).

A ``GGUFCheckpoint`` answers ``checkpoint(hf_name) -> np.ndarray`` with the HF tensor names and
layouts, so ``hf_io``'s layout tables (and its sharded placement) are reused unchanged.

What differs from an HF checkpoint:
- Names: llama.cpp's ``blk.N.attn_q.weight`` for HF's ``model.layers.N.self_attn.q_proj.weight``.
- llama.cpp's converter permutes the rows of q/k for the ``llama`` architecture (interleaved RoPE
  pairs); that permutation is undone here. Qwen2/3 files use NeoX RoPE and are not permuted.
- Quantised tensors are dequantised to float32 on the host, one tensor at a time.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from data_pipeline import gguf_parse

# llama.cpp architecture -> HF model_type. Gemma files store norm weights shifted by +1 and GPT-2 files
# fuse q/k/v differently; neither is handled, so they are refused rather than loaded wrong.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# Types that gguf.quants dequantises with numpy and that are tested here or in gguf-py itself.
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
               "Q5_K", "Q6_K")


# llama.cpp tensor names -> HF's (``blk.N.`` <-> ``model.layers.N.`` for the per-layer ones).
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
               "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
               "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
               "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
               "attn_v.bias": "self_attn.v_proj.bias", "attn_q_norm.weight": "self_attn.q_norm.weight",
               "attn_k_norm.weight": "self_attn.k_norm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
               "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}


class GGUFError(ValueError):
    """A base-model file or directory this code cannot load (the message names it and what is wrong).

    ``hf_io.HFError`` is the same class: callers catch one error for every checkpoint format."""


class GGUFCheckpoint:
    """One ``.gguf`` file: ``config`` (HF config.json form), ``names()``, ``checkpoint(hf_name)``.

    Cheap to make again (under a millisecond): the file's parse is shared per process
    (``data_pipeline.gguf_parse``), so the config and the weights each open their own."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise GGUFError(f"{path}: no such file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
        try:
            self._reader = gguf_parse.reader(path)  # the tokenizer's and every other instance's parse
        except Exception as e:  # noqa: BLE001 -- a damaged file fails anywhere inside the reader
            raise GGUFError(f"{path}: cannot read the GGUF file ({type(e).__name__}: {e}); "
                            "is it truncated or damaged?") from e
        self.metadata = {k: f.contents() for k, f in self._reader.fields.items()
                         if not k.startswith("tokenizer.ggml.") or k.endswith("_id") or "add_" in k
                         or k in ("tokenizer.ggml.model", "tokenizer.ggml.pre")}
        self.arch = self.metadata.get("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise GGUFError(f"{path}: architecture {self.arch!r} is not supported; supported: "
                            f"{', '.join(ARCHITECTURES)} (or import the model's HF safetensors directory)")
        self._tensors = {t.name: t for t in self._reader.tensors}
        for t in self._reader.tensors:
            if t.tensor_type.name not in QUANT_TYPES:
                raise GGUFError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which is not "
                                f"supported; supported: {', '.join(QUANT_TYPES)}")
        if "rope_freqs.weight" in self._tensors:
            raise GGUFError(f"{path}: RoPE scaling stored as a rope_freqs tensor (Llama 3.1+ files) is "
                            "not supported; import the model's HF safetensors directory instead")
        self.model_type = ARCHITECTURES[self.arch]
        self._hf_to_gguf = self._name_table()
        self.config = self._config()

    # ---- config ------------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        """The HF ``config.json`` dict this file's metadata describes (transformers' key table)."""
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING  # noqa: PLC0415 (no torch)
        table = GGUF_CONFIG_MAPPING[self.arch]
        cfg: dict[str, Any] = {"model_type": self.model_type,
                               "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                                  "qwen3": "Qwen3ForCausalLM"}[self.model_type]]}
        prefix = self.arch + "."
        for key, value in self.metadata.items():
            if key.startswith(prefix) and table.get(key[len(prefix):]):
                cfg[table[key[len(prefix):]]] = value
        if self.arch + ".rope.scaling.type" in self.metadata:
            kind = self.metadata[self.arch + ".rope.scaling.type"]
            if kind not in ("none", "linear"):
                raise GGUFError(f"{self.path}: RoPE scaling {kind!r} is not supported (none, linear)")
            if kind == "linear":
                cfg["rope_scaling"] = {"rope_type": "linear",
                                       "factor": float(self.metadata[self.arch + ".rope.scaling.factor"])}
        if self.arch + ".attention.key_length" in self.metadata:  # head_dim != hidden / heads (Qwen3)
            cfg["head_dim"] = int(self.metadata[self.arch + ".attention.key_length"])
        if "vocab_size" not in cfg:  # older files: the embedding's row count
            cfg["vocab_size"] = int(self._tensors["token_embd.weight"].shape[-1])
        for ours, theirs in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                             ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                             ("pad_token_id", "tokenizer.ggml.padding_token_id")):
            if theirs in self.metadata:
                cfg[ours] = int(self.metadata[theirs])
        cfg["tie_word_embeddings"] = "output.weight" not in self._tensors
        cfg["torch_dtype"] = "bfloat16" if any(t.tensor_type.name == "BF16" for t in self._tensors.values()) \
            else "float32"
        return cfg

    # ---- tensors -----------------------------------------------------------------------------

    def _name_table(self) -> dict[str, str]:
        """HF tensor name -> GGUF tensor name, for every tensor in the file."""
        out = {}
        for name in self._tensors:
            if name in GLOBAL_NAMES:
                out[GLOBAL_NAMES[name]] = name
                continue
            parts = name.split(".", 2)
            if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
                out[f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"] = name
            else:
                raise GGUFError(f"{self.path}: unexpected tensor {name!r} for architecture {self.arch!r}")
        return out

    def names(self) -> set[str]:
        return set(self._hf_to_gguf)

    def __call__(self, hf_name: str) -> np.ndarray:
        """The tensor HF calls ``hf_name``, float32, in HF's layout (``[out, in]`` for linears)."""
        from gguf import quants  # noqa: PLC0415
        if hf_name not in self._hf_to_gguf:
            raise GGUFError(f"{self.path}: no tensor for {hf_name!r} in the file")
        t = self._tensors[self._hf_to_gguf[hf_name]]
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists dimensions fastest first
        try:
            x = quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
        except (ValueError, TypeError) as e:
            raise GGUFError(f"{self.path}: tensor {t.name!r} ({t.tensor_type.name}, shape {shape}) cannot "
                            f"be read: {e}") from e
        if self.arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.config["num_attention_heads"] if "q_proj" in hf_name else \
                self.config.get("num_key_value_heads") or self.config["num_attention_heads"]
            x = unpermute_rope_rows(x, heads)
        return x


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (``convert_hf_to_gguf.LlamaModel.permute``).

    llama.cpp rotates interleaved pairs (x0, x1), (x2, x3)...; HF rotates halves (x0, x_{d/2}) ...; the
    converter reorders each head's rows from halves to pairs. w: [heads * head_dim, in].
    """
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation itself (HF halves -> interleaved pairs); the inverse of the above."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def is_gguf(path: str) -> bool:
    """A ``.gguf`` path, or any regular file (a directory is an HF checkpoint)."""
    return path.endswith(".gguf") or os.path.isfile(path)
