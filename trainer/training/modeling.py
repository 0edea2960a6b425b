"""The run's model: its architecture (the base model's ``config.json``, GGUF metadata or the spec's
``model`` section), the mesh and logical rules it is sharded by, and ``ModelSpec`` -- the graph split
once from the shardings of its parameters, with the ways to fill them (init, a base checkpoint, a
converted base, a PEFT adapter)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from trainer import sharding as sharding_lib
from trainer.errors import UserError
from trainer.io import base_checkpoint as base_ckpt
from trainer.io import hf as hf_io
from trainer.io import paths
from trainer.io import peft as peft_io
from trainer.models import lora as lora_lib
from trainer.models import quant
from trainer.models.attention import resolve_attention
from trainer.models.attention_kernels import splash_block
from trainer.models.config import ModelConfig
from trainer.models.transformer import Transformer, keys_per_block
from trainer.settings.spec import RunSpec

# the key streams of the model's init, seeded seed, seed + 1: the base, the adapters
STREAMS = ("default", "lora")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hf_path(config: RunSpec) -> str:
    """The base model the run starts from: ``model.hf_path`` (an HF directory) or ``model.gguf_path``
    (a GGUF file); "" for a model trained from scratch."""
    hf, gg = config.model.hf_path, config.model.gguf_path
    if hf and gg:
        raise UserError("set model.hf_path or model.gguf_path, not both")
    return local_base(hf or gg)


@functools.lru_cache(maxsize=None)
def local_base(path: str) -> str:
    """A gs:// base as a local copy (once per host): its config, tokenizer and weights where readers
    need files; a converted base's sharded parameters stay in the bucket, read by chunk."""
    if not paths.is_remote(path):
        return path
    try:
        return paths.local_copy(path, skip=base_ckpt.SKIP_IN_LOCAL_COPY)
    except Exception as e:  # noqa: BLE001 -- gcsfs/etils raise many types
        raise UserError(f"base model {path}: cannot be read ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]})") from e


def architecture(config: RunSpec) -> tuple[dict[str, Any] | None, str]:
    """``(config.json dict, where it came from)`` of the base model; ``(None, "")`` from scratch.

    The checkpoint's own config when it is here, else ``model.arch_json`` (relative paths are tried
    from the working directory, then from the repository root)."""
    path = hf_path(config)
    if path and os.path.exists(path):
        try:
            return hf_io.read_hf_config(path), path
        except hf_io.HFError as e:
            raise UserError(f"base model: {e}") from e
    arch = config.model.arch_json
    if arch:
        for candidate in (arch, os.path.join(_REPO, arch)):
            if os.path.isfile(candidate):
                with open(candidate) as f:
                    return json.load(f), candidate
        raise UserError(f"model.arch_json: {arch!r} not found")
    if path:
        raise UserError(f"the base model {path!r} is not here and the config has no model.arch_json "
                        "(a copy of its config.json) to dry-run from")
    return None, ""


def model_config(config: RunSpec, vocab_size: int,
                 hf_config: dict[str, Any] | None = None, platform: str | None = None) -> ModelConfig:
    """From the base model's ``config.json`` or GGUF metadata (only dtypes, remat, layer scanning and
    the attention backend are taken from ``config.model``), or from ``config.model`` with the tokenizer's vocabulary
    for a new model. ``hf_config``: the base model's config.json dict when it is already known (the
    ahead-of-time check reads a copy kept in ``configs/`` instead of the absent checkpoint)."""
    runtime = {k: getattr(config.model, k) for k in (
        "dtype", "param_dtype", "attention_impl", "remat", "scan_layers", "attention_block_size",
        "splash_block_size", "splash_fused_backward")}
    runtime["packed_inputs"] = config.data.packing != "none"
    runtime["max_segments"] = config.data.max_segments_per_row if runtime["packed_inputs"] else 1
    runtime.update(config.lora.model_fields())
    axes = dict(rules(config))  # mesh axes of attention's batch/head dims (for kernels under shard_map)
    as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else ((v,) if v else ())  # noqa: E731
    runtime.update(attention_batch_axes=as_tuple(axes.get("batch")),
                   attention_head_axes=as_tuple(axes.get("heads")))
    if hf_config is not None or (path := hf_path(config)):
        try:
            cfg = hf_io.model_config_from_hf(hf_config or hf_io.read_hf_config(path), **runtime)
        except hf_io.HFError as e:
            raise UserError(f"base model: {e}") from e
    else:
        cfg = ModelConfig.from_dict({**dataclasses.asdict(config.model), **runtime, "vocab_size": vocab_size,
                                     "max_position_embeddings": config.data.max_length})
    if problem := lora_lib.rank_problem(cfg):
        raise UserError(problem)
    try:
        impl = resolve_attention(cfg, platform)
    except ValueError as e:
        raise UserError(f"model.attention_impl: {e}") from e
    if impl == "splash":
        try:
            splash_block(cfg, config.data.max_length)
        except ValueError as e:
            raise UserError(f"{e}: data.max_length={config.data.max_length}, model.splash_block_size="
                            f"{config.model.splash_block_size} (or set model.attention_impl=xla)") from e
    return dataclasses.replace(cfg, attention_impl=impl)  # "auto" resolved for the target devices


def make_mesh(config: RunSpec) -> Mesh:
    try:
        return sharding_lib.make_mesh(dataclasses.asdict(config.mesh))
    except ValueError as e:
        raise UserError(str(e)) from e


def rules(config: RunSpec) -> list[tuple[str, Any]]:
    return list(config.sharding.rules)


def abstract_with_shardings(fn, shardings: Any) -> Any:
    """``jax.eval_shape(fn)`` with each leaf's target sharding attached: what Orbax restores into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        jax.eval_shape(fn), shardings)


@dataclasses.dataclass
class ModelSpec:
    """The model split once into a static graph and the shardings of its parameters.

    ``params`` everywhere below means the model's whole param dict as the run holds it: with LoRA
    (``lora``) the frozen base leaves are cast or quantised (``QTensor``s) and the adapters sit beside
    them; ``split`` separates what trains from what does not.
    """

    cfg: ModelConfig
    graphdef: nnx.GraphDef
    param_shardings: Any  # pure dict of NamedSharding (QTensor of them where quantised), like params
    mesh: Mesh
    hf_path: str = ""
    lora: lora_lib.LoraConfig = dataclasses.field(default_factory=lora_lib.LoraConfig)

    def init_params_fn(self, seed: int, counts: dict[str, jax.Array] | None = None):
        """``() -> params`` as the model creates them: every leaf in ``param_dtype``, unquantised.
        ``counts``: where the key streams start (``_jit_by_layer``), else at 0."""
        cfg = self.cfg

        def make():
            rngs = nnx.Rngs(**{name: seed + i for i, name in enumerate(STREAMS)})
            for name, count in (counts or {}).items():
                getattr(rngs, name).count.set_value(count)
            return nnx.state(Transformer(cfg, rngs=rngs), nnx.Param).to_pure_dict()
        return make

    def freeze(self, params: Any) -> Any:
        """The frozen base leaves as the run stores them (``lora.base_dtype`` / ``lora.base_quant``)."""
        if not self.lora.enabled:
            return params
        return lora_lib.map_frozen(params, lambda path, x: lora_lib.freeze_leaf(
            path, x, self.lora, self.cfg.param_dtype))

    def params_fn(self, seed: int, counts: dict[str, jax.Array] | None = None):
        """``() -> params`` as the run holds them (frozen leaves cast/quantised)."""
        make = self.init_params_fn(seed, counts)
        return lambda: self.freeze(make())

    def _jit_by_layer(self, make: Callable[[ModelSpec, Any], Callable[[], Any]], shardings: Any) -> Any:
        """``jax.jit(make(self, None), out_shardings=shardings)()``, equal bitwise, but an unscanned
        model's layers come from one program compiled once and called per layer: in a single program
        each layer's random init is its own ops, which XLA compiles one by one (a 30-layer model's
        LoRA adapters: 44 s here; its full init: 40 s). ``make(spec, counts)`` builds ``spec``'s tree
        with the key streams starting at ``counts``: layer ``i`` of this model is layer 0 of a one-layer
        model whose streams start ``i`` blocks' keys later (``keys_per_block``)."""
        cfg = self.cfg
        if cfg.scan_layers or cfg.num_hidden_layers < 2 or "layers" not in shardings:
            return jax.jit(make(self, None), out_shardings=shardings)()
        # everything but the layers (their ops, unused, are dropped before XLA compiles)
        rest = jax.jit(lambda: {k: v for k, v in make(self, None)().items() if k != "layers"},
                       out_shardings={k: v for k, v in shardings.items() if k != "layers"})()
        one = dataclasses.replace(self, cfg=dataclasses.replace(cfg, num_hidden_layers=1))
        per_block = keys_per_block(cfg, STREAMS)
        layer = jax.jit(lambda counts: make(one, counts)()["layers"][0],
                        out_shardings=shardings["layers"][0])
        layers = {i: layer({n: jnp.uint32(i * k) for n, k in per_block.items()})
                  for i in range(cfg.num_hidden_layers)}
        return {**rest, "layers": layers}

    def split(self, params: Any) -> tuple[Any, Any]:
        """``(trainable, frozen)`` (``trainer.models.lora.split``)."""
        return lora_lib.split(params, self.lora.enabled)

    def abstract_params(self) -> Any:
        return abstract_with_shardings(self.params_fn(0), self.param_shardings)

    def abstract_trainable(self) -> Any:
        """What a checkpoint's ``params`` item holds: the adapters with LoRA, else everything."""
        return self.split(self.abstract_params())[0]

    def init_params(self, seed: int) -> Any:
        """The run's starting parameters, created or read directly in their shardings.

        From scratch: a jitted init with ``out_shardings`` (never whole on one device). From an HF
        checkpoint: each tensor is read on the host, converted (and with LoRA cast or quantised), and
        each device receives only its shard (``jax.make_array_from_callback``); fresh adapters come
        from a jitted init of the adapters alone. ``lora.init_from`` then replaces the adapters with a
        PEFT adapter's.
        """
        if not self.hf_path:
            params = self._jit_by_layer(lambda spec, counts: spec.params_fn(seed, counts),
                                        self.param_shardings)
        else:
            params = self.load_base()
            if self.lora.enabled:
                adapters = self._jit_by_layer(
                    lambda spec, counts: lambda: spec.split(spec.params_fn(seed, counts)())[0],
                    self.split(self.param_shardings)[0])
                params = lora_lib.combine(params, adapters)
        if self.lora.init_from:
            params = lora_lib.combine(params, self._read_adapter())
        return params

    def load_base(self) -> Any:
        """The base model's parameters in their shardings (frozen as the run stores them with LoRA)."""
        if base_ckpt.is_converted(self.hf_path):
            return self._load_converted()
        expected = jax.eval_shape(self.init_params_fn(0))
        lcfg, param_dtype = self.lora, self.cfg.param_dtype

        def place(path, value):
            want = hf_io.get_path(expected, path)
            if value.shape != want.shape:
                raise ValueError(f"our {'/'.join(map(str, path))} would be {value.shape}, the config "
                                 f"implies {want.shape}")
            sh = hf_io.get_path(self.param_shardings, path)
            if lcfg.enabled:
                value = lora_lib.freeze_leaf(path, value, lcfg, param_dtype)
            put = lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])  # noqa: E731
            if isinstance(value, quant.QTensor):
                return quant.QTensor(put(value.codes, sh.codes), put(value.scale, sh.scale),
                                     value.kind, value.in_axes, value.block)
            return put(value, sh)
        try:
            model_type = hf_io.read_hf_config(self.hf_path)["model_type"]
            params = hf_io.load_hf(self.hf_path, self.cfg, model_type, place)
        except hf_io.HFError as e:
            raise UserError(f"base model: {e}") from e
        want = self.split(expected)[1] if self.lora.enabled else expected
        is_q = lambda x: isinstance(x, quant.QTensor)  # noqa: E731
        if jax.tree.structure(params, is_leaf=is_q) != jax.tree.structure(want):
            raise UserError(f"base model {self.hf_path}: the checkpoint's tensors do not fill the model "
                            f"({len(jax.tree.leaves(params, is_leaf=is_q))} of {len(jax.tree.leaves(want))})")
        return params

    def abstract_base(self) -> Any:
        """The base parameters as a converted base stores them (no adapters), with shardings."""
        plain = abstract_with_shardings(self.init_params_fn(0), self.param_shardings)
        return self.split(plain)[1] if self.lora.enabled else plain

    def _load_converted(self) -> Any:
        """A base converted by ``trainer.convert``: restored by Orbax straight into the parameters'
        shardings (each process reads its devices' chunks), then frozen as the run stores it."""
        if problem := base_ckpt.layout_problem(
                self.hf_path, {"scan_layers": self.cfg.scan_layers, "param_dtype": self.cfg.param_dtype}):
            raise UserError(problem)
        if self.lora.base_quant:
            raise UserError("lora.base_quant on a converted base is not supported yet: point "
                            "model.hf_path at the Hugging Face directory it came from")
        try:
            params = base_ckpt.read(self.hf_path, self.abstract_base())
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise UserError(f"base model {self.hf_path}: {(str(e).splitlines() or [''])[0][:300]}") from e
        if not self.lora.enabled:
            return params
        frozen_sh = self.split(self.param_shardings)[1]
        return jax.jit(self.freeze, out_shardings=frozen_sh, donate_argnums=(0,))(params)

    def _read_adapter(self) -> Any:
        """The adapters of ``lora.init_from`` (a PEFT directory), placed in their shardings."""
        model_type = (hf_io.read_hf_config(self.hf_path)["model_type"] if self.hf_path else "llama")
        expected = self.split(jax.eval_shape(self.init_params_fn(0)))[0]
        try:
            host = peft_io.read_peft(self.lora.init_from, self.cfg, model_type, expected)
        except lora_lib.LoraError as e:
            raise UserError(str(e)) from e
        dtype = jnp.dtype(self.cfg.param_dtype)
        return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, dtype), s), host,
                            self.split(self.param_shardings)[0])


def model_spec(config: RunSpec, vocab_size: int, mesh: Mesh,
               hf_config: dict[str, Any] | None = None) -> ModelSpec:
    cfg = model_config(config, vocab_size, hf_config, platform=mesh.devices.flat[0].platform)
    if cfg.vocab_size < vocab_size:
        raise UserError(f"the tokenizer has {vocab_size} tokens but the model only {cfg.vocab_size} "
                        "embeddings")
    lcfg = config.lora
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0, lora=1)))
    graphdef, abs_params = nnx.split(abstract, nnx.Param)
    shardings = sharding_lib.state_shardings(abs_params, mesh, rules(config)).to_pure_dict()
    if problems := indivisible(abs_params.to_pure_dict(), shardings, mesh):
        raise UserError(f"the mesh does not divide the model's parameters: {'; '.join(problems[:4])}"
                        f"{f' (and {len(problems) - 4} more)' if len(problems) > 4 else ''}. Choose mesh "
                        "sizes that divide these dimensions, or map their logical axes elsewhere in "
                        "sharding.rules")
    if lcfg.base_quant:  # quantised projections: codes follow the weight, scales mostly replicate
        shapes = abs_params.to_pure_dict()

        def q_sharding(path, sh):
            in_axes = lora_lib.frozen_projection(path)
            if in_axes is None:
                return sh
            return quant.sharding(lcfg.base_quant, in_axes, hf_io.get_path(shapes, path).shape, sh)
        shardings = lora_lib.map_frozen(shardings, q_sharding)
    return ModelSpec(cfg, graphdef, shardings, mesh, hf_path(config), lcfg)


def indivisible(shapes: Any, shardings: Any, mesh: Mesh) -> list[str]:
    """``name [shape]: dim D (size) over axis=N`` for every parameter dimension its sharding splits
    unevenly (JAX refuses those deep inside the first ``device_put``, naming no parameter)."""
    out: list[str] = []
    leaves = jax.tree_util.tree_leaves_with_path(shapes)
    for (path, leaf), sh in zip(leaves, jax.tree.leaves(shardings)):
        for dim, axes in enumerate(sh.spec):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
            if leaf.shape[dim] % ways:
                name = ".".join(str(getattr(k, "key", k)) for k in path)
                over = " x ".join(f"{a}={mesh.shape[a]}" for a in names)
                out.append(f"{name} {list(leaf.shape)}: dim {dim} ({leaf.shape[dim]}) over {over}")
    return out


def base_identity(spec: ModelSpec, seed: int) -> dict[str, str] | None:
    """What a LoRA run's checkpoints record of their frozen base (None without LoRA)."""
    if not spec.lora.enabled:
        return None
    return {"path": spec.hf_path, "fingerprint": lora_lib.fingerprint(spec.hf_path, seed)}
