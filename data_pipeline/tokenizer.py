"""Tokenizers: a small BPE trained locally for the demo, or any Hugging Face tokenizer directory.

The demo tokenizer is wrapped as a ``transformers.PreTrainedTokenizerFast`` with a chat template and
saved next to the run, so the demo goes through exactly the code path a real HF tokenizer takes
(``apply_chat_template``, ``save_pretrained``/``from_pretrained``).

It deliberately behaves like Llama 3's tokenizer in the one way that bites instruction tuners: its
post-processor prepends BOS *and* its chat template starts with ``{{ bos_token }}``, so naive
``tokenizer(apply_chat_template(...))`` doubles the BOS. ``data_pipeline.templating`` must not.
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections.abc import Iterable

import jinja2
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from data_pipeline import gguf_parse

BOS, EOS, PAD, IM_START = "<|begin_of_text|>", "<|im_end|>", "<|pad|>", "<|im_start|>"

# ChatML with a leading BOS; the end-of-turn token doubles as EOS, as in Qwen's instruct models.
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def render_chatml(messages: list[dict[str, str]]) -> str:
    """Renders a conversation with ``CHATML_TEMPLATE`` (as ``apply_chat_template(tokenize=False)``)."""
    return _chatml().render(messages=messages, bos_token=BOS, add_generation_prompt=False)


@functools.cache
def _chatml() -> jinja2.Template:
    """Compiled once: compiling per conversation was most of the demo BPE's training time."""
    return jinja2.Template(CHATML_TEMPLATE)


def train_demo_tokenizer(conversations: Iterable[list[dict[str, str]]], vocab_size: int = 512,
                         min_frequency: int = 64) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE on the rendered ``conversations`` and wraps it as an HF fast tokenizer.

    Training on the rendered chats (not just the contents) makes template words such as the role
    names single tokens too.

    Digits and capital letters are always single tokens (pre-tokenizer rules, as Llama 3 and Qwen do
    for digits): the synthetic tasks' payloads are uppercase words and numbers, and a tiny model learns
    letter- and digit-level operations (reverse, sort, add) far faster when no merge hides a letter,
    whatever the letter-pair frequencies in the data. Lowercase instruction words merge freely.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Split(Regex("[A-Z]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[PAD, BOS, IM_START, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((render_chatml(c) for c in conversations), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START], chat_template=CHATML_TEMPLATE,
        model_max_length=4096, padding_side="right")


def gguf_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """The tokenizer (and chat template) stored in a GGUF file, without torch.

    transformers' own ``from_pretrained(gguf_file=...)`` reads the file through a torch-based
    reader, so this reads the metadata with the ``gguf`` package and hands it to the torch-free
    builders transformers uses behind that call (``gguf_tokenizer_mapping``).
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (  # noqa: PLC0415
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )
    try:
        fields = gguf_parse.reader(path).fields
    except Exception as e:  # noqa: BLE001 -- a damaged file fails anywhere inside the reader
        raise ValueError(f"{path}: cannot read the GGUF file ({type(e).__name__}: {e})") from e
    groups = {group: {name: fields["tokenizer." + key].contents() for key, name in renames.items()
                      if "tokenizer." + key in fields}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tok_dict, tok_config = groups["tokenizer"], groups["tokenizer_config"]
    if "tokens" not in tok_dict:
        raise ValueError(f"{path}: the GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    try:
        backend, _ = convert_gguf_tokenizer(fields["general.architecture"].contents(), tok_dict)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot build its tokenizer: {e}") from e
    tokens = tok_dict["tokens"]
    # transformers' GPT-2-style builder adds "<|endoftext|>" (GPT2Tokenizer's default special token)
    # when the file's vocabulary lacks it: one id past the model's embeddings. The tokenizer must have
    # exactly the file's tokens, so such additions are dropped.
    spec = json.loads(backend.to_str())
    if any(t["id"] >= len(tokens) for t in spec["added_tokens"]):
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < len(tokens)]
        backend = Tokenizer.from_str(json.dumps(spec))
    special = {name: tokens[tok_dict[key]] for name, key in
               (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                ("unk_token", "unk_token_id"), ("pad_token", "pad_token_id")) if key in tok_dict}
    if tok_config.get("add_bos_token", tok_dict.get("tokenizer_type") == "llama") and "bos_token" in special:
        bos = special["bos_token"]  # llama.cpp prepends BOS when the file says so: so does this tokenizer
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(tok_dict["bos_token_id"]))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=tok_config.get("chat_template"),
                                   model_max_length=1 << 30, **special)


_GENERIC_FAST = ("TokenizersBackend", "PreTrainedTokenizerFast")  # the class a saved run's tokenizer has


def _tokenizer_class(path: str) -> str | None:
    """``tokenizer_class`` of a tokenizer directory's ``tokenizer_config.json`` (None if unreadable)."""
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            return json.load(f).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Loads a tokenizer directory (or a GGUF file's tokenizer) offline, never downloading, with a
    clear error if it is unusable."""
    if os.path.isfile(path):
        tok = gguf_tokenizer(path)
    elif not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    elif _tokenizer_class(path) in _GENERIC_FAST:
        # What AutoTokenizer returns for this class, without importing its model registry, which
        # imports PyTorch wherever it is installed (seconds at every start of a run or an eval)
        tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    else:
        from transformers import AutoTokenizer  # noqa: PLC0415 (imports torch where it is installed)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tok.is_fast:
        raise ValueError(f"tokenizer in {path!r} is not a fast (Rust) tokenizer")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build_tokenizer(tok_cfg, train_conversations: Iterable[list[dict[str, str]]],
                    model_path: str = "") -> PreTrainedTokenizerBase:
    """The tokenizer ``config.tokenizer`` asks for.

    Args:
      tok_cfg: ``kind`` = ``train_bpe`` (learn a BPE on ``train_conversations``; the demo's way) or
        ``hf`` (load the directory or GGUF file ``path``; empty: ``model_path``, the base model).
      train_conversations: the train split's conversations (only read for ``train_bpe``).
      model_path: the base model (``config.model.hf_path`` or ``config.model.gguf_path``).
    """
    if tok_cfg.kind == "train_bpe":
        # A bounded, seeded sample: the merges of a small BPE settle long before 20k conversations,
        # and training on every row of a 200k-row set took minutes.
        convs = list(train_conversations)
        limit = tok_cfg.train_sample_rows
        if 0 < limit < len(convs):
            convs = random.Random(0).sample(convs, limit)
        return train_demo_tokenizer(convs, tok_cfg.vocab_size, tok_cfg.min_frequency)
    if tok_cfg.kind == "hf":
        if not (tok_cfg.path or model_path):
            raise ValueError("tokenizer.kind='hf' needs tokenizer.path, model.hf_path or model.gguf_path")
        return load_tokenizer(tok_cfg.path or model_path)
    raise ValueError(f"tokenizer.kind must be 'train_bpe' or 'hf', got {tok_cfg.kind!r}")
