"""Tokenizers: a small BPE trained locally for the demo, or any Hugging Face tokenizer directory.

The demo tokenizer is wrapped as a ``transformers.PreTrainedTokenizerFast`` with a chat template and
saved next to the run, so the demo goes through exactly the code path a real HF tokenizer takes
(``apply_chat_template``, ``save_pretrained``/``from_pretrained``).

It deliberately behaves like Llama 3's tokenizer in the one way that bites instruction tuners: its
post-processor prepends BOS *and* its chat template starts with ``{{ bos_token }}``, so naive
``tokenizer(apply_chat_template(...))`` doubles the BOS. ``data_pipeline.templating`` must not.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import jinja2
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

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
    return jinja2.Template(CHATML_TEMPLATE).render(messages=messages, bos_token=BOS,
                                                   add_generation_prompt=False)


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


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Loads a tokenizer directory offline (never downloads), with a clear error if it is unusable."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
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
        ``hf`` (load the directory ``path``; empty: ``model_path``, the base model's directory).
      train_conversations: the train split's conversations (only read for ``train_bpe``).
      model_path: ``config.model.hf_path``.
    """
    if tok_cfg.kind == "train_bpe":
        return train_demo_tokenizer(train_conversations, tok_cfg.vocab_size, tok_cfg.min_frequency)
    if tok_cfg.kind == "hf":
        if not (tok_cfg.path or model_path):
            raise ValueError("tokenizer.kind='hf' needs tokenizer.path or model.hf_path")
        return load_tokenizer(tok_cfg.path or model_path)
    raise ValueError(f"tokenizer.kind must be 'train_bpe' or 'hf', got {tok_cfg.kind!r}")
