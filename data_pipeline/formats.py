"""Record -> conversation: the three row formats, field mapping and clean-ups.

Every format becomes the same thing, a list of ``{"role", "content"}`` messages (plus, for alpaca, the
``instruction``/``input`` parts, which the built-in alpaca template lays out in its own sections).
Problems raise ``RowProblem`` with a short reason; the reader adds the file and line.
"""

from __future__ import annotations

import re
from typing import Any

Message = dict[str, str]
FORMATS = ("prompt_completion", "alpaca", "messages")
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                "gpt": "assistant", "model": "assistant", "bot": "assistant"}


# Text no tokenizer can take: lone UTF-16 surrogates (JSON "\ud800" decodes to one; they cannot be
# encoded as UTF-8), and U+E000/U+E001, which the templating reserves for its placeholders.
_UNUSABLE = re.compile("[\ud800-\udfff\ue000\ue001]")


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


# ---------------------------------------------------------------------------------------------
# Field paths: "a.b", "a[0].b", and one list expansion "instances[*].input"
# ---------------------------------------------------------------------------------------------

_PATH_PART = re.compile(r"\.?([^.\[\]]+)|\[(\d+|\*)\]")
_MISSING = object()
FORMAT_FIELDS = {"prompt_completion": ("prompt", "completion"),
                 "alpaca": ("instruction", "input", "output"), "messages": ("messages",)}


def parse_path(path: str) -> list[str | int]:
    """``"instances[*].input"`` -> ``["instances", "*", "input"]`` (list indices as ints)."""
    parts: list[str | int] = []
    pos = 0
    for m in _PATH_PART.finditer(path):
        if m.start() != pos:
            break
        key, index = m.groups()
        parts.append(key if key is not None else ("*" if index == "*" else int(index)))
        pos = m.end()
    if pos != len(path) or not parts:
        raise ValueError(f"field path {path!r} is not of the form a.b, a[0].b or a[*].b")
    return parts


def get_path(obj: Any, parts: list[str | int]) -> Any:
    for p in parts:
        if isinstance(p, int):
            if not isinstance(obj, list) or not -len(obj) <= p < len(obj):
                return _MISSING
            obj = obj[p]
        elif isinstance(obj, dict) and p in obj:
            obj = obj[p]
        else:
            return _MISSING
    return obj


def mapped_paths(spec: Any) -> dict[str, list[str | int]]:
    """The nested field paths ``spec`` maps (a plain top-level name needs none): ``{path: parts}``.

    Raises ValueError for a malformed path or ``[*]`` over two different lists."""
    names = [spec.fields[k] for k in FORMAT_FIELDS.get(spec.format, ())]
    if spec.get("task_from", "") not in ("", "file"):
        names.append(spec.task_from)
    paths = {n: parse_path(n) for n in names if "." in n or "[" in n}
    stars = {tuple(p[:p.index("*")]) for p in paths.values() if "*" in p}
    if len(stars) > 1 or any(p.count("*") > 1 for p in paths.values()):
        raise ValueError(f"field paths {sorted(paths)}: one list expansion [*], over one list, per row")
    return paths


def expand(rec: dict[str, Any], paths: dict[str, list[str | int]]) -> list[tuple[str, dict[str, Any]]]:
    """One record -> ``[(where suffix, flat record)]``: each nested path's value is set under the path
    itself (so ``fields.input = "instances[*].input"`` reads ``flat["instances[*].input"]``), and a
    ``[*]`` gives one flat record per element of that list."""
    if not paths:
        return [("", rec)]
    star = next((p[:p.index("*")] for p in paths.values() if "*" in p), None)
    if star is None:
        return [("", {**rec, **{k: v for k, p in paths.items() if (v := get_path(rec, p)) is not _MISSING}})]
    items = get_path(rec, star)
    name = ".".join(map(str, star))
    if not isinstance(items, list) or not items:
        raise RowProblem(f"field {name!r} is {'missing' if items is _MISSING else 'not a non-empty list'}"
                         f" (the [*] in the field mapping expands it)", f"no list {name!r}")
    out = []
    for i in range(len(items)):
        flat = dict(rec)
        for k, p in paths.items():
            v = get_path(rec, [i if x == "*" else x for x in p])
            if v is not _MISSING:
                flat[k] = v
        out.append((f" [{name}[{i}]]", flat))
    return out


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
    for j, m in enumerate(msgs):
        for key, text in m.items():
            if key != "role" and (bad := _UNUSABLE.search(text)):
                ch = bad.group(0)
                what = ("a lone surrogate" if "\ud800" <= ch <= "\udfff"
                        else "a reserved private-use character")
                raise RowProblem(f"message {j} ({m['role']}) contains {what} U+{ord(ch):04X} at "
                                 f"character {bad.start()}", f"unusable character ({what})")
    if spec.system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": spec.system})
    return msgs
