"""Eval prompt budgeting: exemplars are dropped before the question is cut, and BOS survives."""

import numpy as np

from trainer.evaluation.compare import fit_prompt


def row(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def encode(msgs):  # one token per character, BOS (id 1) first
    return np.array([1] + [ord(c) for m in msgs for c in m["content"]], np.int32)


def test_fit_prompt_drops_exemplars_then_cuts_the_question_from_the_left():
    question, shots = row("QQQQ", "A"), [row("xx", "y"), row("zz", "w")]
    ids, used, cut = fit_prompt(encode, question, shots, budget=20, bos_id=1)
    assert used == 2 and not cut and len(ids) == 11
    ids, used, cut = fit_prompt(encode, question, shots, budget=8, bos_id=1)  # 1 + 3 + 4 fits
    assert used == 1 and not cut and ids.tolist() == [1, *b"xxy", *b"QQQQ"]
    ids, used, cut = fit_prompt(encode, question, shots, budget=3, bos_id=1)
    assert used == 0 and cut and ids.tolist() == [1, *b"QQ"]


def test_answer_pattern_compares_only_the_extracted_answers():
    from trainer.evaluation.compare import exact_match  # noqa: PLC0415
    target = "She has 3 + 4 = 7 apples.\n#### 1,007"
    assert exact_match("Different reasoning...\n#### 1007", target, r"####\s*([-0-9.,]+)")
    assert not exact_match("#### 1008", target, r"####\s*([-0-9.,]+)")
    assert not exact_match("no marker 1007", target, r"####\s*([-0-9.,]+)")
    assert not exact_match("Different reasoning...\n#### 1007", target)
