"""The run spec: every config key, its type and its one default, as frozen typed sections.

A ``configs/*.py`` preset is an ``ml_collections.ConfigDict`` a user overrides from the command line
(``--config.train.num_steps=100``); the entry point turns it, once, into a ``RunSpec`` with
``RunSpec.from_config`` and passes the typed sections on. Library code reads attributes of these
sections and never a default of its own: a default lives here, and only here (``configs/demo.py`` is
``default_config()``; every other preset starts from it). A workdir's ``config.json`` is
``RunSpec.to_dict()``; one written before a key existed loads with that key's default, one with a
key this version does not know is refused in one line (``from_dict``).

Free-form maps whose keys are data, not settings (the sources of a mixture, the synthetic tasks'
knobs, the split fractions) are ``FrozenConfigDict``s: read-only, attribute access, like the rest.
"""

from __future__ import annotations

import dataclasses
import json
import string
from typing import Any, ClassVar

from ml_collections import ConfigDict, FrozenConfigDict

from data_pipeline import sources
from data_pipeline.errors import UserError
from trainer.settings import options

Rules = tuple[tuple[str, Any], ...]
_PUNCT = str.maketrans("", "", string.punctuation)


def _frozen(d: dict[str, Any]):
    return dataclasses.field(default_factory=lambda: FrozenConfigDict(d))


@dataclasses.dataclass(frozen=True)
class Data:
    # name -> source (data_pipeline/source_spec.py lists every source key). A mixture is several
    # entries (with `weight`s); each row remembers its source.
    sources: FrozenConfigDict = dataclasses.field(
        default_factory=lambda: FrozenConfigDict({"synthetic": sources.source(type="synthetic")}))
    # The built-in demo tasks. Payload words over a 10-letter alphabet: every letter is seen often,
    # so a tiny model learns letter-level reverse/sort in minutes; there are still ~110k distinct
    # words. Addition needs the most examples (a 100-entry digit table); counting the fewest.
    synthetic: FrozenConfigDict = _frozen(dict(
        num_rows=10000, seed=0, min_word_len=3, max_word_len=5, alphabet="ABCDEFGHIJ",
        max_first_addend=999, max_second_addend=9, words="random",
        task_weights=dict(reverse=1.0, sort=1.0, double=1.0, count=0.5, upper=0.0, first=0.0, add=2.0)))
    split_fractions: FrozenConfigDict = _frozen(dict(train=0.8, validation=0.1, test=0.1))
    split_salt: str = "flax-ift"
    mixture_rows: int = 0  # train rows per mixture epoch when sources have weights (0: sum of sizes)
    template: str = "chatml"  # chatml | alpaca | plain | tokenizer (its own chat template)
    end_of_turn: str = ""  # text that ends a reply ("": the template's, else the tokenizer's EOS)
    loss_on: str = "all"  # all assistant turns | last
    allow_special_tokens_in_text: bool = False  # True: "<|im_end|>" in data becomes the control token
    # Rows of 72 tokens hold ~2.8 packed examples (p50 25 tokens) of the demo instead of one padded
    # one: 1.7x the supervised tokens per second.
    max_length: int = 72  # model sequence length
    length_policy: str = "drop"  # drop | truncate (oldest turns, then the prompt from the left)
    packing: str = "best_fit"  # none (one example per row, padded) | best_fit | first_fit
    # > 0: a packed row holds at most this many examples (0: no limit). cuDNN's attention over packed
    # rows needs it (its statistics are [rows x this, heads, seq] float32): the GPU presets set it.
    max_segments_per_row: int = 0
    on_bad_row: str = "error"  # error (file:line) | skip (counted in the report)
    max_row_bytes: int = 1_000_000  # a longer line is a bad row
    cache: bool = True  # cache tokenised splits (keyed by data, tokenizer, template, lengths)
    cache_dir: str = ""  # "": ~/.cache/flax_ift/tokenized ($XDG_CACHE_HOME/flax_ift/tokenized where set)
    # tokenisation processes (0: one per 50k rows up to the CPU count, or 1 in a large or JAX process)
    num_proc: int = 0
    loader: FrozenConfigDict = _frozen(dict(read_threads=2, prefetch=8, worker_count=0))


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    kind: str = "train_bpe"  # train_bpe: learn a small BPE on the train split | hf: load `path`
    path: str = ""
    vocab_size: int = 512
    min_frequency: int = 64
    train_sample_rows: int = 20000  # train_bpe learns from a seeded sample of this many rows


@dataclasses.dataclass(frozen=True)
class Model:
    """The architecture (a Llama; ignored when a base model's config.json decides) and how it runs."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    # auto: splash on TPU; cuDNN (unpacked) or the Pallas flash kernel (packed) for bf16 on GPU; else
    # xla (blockwise: query blocks of attention_block_size skip the blocks above the diagonal).
    # Resolved for the target devices by modeling.model_config.
    attention_impl: str = "auto"  # auto | xla | cudnn | flash | splash
    attention_block_size: int = 64  # (raised to 2 x head_dim and to max_length / 8 where smaller)
    # Splash (TPU): its block for queries and keys, forward and backward, in tokens (0: the largest of
    # 512, 256 and 128 that divides data.max_length; else a multiple of 128 that divides it), and its
    # fused backward kernel (dQ computed beside dK/dV: 5 block matmuls instead of 7, with a partial dQ
    # per key block summed after). Which is faster depends on the chip: measure on yours.
    splash_block_size: int = 0
    splash_fused_backward: bool = False
    # none | full | dots | dots_with_context: recompute block activations in the backward pass
    # (dots keeps the projections' outputs; dots_with_context keeps attention's output as well).
    remat: str = "none"
    # Layers under lax.scan with stacked params: compile time independent of depth (accelerator
    # presets set it); the checkpoint keeps the run's layout, HF import/export converts.
    scan_layers: bool = False
    # A Hugging Face checkpoint directory (config.json + *.safetensors) to start from. When set, the
    # architecture keys above are ignored (its config.json decides) and tokenizer.kind="hf" with an
    # empty tokenizer.path uses its tokenizer.
    hf_path: str = ""
    # ... or a GGUF file (llama.cpp; Llama/Qwen2/Qwen3 architectures, F32/F16/BF16/Q8_0/Q4_0/Q4_1/
    # Q5_x/K-quants), dequantised to model.param_dtype on load; tokenizer.kind="hf" uses its tokenizer.
    gguf_path: str = ""
    # A copy of the base model's config.json: what --dry_run compiles when the checkpoint is not here.
    arch_json: str = ""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The ``lora`` section: train low-rank adapters (``trainer.models.lora``), keep the base frozen."""

    rank: int = 0          # 0: full fine-tuning
    alpha: float = 16.0    # the update is (alpha / rank) A B, as in PEFT
    dropout: float = 0.0   # on the adapters' input (PEFT's lora_dropout)
    targets: tuple[str, ...] = options.LORA_TARGETS  # projections of every block
    init: str = "peft"     # A Kaiming-uniform, B zeros: step 0 is the base model exactly
    base_dtype: str = ""   # the frozen base's storage dtype ("": model.param_dtype), e.g. bfloat16
    base_quant: str = ""   # QLoRA: "int8" (per channel) or "nf4" (blockwise 4-bit), dequantised per layer
    init_from: str = ""    # a PEFT adapter directory to start from (continue training, or evaluate)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def problems(self) -> list[str]:
        out = []
        if self.rank < 0:
            out.append(f"lora.rank must be >= 0 (0: off), got {self.rank}")
        if not self.enabled:
            for key in ("base_quant", "init_from"):
                if getattr(self, key):
                    out.append(f"lora.{key} is set but lora.rank is 0 (LoRA off); set lora.rank")
            return out
        bad = [t for t in self.targets if t not in options.LORA_TARGETS]
        if bad:
            out.append(f"lora.targets: unknown {', '.join(map(repr, bad))}; valid: {', '.join(options.LORA_TARGETS)}")
        if not self.targets:
            out.append(f"lora.targets is empty; valid: {', '.join(options.LORA_TARGETS)}")
        if self.alpha <= 0:
            out.append(f"lora.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            out.append(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.init != "peft":
            out.append(f"lora.init must be 'peft' (A Kaiming-uniform, B zeros), got {self.init!r}")
        if self.base_dtype not in ("", "float32", "bfloat16", "float16"):
            out.append(f"lora.base_dtype must be float32, bfloat16 or float16 (or empty), got {self.base_dtype!r}")
        if self.base_quant not in ("", *options.QUANT_KINDS):
            out.append(f"lora.base_quant must be {' or '.join(options.QUANT_KINDS)} (or empty), "
                       f"got {self.base_quant!r}")
        return out

    def model_fields(self) -> dict[str, Any]:
        """The ``ModelConfig`` fields this section sets."""
        if not self.enabled:
            return {"lora_rank": 0}
        return {"lora_rank": self.rank, "lora_alpha": float(self.alpha), "lora_dropout": float(self.dropout),
                "lora_targets": tuple(self.targets)}


@dataclasses.dataclass(frozen=True)
class Optimizer:
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    end_lr_ratio: float = 0.05
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0  # 0: no clipping


@dataclasses.dataclass(frozen=True)
class Train:
    num_steps: int = 900
    batch_size: int = 32  # global, in (packed) rows
    grad_accum_steps: int = 1
    # The loss applies the LM head to this many tokens per device at a time (float32 logits
    # [chunk, vocab]): on an H200 8,192 ran the 1B preset 10% faster than 1,024, in less memory.
    loss_chunk_tokens: int = 8192
    log_every: int = 25
    eval_every: int = 300  # validation loss
    eval_batch_size: int = 128
    checkpoint_every: int = 300
    keep_checkpoints: int = 2  # the last N, plus the best by checkpoint.best_metric
    progress_bar: bool = True
    # A step with a non-finite loss or gradient norm is skipped (params unchanged); this many in a
    # row stop the run (divergence).
    max_bad_steps: int = 20
    # Resuming with another num_steps bends the LR schedule of a run in progress: refused unless True.
    allow_num_steps_change: bool = False


@dataclasses.dataclass(frozen=True)
class Mesh:
    """Axis sizes (they multiply to the device count; one may be -1: the rest)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class Sharding:
    # logical axis -> mesh axes. The model only knows the logical names.
    rules: Rules = (
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("layers", None),  # the stacked axis of scanned layers
        ("norm", None),
    )


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    # What `--checkpoint best` means: val/loss, or an in-training eval metric (val/exact_match,
    # val/rougeL, val/chrf, ...: eval.every_steps then also runs at every checkpoint).
    best_metric: str = "val/loss"
    best_mode: str = "auto"  # auto (min for losses, max otherwise) | min | max
    # The longest a checkpoint save may block training; past it the run stops with one line (Orbax's
    # async writer can hang instead of failing on a full disk).
    timeout_s: float = 1800.0


@dataclasses.dataclass(frozen=True)
class Normalization:
    """How exact match compares two strings (``eval.normalize``). The default trims the ends only:
    'ABC ' == 'ABC', 'A BC' != 'ABC', 'abc' != 'ABC'."""

    strip: bool = True        # surrounding whitespace
    lowercase: bool = False
    whitespace: bool = False  # runs of whitespace inside the text count as one space
    punctuation: bool = False  # ASCII punctuation removed

    def __call__(self, text: str) -> str:
        if self.punctuation:
            text = text.translate(_PUNCT)
        if self.lowercase:
            text = text.lower()
        if self.whitespace:
            text = " ".join(text.split())
        return text.strip() if self.strip else text


@dataclasses.dataclass(frozen=True)
class Eval:
    """trainer.eval, and generation eval during training."""

    split: str = "test"
    max_examples: int = 0  # 0 = the whole split
    batch_size: int = 128
    max_new_tokens: int = 12
    few_shot_k: int = 3  # exemplars (same task, from train) for the base model's few-shot row
    # Longer prompts lose exemplars first, then are cut from the left (0: max_length x (k + 1)).
    max_prompt_length: int = 0
    stop: tuple[str, ...] = ()  # stop strings: a prediction ends at the first one (EOS always ends it)
    answer_pattern: str = ""  # regex with one group: compare only the extracted answers
    # Exact match compares the texts after these (the default trims the ends only).
    normalize: Normalization = dataclasses.field(default_factory=Normalization)
    baselines: str = "zero_shot,few_shot"  # base-model rows of trainer.eval (few_shot:K sets K)
    # Generation eval during training: every N steps on a fixed seeded sample of validation rows,
    # logged as val/exact_match, val/rougeL, val/chrf, ... (0: off).
    every_steps: int = 300
    in_training_examples: int = 64
    # Weights split over the batch's mesh axes (FSDP) during generation: "once" gathers them at the
    # start of each batch (a copy per device, in the compute dtype), "per_step" where each decode
    # step uses them (no copy; every new token gathers every weight again), "auto" = once where the
    # copy is at most 60% of a device's known memory; not on CPUs, whose devices share one memory
    # (trainer.evaluation.generate.gather_plan).
    gather_weights: str = "auto"

    def prompt_budget(self, max_length: int) -> int:
        """Tokens an eval prompt may have: ``max_prompt_length``, or room for ``few_shot_k``
        exemplars and the question, each as long as a training row (``data.max_length``)."""
        return self.max_prompt_length or max_length * (self.few_shot_k + 1)


class SpecError(ValueError):
    """A config that does not fit the spec: every problem, one per line."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    seed: int = 0  # model init (and thus the "base" model of the eval) and data order
    data: Data = dataclasses.field(default_factory=Data)
    tokenizer: Tokenizer = dataclasses.field(default_factory=Tokenizer)
    model: Model = dataclasses.field(default_factory=Model)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    optimizer: Optimizer = dataclasses.field(default_factory=Optimizer)
    train: Train = dataclasses.field(default_factory=Train)
    mesh: Mesh = dataclasses.field(default_factory=Mesh)
    sharding: Sharding = dataclasses.field(default_factory=Sharding)
    checkpoint: Checkpoint = dataclasses.field(default_factory=Checkpoint)
    eval: Eval = dataclasses.field(default_factory=Eval)

    SECTIONS: ClassVar[tuple[str, ...]] = ("data", "tokenizer", "model", "lora", "optimizer", "train",
                                           "mesh", "sharding", "checkpoint", "eval")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> RunSpec:
        """From a plain dict (a ConfigDict's ``to_dict()``, a workdir's ``config.json``). Keys it
        lacks take their default; a key the spec does not know, or a value of the wrong type, is a
        problem: all of them are raised at once as one ``SpecError``."""
        problems: list[str] = []
        default = cls()
        for key in sorted(set(d) - {f.name for f in dataclasses.fields(cls)}):
            problems.append(f"{where}: unknown key {key!r}")
        kwargs: dict[str, Any] = {}
        if "seed" in d:
            kwargs["seed"] = _value("seed", d["seed"], default.seed, problems)
        for name in cls.SECTIONS:
            if name in d:
                kwargs[name] = _section(name, getattr(default, name), d[name], problems)
        if problems:
            raise SpecError("\n".join(problems))
        return cls(**kwargs)

    @classmethod
    def from_config(cls, config: ConfigDict) -> RunSpec:
        return cls.from_dict(config.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """JSON's normal form (tuples as lists): what ``config.json`` holds."""
        return json.loads(self.to_json())

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(_plain(self), indent=indent)

    def to_config(self) -> ConfigDict:
        """An overridable ``ConfigDict`` (what a preset returns), tuples kept as tuples."""
        return ConfigDict(_plain(self, tuples=True))

    def replace(self, **sections: Any) -> RunSpec:
        return dataclasses.replace(self, **sections)


def default_config() -> ConfigDict:
    """Every key at its default: ``configs/demo.py``, and the start of every other preset."""
    return RunSpec().to_config()


def load_config_file(path: str, flag: str = "--config") -> ConfigDict:
    """The ``get_config()`` of a ``configs/*.py``-style file named by a flag's value (``flag``: that
    flag, for the one line an error becomes) -- what ``--config`` loads, for the tools that take a
    config path as a plain value (``trainer.eval --data``, ``topology_table --configs``)."""
    import importlib.util  # noqa: PLC0415

    module_spec = importlib.util.spec_from_file_location("_flax_ift_config_file", path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"{flag} {path}: not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        return module.get_config()
    except Exception as e:  # a user's config file: any error is theirs, said in one line
        raise UserError(f"{flag} {path}: cannot load get_config(): {type(e).__name__}: {e}") from e


def _plain(x: Any, tuples: bool = False) -> Any:
    if dataclasses.is_dataclass(x):
        return {f.name: _plain(getattr(x, f.name), tuples) for f in dataclasses.fields(x)}
    if isinstance(x, (dict, ConfigDict, FrozenConfigDict)):
        return {k: _plain(v, tuples) for k, v in (x.items())}
    if isinstance(x, (list, tuple)):
        items = [_plain(v, tuples) for v in x]
        return tuple(items) if tuples else items
    return x


def _section(name: str, default: Any, given: Any, problems: list[str]) -> Any:
    if not isinstance(given, dict):
        problems.append(f"{name}: must be a section of keys, got {given!r}")
        return default
    fields = {f.name for f in dataclasses.fields(default)}
    for key in sorted(set(given) - fields):
        problems.append(f"{name}: unknown key {key!r} (known: {', '.join(sorted(fields))})")
    values = {k: _value(f"{name}.{k}", v, getattr(default, k), problems)
              for k, v in given.items() if k in fields}
    return dataclasses.replace(default, **values)


def _value(key: str, given: Any, default: Any, problems: list[str]) -> Any:
    """``given`` in the type of ``default``: lists become tuples, maps frozen, ints floats."""
    if dataclasses.is_dataclass(default):
        return _section(key, default, given, problems)
    if isinstance(default, FrozenConfigDict):
        if isinstance(given, (dict, ConfigDict, FrozenConfigDict)):
            return FrozenConfigDict(_plain(given))
    elif isinstance(default, tuple):
        if isinstance(given, str):  # "q,k,v" for a list of names
            return tuple(s.strip() for s in given.split(",") if s.strip())
        if isinstance(given, (list, tuple)):
            return _tuples(given)
    elif isinstance(default, bool):
        if isinstance(given, bool):
            return given
    elif isinstance(default, float):
        if isinstance(given, (int, float)) and not isinstance(given, bool):
            return float(given)
    elif isinstance(default, int):
        if isinstance(given, int) and not isinstance(given, bool):
            return given
    elif isinstance(given, type(default)):
        return given
    problems.append(f"{key} must be a {type(default).__name__}, got {given!r}")
    return default


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
