"""The completion-only loss mask, checked against literal token tables."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from data_pipeline import templating
from data_pipeline.synthetic import synthetic_splits
from data_pipeline.tokenizer import train_demo_tokenizer

# A word-level tokenizer with a fixed vocabulary, so the expected ids can be written down by hand.
VOCAB = {"<pad>": 0, "<s>": 1, "<|end|>": 2, "<|user|>": 3, "<|assistant|>": 4, "reverse": 5,
         "abc": 6, "cba": 7, "sort": 8, "bca": 9, "[UNK]": 10}
TEMPLATE_WITH_BOS = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
                     "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def word_tokenizer(template: str, adds_bos: bool = True, bos: str | None = "<s>"):
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:  # like Llama: the post-processor prepends BOS to every encoding
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kwargs = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<pad>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>"],
                                   chat_template=template, **kwargs)


def test_single_turn_literal_table():
    tok = word_tokenizer(TEMPLATE_WITH_BOS)
    ids, mask = templating.encode_prompt_completion(tok, "reverse abc", "cba")
    #            <s> <|user|> reverse abc <|end|> <|assistant|> cba <|end|>
    assert ids.tolist() == [1, 3, 5, 6, 2, 4, 7, 2]
    assert mask.tolist() == [0, 0, 0, 0, 0, 0, 1, 1]


def test_naive_tokenisation_doubles_bos():
    """The trap the encoder avoids: template BOS + post-processor BOS."""
    tok = word_tokenizer(TEMPLATE_WITH_BOS)
    text = tok.apply_chat_template(templating.prompt_completion_messages("reverse abc", "cba"),
                                   tokenize=False)
    assert tok(text)["input_ids"][:2] == [1, 1]
    ids, _ = templating.encode_prompt_completion(tok, "reverse abc", "cba")
    assert (ids == 1).sum() == 1


def test_multi_turn_supervises_every_assistant_turn():
    tok = word_tokenizer(TEMPLATE_WITH_BOS)
    msgs = [{"role": "user", "content": "reverse abc"}, {"role": "assistant", "content": "cba"},
            {"role": "user", "content": "sort bca"}, {"role": "assistant", "content": "abc"}]
    ids, mask = templating.encode_messages(tok, msgs)
    assert ids.tolist() == [1, 3, 5, 6, 2, 4, 7, 2, 3, 8, 9, 2, 4, 6, 2]
    assert mask.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1]


def test_template_without_bos_gets_exactly_one():
    """Llama-2 style: the template has no BOS, the tokenizer adds one."""
    tok = word_tokenizer(TEMPLATE_WITH_BOS.replace("{{ bos_token }}", ""))
    ids, mask = templating.encode_prompt_completion(tok, "reverse abc", "cba")
    assert ids.tolist() == [1, 3, 5, 6, 2, 4, 7, 2]
    assert mask.tolist() == [0, 0, 0, 0, 0, 0, 1, 1]


def test_tokenizer_without_bos_gets_none():
    """Qwen style: no BOS at all."""
    tok = word_tokenizer(TEMPLATE_WITH_BOS.replace("{{ bos_token }}", ""), adds_bos=False, bos=None)
    ids, mask = templating.encode_prompt_completion(tok, "reverse abc", "cba")
    assert ids.tolist() == [3, 5, 6, 2, 4, 7, 2]
    assert mask.tolist() == [0, 0, 0, 0, 0, 1, 1]


def test_eval_prompt_is_the_training_prompt():
    tok = word_tokenizer(TEMPLATE_WITH_BOS)
    ids, mask = templating.encode_prompt_completion(tok, "reverse abc", "cba")
    prompt, pmask = templating.encode_prompt_completion(tok, "reverse abc", None)
    assert prompt.tolist() == ids[mask == 0].tolist()[: len(prompt)] == [1, 3, 5, 6, 2, 4]
    assert pmask.sum() == 0


def test_template_without_end_of_turn_gets_eos():
    tok = word_tokenizer("{% for m in messages %}{{ m['content'] }} {% endfor %}", adds_bos=False)
    ids, mask = templating.encode_prompt_completion(tok, "reverse abc", "cba")
    assert ids.tolist() == [5, 6, 7, 2]
    assert mask.tolist() == [0, 0, 1, 1]


@pytest.fixture(scope="module")
def demo_tok():
    rows = synthetic_splits(400, 0, {"train": 1.0})["train"]
    return rows, train_demo_tokenizer(
        [templating.prompt_completion_messages(r["prompt"], r["completion"]) for r in rows],
        min_frequency=8)


def test_demo_tokenizer_invariants(demo_tok):
    rows, tok = demo_tok
    for r in rows[:100]:
        ids, mask = templating.encode_prompt_completion(tok, r["prompt"], r["completion"])
        assert ids[0] == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1
        assert mask[-1] == 1 and ids[-1] == tok.eos_token_id  # EOS after the completion supervised
        assert tok.decode(ids[mask == 1]) == r["completion"] + tok.eos_token  # exactly the completion
        prompt = tok.decode(ids[mask == 0])
        assert r["prompt"] in prompt and prompt.endswith("<|im_start|>assistant\n")
        assert np.all(np.diff(mask) >= 0)  # one prompt span, then one supervised span


def test_demo_tokenizer_keeps_role_names_whole(demo_tok):
    _, tok = demo_tok
    assert len(tok("user", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok("assistant", add_special_tokens=False)["input_ids"]) == 1
