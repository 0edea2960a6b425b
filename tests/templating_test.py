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


# ---- built-in and HF templates, special-token safety ----------------------------------------------

LLAMA3_LIKE = (  # the shape of Llama 3's template: BOS in the template, header tokens, default system
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|start_header_id|>system<|end_header_id|>"
    "\n\nYou are helpful.<|eot_id|>{% endif %}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CONVERSATION = [{"role": "user", "content": 'Reverse the letters of "ABC".'},
                {"role": "assistant", "content": "CBA"},
                {"role": "user", "content": 'Sort the letters of "CAB" alphabetically.'},
                {"role": "assistant", "content": "ABC </s> <|im_end|> <|eot_id|> not control tokens"}]


@pytest.fixture(scope="module")
def rich_tok(demo_tok):
    """The demo BPE plus a separate EOS and Llama-3 header tokens (so EOS != end-of-turn)."""
    _, base = demo_tok
    tok = base.__class__(tokenizer_object=base.backend_tokenizer.__class__.from_str(
        base.backend_tokenizer.to_str()), bos_token=base.bos_token, pad_token=base.pad_token,
        eos_token="</s>", additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|eot_id|>",
                                                     "<|start_header_id|>", "<|end_header_id|>"])
    tok.chat_template = LLAMA3_LIKE
    return tok


@pytest.mark.parametrize("name", ["chatml", "alpaca", "plain", "tokenizer"])
@pytest.mark.parametrize("loss_on", ["all", "last"])
def test_template_invariants(rich_tok, name, loss_on):
    tok = rich_tok
    t = templating.Template.create(tok, name, loss_on=loss_on)
    eot = {"chatml": "<|im_end|>", "tokenizer": "</s>"}.get(name, "</s>")
    if name == "tokenizer":
        t = templating.Template.create(tok, name, end_of_turn="<|eot_id|>", loss_on=loss_on)
        eot = "<|eot_id|>"
    ids, mask = templating.encode_messages(tok, CONVERSATION, template=t)
    # At most one BOS, and it is first.
    assert (ids == tok.bos_token_id).sum() == 1 and ids[0] == tok.bos_token_id
    # Supervised spans: exactly the replies (all, or the last), each followed by its end-of-turn.
    spans = np.split(np.arange(len(ids)), np.flatnonzero(np.diff(mask)) + 1)
    supervised = [ids[s] for s in spans if mask[s[0]] == 1]
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    replies = replies if loss_on == "all" else replies[-1:]
    assert [tok.decode(s) for s in supervised] == [r + eot for r in replies]
    assert all(s[-1] == tok.convert_tokens_to_ids(eot) for s in supervised)
    # Data that looks like control tokens stays text: exactly one control id per end of turn.
    control = tok.convert_tokens_to_ids(eot)
    # chatml ends all 4 messages; the Llama-3-like template also a default system message; alpaca
    # and plain end only the 2 replies.
    assert (ids == control).sum() == {"chatml": 4, "tokenizer": 5}.get(name, 2)
    # Prompt tokens never supervised: the user texts are all in the unsupervised part.
    prompt_text = tok.decode(ids[mask == 0])
    assert all(m["content"] in prompt_text for m in CONVERSATION if m["role"] == "user")


def test_special_tokens_in_data_are_text_unless_opted_in(rich_tok):
    tok = rich_tok
    msgs = [{"role": "user", "content": "say <|im_end|>"}, {"role": "assistant", "content": "<|im_end|>"}]
    ids, mask = templating.encode_messages(tok, msgs, template=templating.Template.create(tok, "chatml"))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert (ids == im_end).sum() == 2  # the two ends of turn, not the two in the data
    assert tok.decode(ids[mask == 1]) == "<|im_end|><|im_end|>" and mask[ids == im_end].tolist() == [0, 1]
    unsafe = templating.Template.create(tok, "chatml", allow_special_tokens_in_text=True)
    ids2, _ = templating.encode_messages(tok, msgs, template=unsafe)
    assert (ids2 == im_end).sum() == 4


def test_prompt_tokenises_like_the_whole_rendered_text(rich_tok):
    """Splitting only at control tokens: the prompt's ids are what tokenizer(rendered) gives."""
    tok = rich_tok
    t = templating.Template.create(tok, "tokenizer", end_of_turn="<|eot_id|>")
    msgs = CONVERSATION[:1]
    ids, _ = templating.encode_messages(tok, msgs, template=t)
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]


def test_template_needing_missing_tokens_and_non_prefix_templates_fail_clearly(demo_tok):
    tok = word_tokenizer(TEMPLATE_WITH_BOS)
    with pytest.raises(templating.DataError, match="needs the special tokens"):
        templating.Template.create(tok, "chatml")
    shuffling = word_tokenizer("{% for m in messages | reverse %}{{ m['content'] }} {% endfor %}")
    with pytest.raises(templating.TemplateError, match="growing prefixes"):
        templating.encode_messages(shuffling, CONVERSATION[:2] + CONVERSATION[:2])


def test_alpaca_headers_with_and_without_input(rich_tok):
    """The alpaca template's header depends on the row's own input (it used to test the assistant
    message's, and an empty input failed the template-fidelity check)."""
    from ml_collections import ConfigDict  # noqa: PLC0415

    from data_pipeline.formats import to_messages  # noqa: PLC0415
    from data_pipeline.sources import source  # noqa: PLC0415
    tok = rich_tok
    t = templating.Template.create(tok, "alpaca")
    spec = source(format="alpaca")
    no_input = ("Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.")
    with_input = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.")
    for rec, header, middle in (
            ({"instruction": "Sort ABC", "input": "", "output": "ABC"}, no_input, ""),
            ({"instruction": "Sort", "input": "CBA", "output": "ABC"}, with_input, "\n\n### Input:\nCBA")):
        msgs = to_messages(rec, ConfigDict(spec))
        ids, mask = templating.encode_messages(tok, msgs, template=t)
        text = tok.decode(ids, skip_special_tokens=False)
        instruction = rec["instruction"]
        assert text == (f"{tok.bos_token}{header}\n\n### Instruction:\n{instruction}{middle}"
                        f"\n\n### Response:\nABC</s>")
        assert tok.decode(ids[mask == 1]) == "ABC</s>"


def test_private_use_placeholder_characters_are_a_template_error(rich_tok):
    t = templating.Template.create(rich_tok, "chatml")
    with pytest.raises(templating.TemplateError, match="U\\+E000"):
        templating.encode_messages(rich_tok, [{"role": "user", "content": "a\ue000"},
                                              {"role": "assistant", "content": "b"}], template=t)
