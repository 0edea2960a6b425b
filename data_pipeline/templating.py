"""One function turns a conversation into ``(ids, loss_mask)``: ``encode_messages``.

How the mask is derived (any HF chat template works; no ``{% generation %}`` tags needed): for each
assistant turn ``i`` the conversation is rendered twice -- up to turn ``i`` ending with the generation
prompt (``P_i``), and including the reply (``F_i``). ``F_i[len(P_i):]``, cut after its end-of-turn
token, is exactly what the model must produce. Text between replies is prompt.

Special-token safety: messages are rendered with *placeholders* instead of their text, so the rendered
string tells template markup from data. Control tokens are recognised only in the markup; the data is
tokenised with ``split_special_tokens=True``, so a literal ``<|im_end|>`` or ``</s>`` inside a
completion is plain text, never a control token (unless ``data.allow_special_tokens_in_text``).
Tokenisation is split only at control tokens (where the tokenizer splits anyway) and at the prompt /
reply boundary -- so no BPE merge crosses that boundary, the supervised tokens decode to exactly the
reply (+ end-of-turn), and prompts tokenise as ``tokenizer(rendered_text)`` would. Eval tokenises its
prompts with the same function, so train and eval prompts are byte-identical.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from data_pipeline.errors import DataError
from data_pipeline.formats import Message, prompt_completion_messages  # noqa: F401 (re-exported)
from data_pipeline.tokenizer import CHATML_TEMPLATE

# Built-in templates, written as HF chat templates so every template takes one code path.
ALPACA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% elif messages[0]['input'] is defined and messages[0]['input'] %}"
    "{{ 'Below is an instruction that describes a task, paired with an input that provides further '"
    "   'context. Write a response that appropriately completes the request.' }}"
    "{% else %}{{ 'Below is an instruction that describes a task. Write a response that '"
    "            'appropriately completes the request.' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' and m['instruction'] is defined and m['instruction'] %}"
    "{{ '\n\n### Instruction:\n' + m['instruction'] }}"
    "{% if m['input'] %}{{ '\n\n### Input:\n' + m['input'] }}{% endif %}"
    "{% elif m['role'] == 'user' %}{{ '\n\n### Instruction:\n' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '\n\n### Response:\n' + m['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\n### Response:\n' }}{% endif %}")
# Prompt, newline, completion, EOS: for base models and datasets that carry their own prompt format.
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% else %}{{ m['content'] + '\n' }}{% endif %}{% endfor %}")
BUILTIN_TEMPLATES = {"chatml": CHATML_TEMPLATE, "alpaca": ALPACA_TEMPLATE, "plain": PLAIN_TEMPLATE}
_END_OF_TURN = {"chatml": "<|im_end|>"}  # others end a reply with the tokenizer's EOS
_NEEDS_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>")}
_PLACEHOLDER = re.compile("\ue000[^\ue001]*\ue001")


class TemplateError(DataError):
    """A chat template that does not render conversations as growing prefixes."""


@dataclasses.dataclass(frozen=True)
class Template:
    """A chat template bound to a tokenizer, with everything ``encode_messages`` needs.

    Build it with ``Template.create`` (it checks the tokenizer has what the template needs).
    """

    chat_template: str | None  # None: the tokenizer's own
    end_of_turn: str  # the text that ends an assistant reply (supervised)
    loss_on: str  # "all" assistant turns | "last" one
    allow_special_tokens_in_text: bool
    special_re: re.Pattern | None  # control tokens (longest first), as one capturing group
    special_ids: dict[str, int]
    bos_id: int | None  # the BOS to prepend if the tokenizer would add one (None: it would not)
    eos_token: str
    # The built-in templates only concatenate markup and message text, so text is always inserted
    # verbatim and needs no per-row check; a tokenizer's own template is checked on every row.
    verbatim: bool = False
    # Conversation shape -> its rendered skeleton (see ``plan``); filled as rows are planned.
    skeletons: dict = dataclasses.field(default_factory=dict, compare=False, repr=False, hash=False)

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end a generated reply: EOS, and the end-of-turn token if it is one."""
        eos = self.special_ids[self.eos_token]
        return sorted({eos, self.special_ids.get(self.end_of_turn, eos)})

    @staticmethod
    def create(tok: PreTrainedTokenizerBase, name: str = "tokenizer", end_of_turn: str = "",
               loss_on: str = "all", allow_special_tokens_in_text: bool = False) -> Template:
        """Args: ``name``: chatml | alpaca | plain | tokenizer (its own chat template)."""
        if name == "tokenizer":
            if not tok.chat_template:
                raise DataError("data.template='tokenizer' but the tokenizer has no chat template; "
                                f"use one of {sorted(BUILTIN_TEMPLATES)}")
            chat_template = None
        elif name in BUILTIN_TEMPLATES:
            chat_template = BUILTIN_TEMPLATES[name]
        else:
            raise DataError(f"unknown data.template {name!r}; use tokenizer or one of "
                            f"{sorted(BUILTIN_TEMPLATES)}")
        if loss_on not in ("all", "last"):
            raise DataError(f"data.loss_on must be 'all' or 'last', got {loss_on!r}")
        special = {t: i for t, i in ((t, tok.convert_tokens_to_ids(t)) for t in _special_tokens(tok))
                   if i is not None}
        if missing := [t for t in _NEEDS_TOKENS.get(name, ()) if t not in special]:
            raise DataError(f"data.template={name!r} needs the special tokens {missing}, which this "
                            "tokenizer lacks; use 'tokenizer', 'alpaca' or 'plain'")
        if tok.eos_token is None:
            raise DataError("the tokenizer has no EOS token; the model could never learn to stop")
        pattern = "|".join(re.escape(t) for t in sorted(special, key=len, reverse=True))
        return Template(
            chat_template=chat_template,
            end_of_turn=end_of_turn or _END_OF_TURN.get(name, "") or tok.eos_token,
            loss_on=loss_on, allow_special_tokens_in_text=allow_special_tokens_in_text,
            special_re=re.compile(f"({pattern})") if pattern else None, special_ids=special,
            bos_id=tok.bos_token_id if _adds_bos(tok) else None, eos_token=tok.eos_token,
            verbatim=name in BUILTIN_TEMPLATES)


def _special_tokens(tok: PreTrainedTokenizerBase) -> list[str]:
    added = [t.content for t in tok.added_tokens_decoder.values() if t.special]
    return list(dict.fromkeys([*tok.all_special_tokens, *added]))


def _adds_bos(tok: PreTrainedTokenizerBase) -> bool:
    if tok.bos_token_id is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


def _render(tok: PreTrainedTokenizerBase, t: Template, messages: Sequence[dict], gen_prompt: bool
            ) -> str:
    if not messages:
        return ""
    import jinja2  # noqa: PLC0415 (transformers renders with it)
    try:
        return tok.apply_chat_template(list(messages), chat_template=t.chat_template, tokenize=False,
                                       add_generation_prompt=gen_prompt)
    except jinja2.TemplateError as e:  # e.g. raise_exception('System role not supported'): this row
        raise TemplateError(f"the chat template refuses this conversation: {e}") from None


def _with_placeholders(messages: Sequence[Message]) -> tuple[list[dict], dict[str, str]]:
    out, values = [], {}
    for i, m in enumerate(messages):
        pm = dict(m)
        for k, v in m.items():
            # Empty strings stay themselves: a template may test a field for emptiness (alpaca's
            # optional input), and a placeholder would make every field look non-empty.
            if k != "role" and isinstance(v, str) and v:
                if "\ue000" in v or "\ue001" in v:
                    raise TemplateError("message text contains the private-use characters "
                                        "U+E000/U+E001 (reserved for the template placeholders)")
                pm[k] = key = f"\ue000{i}:{k}\ue001"
                values[key] = v
        out.append(pm)
    return out, values


Chunk = tuple[str | int, bool]  # (text to tokenise | a control token id, supervised)


def _shape(messages: Sequence[Message]) -> tuple:
    """What the placeholder rendering of a conversation depends on: roles, and which fields each
    message has and whether they are empty -- never the text itself."""
    return tuple((m["role"], tuple((k, bool(v)) for k, v in sorted(m.items()) if k != "role"))
                 for m in messages)


def _skeleton(tok: PreTrainedTokenizerBase, t: Template, messages: Sequence[Message]
              ) -> tuple[list[tuple[str | int, bool]], bool, str]:
    """The conversation's chunks with placeholders for the message texts, whether it ends with the
    generation prompt, and the rendered (placeholder) text the chunks cover. Rendering depends only
    on ``_shape``, so this runs once per shape."""
    ph, _ = _with_placeholders(messages)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    ends_with_prompt = not assistant or assistant[-1] != len(messages) - 1
    pieces: list[tuple[str, bool]] = []
    done = ""  # rendered (placeholder) text already cut into pieces
    for i in assistant:
        prompt = _render(tok, t, ph[:i], gen_prompt=True)
        full = _render(tok, t, ph[: i + 1], gen_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise TemplateError(f"the chat template does not render conversations as growing prefixes "
                                f"(turn {i}); the loss mask cannot be derived from it")
        reply = full[len(prompt):]
        key = f"\ue000{i}:content\ue001"
        at = reply.find(key)
        if at < 0:
            raise TemplateError(f"the chat template does not write assistant turn {i}'s content")
        end = reply.find(t.end_of_turn, at + len(key))
        if end >= 0:
            reply = reply[: end + len(t.end_of_turn)]
        sup = t.loss_on == "all" or i == assistant[-1]
        pieces += [(prompt[len(done):], False), (reply, sup)]
        if end < 0:  # no end-of-turn in the template: append EOS, so the model learns to stop
            pieces.append((t.eos_token, sup))
        done = prompt + reply
    if ends_with_prompt:
        prompt = _render(tok, t, ph, gen_prompt=True)
        if not prompt.startswith(done):
            raise TemplateError("the chat template does not render the prompt as a prefix extension")
        pieces.append((prompt[len(done):], False))
        done = prompt
    chunks: list[tuple[str | int, bool]] = []
    for text, sup in pieces:
        if t.allow_special_tokens_in_text:  # opt-in: control tokens recognised in data too
            chunks.append((text, sup))
            continue
        # special_re has one capturing group, so split() alternates text and control tokens. The
        # markup is split here, before the data is filled in: data can never become a control token.
        parts = t.special_re.split(text) if t.special_re else [text]
        for j, part in enumerate(parts):
            if j % 2:
                chunks.append((t.special_ids[part], sup))
            elif part:
                chunks.append((part, sup))
    return chunks, ends_with_prompt, done


def plan(tok: PreTrainedTokenizerBase, t: Template, messages: Sequence[Message]) -> list[Chunk]:
    """The conversation as chunks to tokenise separately (see module docstring).

    If the last message is not from the assistant, the plan ends with the generation prompt (an eval
    prompt). Whatever the template writes after the last end-of-turn is dropped: the model stops there.

    The placeholder rendering (2 renders per assistant turn) is done once per conversation *shape*
    and cached on ``t``; each conversation is then rendered once, with its real text, to check that
    a tokenizer's own template inserts the text verbatim (the built-in ones do by construction).
    """
    shape = _shape(messages)
    if shape not in t.skeletons:
        t.skeletons[shape] = _skeleton(tok, t, messages)
    skeleton, ends_with_prompt, done = t.skeletons[shape]
    _, values = _with_placeholders(messages)
    fill = lambda text: _PLACEHOLDER.sub(lambda m: values[m.group(0)], text)  # noqa: E731
    chunks: list[Chunk] = [(fill(c) if isinstance(c, str) else c, sup) for c, sup in skeleton]
    # The template must insert message text verbatim (no trimming or escaping), or the placeholders
    # would not stand for what the tokenizer sees: the one real render of this conversation (not
    # needed for the built-in templates, which are plain concatenations).
    if not t.verbatim and not _render(tok, t, messages, gen_prompt=ends_with_prompt).startswith(fill(done)):
        raise TemplateError("the chat template changes message text (e.g. trims it); keep the "
                            "source's strip=True so the text needs no change")
    return chunks


def _encode_texts(tok: PreTrainedTokenizerBase, texts: list[str], split_special: bool) -> list[list[int]]:
    """``tok(texts, add_special_tokens=False, split_special_tokens=split_special)["input_ids"]``,
    straight from the Rust backend: transformers' per-encoding conversion to Python dicts cost as
    much as the tokenisation itself (the same ids; the tests' literal tables check them)."""
    if not texts:
        return []
    backend = tok.backend_tokenizer
    before = backend.encode_special_tokens
    backend.encode_special_tokens = split_special
    try:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = before


def tokenize_plans(tok: PreTrainedTokenizerBase, t: Template, plans: Sequence[list[Chunk]]
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tokenises many plans with one batched call of the fast tokenizer."""
    texts = [c for p in plans for c, _ in p if isinstance(c, str)]
    encoded = iter(_encode_texts(tok, texts, split_special=not t.allow_special_tokens_in_text))
    out = []
    for p in plans:
        ids: list[int] = []
        mask: list[int] = []
        for c, sup in p:
            piece = next(encoded) if isinstance(c, str) else [c]
            ids.extend(piece)
            mask.extend([int(sup)] * len(piece))
        # The template may or may not write BOS itself; the post-processor may or may not add it.
        # Exactly one BOS either way (a doubled BOS shifts every position the base model saw).
        if t.bos_id is not None and (not ids or ids[0] != t.bos_id):
            ids.insert(0, t.bos_id)
            mask.insert(0, 0)
        out.append((np.asarray(ids, np.int32), np.asarray(mask, np.int32)))
    return out


def encode_messages(tok: PreTrainedTokenizerBase, messages: Sequence[Message], *,
                    template: Template | None = None, end_of_turn: str | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises a conversation.

    Args:
      tok: a fast tokenizer.
      messages: ``[{"role", "content"}]``; ends with the generation prompt if the last message is not
        the assistant's.
      template: how to render; default the tokenizer's own chat template.
      end_of_turn: with no ``template``: the text ending a reply (default the tokenizer's EOS).

    Returns:
      ids: ``[n] int32`` token ids, with exactly one leading BOS where the tokenizer uses BOS.
      loss_mask: ``[n] int32``; 1 on every token the model is trained to produce (assistant replies
        and their end-of-turn token), 0 on prompt/template tokens.
    """
    t = template or Template.create(tok, "tokenizer", end_of_turn or "")
    return tokenize_plans(tok, t, [plan(tok, t, messages)])[0]


def encode_prompt_completion(tok: PreTrainedTokenizerBase, prompt: str, completion: str | None,
                             **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """``encode_messages`` for a single prompt->completion row."""
    return encode_messages(tok, prompt_completion_messages(prompt, completion), **kwargs)
