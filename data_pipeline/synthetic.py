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
    "upper": (
        ('Write "{w}" in capital letters.', 'Convert "{w}" to uppercase.', 'What is "{w}" in upper case?'),
        lambda w: w.upper(),
    ),
    "first": (
        ('What is the first letter of "{w}"?', 'Which letter does "{w}" start with?',
         'Give the first character of "{w}".'),
        lambda w: w[0],
    ),
}
# Common English words (3-7 letters) for ``words="english"``: a pretrained model knows them, so the
# word tasks are ones it can partly do when asked -- the honest baseline for a real base model.
ENGLISH_WORDS = tuple("""
able acid aged also area army away baby back ball band bank base bath bear beat bell belt best bird
blow blue boat body bone book boot born boss both bowl bread break brown build burn busy cake call calm
camp card care cart case cash cast cell chair chalk cheap check chest chief child chin city claim class
clean clear clock cloud coach coal coast coat code cold come cook cool copy corn cost cover crew crop
cross crowd dance dark data date dawn dead deal dear debt deep desk diet dirt dish door down draw dream
dress drink drive drop drum duck dust duty each early earth east easy edge egg eight empty enemy enjoy
enter equal error event exact exit face fact fail fair fall farm fast fate fear feed feel field fight
film find fine fire firm fish five flag flat floor flow food foot force form fort four frame free fresh
front fruit fuel full fund game gate gift girl give glad glass goal gold golf good grab grain grass
great green grey grid grow guard guess guest guide hair half hall hand hang happy hard harm hat head
heart heat heavy help hero hide high hill hire hold hole home hope horse host hotel hour house huge
idea inch iron item jacket join joke judge juice jump just keep key kick kind king kiss knee knife
know lack lady lake lamp land large last late laugh lawn layer lead leaf learn leave left legal lemon
level life lift light limit line lion list live load loan local lock long look lose loud love lucky
lunch magic main major make male many map march mark market mass match meal meat meet melt menu metal
milk mind mine mint miss mix model money month moon more most mother motor mouse mouth move much music
name narrow navy near neck need nest never news next nice night nine noise north nose note novel
number nurse ocean offer often oil old open orange order other ought oven owner page pain paint pair
palm panel paper park part party pass past path peace pearl pen people pepper phone piano pick piece
pilot pink pipe pitch place plan plant plate play plot pocket poem point pool poor port post pound
power press price pride print prize proof proud pull pump pupil push queen quick quiet quite rabbit
race radio rain range rapid rate reach read ready real red rent rest rice rich ride right ring rise
risk river road rock role roof room root rope rose round route royal rule run safe sail salad salt
same sand save scale scene school score sea seat second seed sell send sense serve seven shade shape
share sharp sheep shelf shell shift shine ship shirt shoe shop shore short show shut sick side sign
silk silver simple sing sink sister six size skin sky sleep slice slow small smart smile smoke snake
snow soap sock soft soil solid song soon sort sound soup south space spare speak speed spend spice
spin spoon sport spot spring square staff stage stair stamp stand star start state stay steam steel
step stick still stock stone stop store storm story stove strap straw street strong study style sugar
suit summer sun super sure sweet swim table tail take talk tall tank tape taste team tear tell ten
tent test text thank thick thin thing third three throw ticket tide tiger tight time tiny tire title
toast today toe tone tool tooth top total touch tower town toy track trade train tree trial trick
trip truck true trust truth try tube tune turn twin type uncle union unit upper urban use valley
value van verse very view village visit voice vote wage wait walk wall warm wash waste watch water
wave wealth wear week weight west wheel white whole wide wife wild win wind window wine wing winter
wire wise wish woman wood wool word work world worry write yard year yellow young youth zero zone
""".split())
ADD_PHRASINGS = ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}.",
                 "{a} + {b} = ?")
TASKS = tuple(WORD_TASKS) + ("add",)


def make_synthetic_rows(num_rows: int, seed: int, *, min_len: int = 3, max_len: int = 5,
                        alphabet: str = string.ascii_uppercase, max_first_addend: int = 999,
                        max_second_addend: int = 9, words: str = "random",
                        task_weights: dict[str, float] | None = None) -> list[dict[str, str]]:
    """Generates ``num_rows`` unique rows ``{prompt, completion, task, input}``, deterministic from ``seed``.

    Tasks are drawn with ``task_weights`` (default uniform; 0 leaves a task out). ``input`` is the
    task's payload (used for hash-stable splitting). ``words``: ``random`` (``min_len``..``max_len``
    letters of ``alphabet``) or ``english`` (``ENGLISH_WORDS``, for a pretrained base model).
    Addition adds a small number to a larger one: every digit fact (and carry) is seen many times in
    train with other leading digits, so unseen sums in test are reachable by generalisation, not recall.
    """
    if words not in ("random", "english"):
        raise ValueError(f"synthetic words must be 'random' or 'english', got {words!r}")
    weights = [float((task_weights or {}).get(t, 1.0)) for t in TASKS]
    if unknown := set(task_weights or {}) - set(TASKS):
        raise ValueError(f"unknown synthetic task(s) {sorted(unknown)}; tasks are {list(TASKS)}")
    n_words = len(ENGLISH_WORDS) if words == "english" else sum(
        len(alphabet) ** n for n in range(min_len, max_len + 1))
    combos = (max_first_addend + 1) * (max_second_addend + 1) * (weights[TASKS.index("add")] > 0) + \
        n_words * sum(w > 0 for t, w in zip(TASKS, weights) if t != "add")
    if num_rows > 0.5 * combos:
        raise ValueError(f"{num_rows} unique rows requested, too many for these synthetic settings "
                         f"(at most {int(0.5 * combos)})")
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
            if words == "english":
                payload = rng.choice(ENGLISH_WORDS)
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
