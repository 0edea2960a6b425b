"""Record -> conversation: the three row formats, field mapping and clean-ups.

Every format becomes the same thing, a list of ``{"role", "content"}`` messages (plus, for alpaca, the
``instruction``/``input`` parts, which the built-in alpaca template lays out in its own sections).
Problems raise ``RowProblem`` with a short reason; the reader adds the file and line.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]
FORMATS = ("prompt_completion", "alpaca", "messages")
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                "gpt": "assistant", "model": "assistant", "bot": "assistant"}


class RowProblem(ValueError):
    """What is wrong with one record (``reason`` groups the skip counts)."""

    def __init__(self, problem: str, reason: str | None = None):
        super().__init__(problem)
        self.reason = reason or problem


def prompt_completion_messages(prompt: str, completion: str | None = None) -> list[Message]:
    """The single-turn conversation for a prompt->completion row (completion None: prompt only)."""
    msgs = [{"role": "user", "content": prompt}]
    if completion is not None:
        msgs.append({"role": "assistant", "content": completion})
    return msgs


def _field(rec: dict[str, Any], name: str, *, required: bool = True, allow_empty: bool = False,
           what: str = "") -> str:
    if name not in rec or rec[name] is None:
        if required:
            raise RowProblem(f"missing field {name!r}{what}", f"missing field {name!r}")
        return ""
    value = rec[name]
    if not isinstance(value, str):
        raise RowProblem(f"field {name!r}{what} is {type(value).__name__}, not a string",
                         f"non-string field {name!r}")
    if required and not allow_empty and not value.strip():
        raise RowProblem(f"field {name!r}{what} is empty", f"empty field {name!r}")
    return value


def _clean(text: str, spec: Any) -> str:
    if spec.strip_suffix and text.rstrip().endswith(spec.strip_suffix):
        text = text.rstrip()[: -len(spec.strip_suffix)]
    return text.strip() if spec.strip else text


def to_messages(rec: dict[str, Any], spec: Any) -> list[Message]:
    """Maps one record to a conversation according to the source ``spec``.

    Args:
      rec: one row as read from the file.
      spec: the source's config (``format``, ``fields``, ``system``, ``strip_suffix``, ``strip``).

    Raises:
      RowProblem: a missing, non-string or empty field, or a conversation with nothing to learn.
    """
    f = spec.fields
    if spec.format == "prompt_completion":
        prompt = _clean(_field(rec, f.prompt), spec)
        completion = _clean(_field(rec, f.completion), spec)
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    elif spec.format == "alpaca":
        instruction = _clean(_field(rec, f.instruction), spec)
        inp = _clean(_field(rec, f.input, required=False), spec)
        output = _clean(_field(rec, f.output), spec)
        user = {"role": "user", "content": instruction + (f"\n\n{inp}" if inp else ""),
                "instruction": instruction, "input": inp}
        msgs = [user, {"role": "assistant", "content": output}]
    elif spec.format == "messages":
        raw = rec.get(f.messages)
        if not isinstance(raw, list) or not raw:
            raise RowProblem(f"field {f.messages!r} must be a non-empty list of messages",
                             f"bad field {f.messages!r}")
        msgs = []
        for j, m in enumerate(raw):
            if not isinstance(m, dict):
                raise RowProblem(f"message {j} is not an object", "bad message")
            role = ROLE_ALIASES.get(str(m.get(f.role, "")).lower())
            if role is None:
                raise RowProblem(f"message {j} has role {m.get(f.role)!r}; expected one of "
                                 f"{sorted(ROLE_ALIASES)}", "bad role")
            content = _clean(_field(m, f.content, allow_empty=role != "assistant",
                                    what=f" of message {j}"), spec)
            msgs.append({"role": role, "content": content})
        while msgs and msgs[-1]["role"] != "assistant":  # a trailing question has no answer to learn
            msgs.pop()
        if not any(m["role"] == "assistant" for m in msgs):
            raise RowProblem("conversation has no assistant message", "no assistant message")
    else:
        raise RowProblem(f"unknown format {spec.format!r}; supported: {', '.join(FORMATS)}")
    for m in msgs:
        if m["role"] == "assistant" and not m["content"]:
            raise RowProblem("empty completion after clean-up", "empty completion")
    if spec.system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": spec.system})
    return msgs
