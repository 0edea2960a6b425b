"""One function turns a conversation into ``(ids, loss_mask)``.

How the mask is derived (works for any HF chat template, no ``{% generation %}`` tags needed):
for each assistant turn ``i`` we render the conversation up to turn ``i`` twice -- once ending with the
generation prompt (``P_i``) and once including the assistant's reply (``F_i``). ``F_i[len(P_i):]`` is
exactly what the model must produce: the reply and its end-of-turn token. Text between replies is
prompt. Each piece is tokenised *separately*, so no BPE merge crosses the prompt/completion boundary
and the supervised tokens decode to exactly the reply (+ end-of-turn). Eval tokenises its prompts with
the same function, so train and eval see byte-identical prompt tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

Message = dict[str, str]


class TemplateError(ValueError):
    """A chat template that does not render conversations as growing prefixes."""


def prompt_completion_messages(prompt: str, completion: str | None) -> list[Message]:
    """The single-turn conversation for a prompt->completion row (completion None: prompt only)."""
    msgs = [{"role": "user", "content": prompt}]
    if completion is not None:
        msgs.append({"role": "assistant", "content": completion})
    return msgs


def _render(tok: PreTrainedTokenizerBase, messages: Sequence[Message], gen_prompt: bool) -> str:
    if not messages:
        return ""
    return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=gen_prompt)


def render_segments(tok: PreTrainedTokenizerBase, messages: Sequence[Message], *,
                    end_of_turn: str | None = None) -> list[tuple[str, bool]]:
    """Splits the rendered conversation into ``(text, supervised)`` pieces.

    Every assistant turn is supervised, including its end-of-turn token. Whatever the template puts
    after the last end-of-turn (e.g. a trailing newline) is dropped: the model stops at EOS.

    Args:
      tok: tokenizer with a chat template.
      messages: ``[{"role", "content"}]``; if the last one is not from the assistant, the result ends
        with the generation prompt (an eval prompt).
      end_of_turn: the text that ends an assistant turn; defaults to ``tok.eos_token``.
    """
    eot = end_of_turn or tok.eos_token
    segments: list[tuple[str, bool]] = []
    done = ""  # rendered text already emitted as segments
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt_text = _render(tok, messages[:i], gen_prompt=True)
        full_text = _render(tok, messages[: i + 1], gen_prompt=False)
        if not (prompt_text.startswith(done) and full_text.startswith(prompt_text)):
            raise TemplateError(
                "the chat template does not render conversations as growing prefixes "
                f"(turn {i}); the loss mask cannot be derived from it")
        reply = full_text[len(prompt_text):]
        # Search for the end-of-turn only after the reply's content, which may itself contain that text.
        content = m["content"].strip()
        at = reply.find(content) if content else 0
        end = reply.find(eot, max(at, 0) + len(content)) if eot else -1
        if end < 0:  # template emits no end-of-turn: we add EOS so the model learns to stop
            reply = reply + (tok.eos_token or "")
        else:
            reply = reply[: end + len(eot)]
        segments.append((prompt_text[len(done):], False))
        segments.append((reply, True))
        done = prompt_text + reply
    if not messages or messages[-1]["role"] != "assistant":
        prompt_text = _render(tok, messages, gen_prompt=True)
        if not prompt_text.startswith(done):
            raise TemplateError("the chat template does not render the eval prompt as a prefix extension")
        segments.append((prompt_text[len(done):], False))
    return [(t, s) for t, s in segments if t]


def _adds_bos(tok: PreTrainedTokenizerBase) -> bool:
    if tok.bos_token_id is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


def encode_messages(tok: PreTrainedTokenizerBase, messages: Sequence[Message], *,
                    end_of_turn: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises a conversation.

    Returns:
      ids: ``[n] int32`` token ids, with exactly one leading BOS where the tokenizer uses BOS.
      loss_mask: ``[n] int32``; 1 on every token the model is trained to produce (assistant replies
        and their end-of-turn token), 0 on prompt/template tokens.
    """
    segments = render_segments(tok, messages, end_of_turn=end_of_turn)
    ids: list[int] = []
    mask: list[int] = []
    for text, supervised in segments:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        mask.extend([int(supervised)] * len(piece))
    # The template may or may not write BOS itself; the tokenizer's post-processor may or may not add
    # it. Exactly one BOS either way (never two: a doubled BOS shifts every position the base model saw).
    if _adds_bos(tok) and (not ids or ids[0] != tok.bos_token_id):
        ids.insert(0, tok.bos_token_id)
        mask.insert(0, 0)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def encode_prompt_completion(tok: PreTrainedTokenizerBase, prompt: str, completion: str | None,
                             **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """``encode_messages`` for a single prompt->completion row."""
    return encode_messages(tok, prompt_completion_messages(prompt, completion), **kwargs)
