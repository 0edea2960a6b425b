"""A built-in synthetic instruction dataset with exact answers.

The demo must run with no network and no files outside the repo, and it must show the point of
instruction tuning: a model that reads *which* task the instruction asks for. So every task shares
the same kind of input (a short random word, or two numbers) and is asked in several phrasings;
only the instruction tells reverse from sort from double from count.

Payload words are UPPERCASE on purpose: the instruction words are lowercase, so the tokenizer's BPE
merges (learned mostly from instruction words) never apply inside a payload, and every payload letter
stays one token -- which keeps letter-level tasks learnable by a tiny model in minutes.

Leakage guard: the split of a row is a hash of its *input* (the word or the number pair), not of the
whole row. The same input therefore never appears in two splits under any task, so no test answer
paired with its input can be memorised from train (``tests/synthetic_test.py`` checks this).
"""

from __future__ import annotations

import random
import string
from typing import Any

from data_pipeline.splits import hash_split

# Each task: (instruction phrasings, function input -> answer). Inputs are quoted so that the
# tokenizer's pre-tokenizer sees the word on its own (no leading space merged into it).
WORD_TASKS: dict[str, tuple[tuple[str, ...], Any]] = {
    "reverse": (
        ('Reverse the letters of "{w}".', 'Write "{w}" backwards.', 'Spell "{w}" in reverse order.',
         'What is "{w}" reversed?'),
        lambda w: w[::-1],
    ),
    "sort": (
        ('Sort the letters of "{w}" alphabetically.', 'Put the letters of "{w}" in alphabetical order.',
         'Arrange the letters of "{w}" from A to Z.'),
        lambda w: "".join(sorted(w)),
    ),
    "double": (
        ('Write "{w}" twice.', 'Repeat "{w}" two times.', 'Say "{w}" two times, without spaces.'),
        lambda w: w + w,
    ),
    "count": (
        ('How many letters are in "{w}"?', 'Count the characters in "{w}".', 'What is the length of "{w}"?'),
        lambda w: str(len(w)),
    ),
}
ADD_PHRASINGS = ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}.",
                 "{a} + {b} = ?")
TASKS = tuple(WORD_TASKS) + ("add",)


def make_synthetic_rows(num_rows: int, seed: int, *, min_len: int = 3, max_len: int = 5,
                        alphabet: str = string.ascii_uppercase, max_first_addend: int = 999,
                        max_second_addend: int = 9,
                        task_weights: dict[str, float] | None = None) -> list[dict[str, str]]:
    """Generates ``num_rows`` unique rows ``{prompt, completion, task, input}``, deterministic from ``seed``.

    Tasks are drawn with ``task_weights`` (default uniform). ``input`` is the task's payload (used for
    hash-stable splitting).
    Addition adds a small number to a larger one: every digit fact (and carry) is seen many times in
    train with other leading digits, so unseen sums in test are reachable by generalisation, not recall.
    """
    combos = {"add": (max_first_addend + 1) * (max_second_addend + 1),
              "word": sum(len(alphabet) ** n for n in range(min_len, max_len + 1))}
    if num_rows > 0.5 * (combos["add"] + len(WORD_TASKS) * combos["word"]):
        raise ValueError(f"{num_rows} unique rows requested, too many for these synthetic settings")
    weights = [float((task_weights or {}).get(t, 1.0)) for t in TASKS]
    if unknown := set(task_weights or {}) - set(TASKS):
        raise ValueError(f"unknown synthetic task(s) {sorted(unknown)}; tasks are {list(TASKS)}")
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < num_rows:
        task = rng.choices(TASKS, weights)[0]
        if task == "add":
            a, b = rng.randint(0, max_first_addend), rng.randint(0, max_second_addend)
            payload = f"{a}+{b}"
            prompt = rng.choice(ADD_PHRASINGS).format(a=a, b=b)
            answer = str(a + b)
        else:
            n = rng.randint(min_len, max_len)
            payload = "".join(rng.choice(alphabet) for _ in range(n))
            phrasings, fn = WORD_TASKS[task]
            prompt = rng.choice(phrasings).format(w=payload)
            answer = fn(payload)
        if (task, payload) in seen:
            continue
        seen.add((task, payload))
        rows.append({"prompt": prompt, "completion": answer, "task": task, "input": payload})
    return rows


def synthetic_splits(num_rows: int, seed: int, fractions: dict[str, float], salt: str = "synthetic",
                     **kwargs) -> dict[str, list[dict[str, str]]]:
    """The synthetic rows assigned to splits by a hash of their input (see module docstring)."""
    out: dict[str, list[dict[str, str]]] = {name: [] for name in fractions}
    for row in make_synthetic_rows(num_rows, seed, **kwargs):
        out[hash_split(row["input"], fractions, salt)].append(row)
    return out
