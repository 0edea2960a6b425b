"""Every supported family against its transformers PyTorch model, from a checkpoint directory the
test writes (safetensors): logits with padding, packed == unpacked, greedy generation, loss, export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import reference

torch = reference("torch")
transformers = reference("transformers")

from tests.helpers import our_logits  # noqa: E402
from trainer.evaluation.generate import generate_all, make_generate_fn  # noqa: E402
from trainer.io import hf as hf_io  # noqa: E402
from trainer.models.transformer import Transformer  # noqa: E402
from trainer.training.step import token_loss  # noqa: E402

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama3": (transformers.LlamaConfig, dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "mistral": (transformers.MistralConfig, dict(sliding_window=5, head_dim=16)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=24, tie_word_embeddings=False)),
    "gemma": (transformers.GemmaConfig, dict(head_dim=16)),
    "gemma2": (transformers.Gemma2Config, dict(
        head_dim=16, sliding_window=5, query_pre_attn_scalar=12, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention"])),
    "gemma3": (transformers.Gemma3TextConfig, dict(
        head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e6),
                         "sliding_attention": dict(rope_type="default", rope_theta=1e4)})),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                           n_positions=128, bos_token_id=1, eos_token_id=2)),
}


def hf_model(family, tmp_path_factory):
    cls, extra = FAMILIES[family]
    kw = extra if family == "gpt2" else {**COMMON, **extra}
    cfg = cls(**kw, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.5, 0.5)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.15)
    path = str(tmp_path_factory.mktemp(family))
    model.save_pretrained(path)  # safetensors
    return model, path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    hf, path = hf_model(request.param, tmp_path_factory)
    raw = hf_io.read_hf_config(path)
    cfg = hf_io.model_config_from_hf(raw)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    params = jax.tree.map(jnp.asarray, hf_io.load_hf(path, cfg, raw["model_type"]))
    return request.param, hf, graphdef, params, cfg, raw


def padded_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, VOCAB, (3, 12)).astype(np.int64)
    lengths = np.array([12, 7, 9])
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int64)
    return tokens * mask, mask, lengths


def assert_same_logits(hf, graphdef, params, family):
    """Ours within 1e-4 of the PyTorch model's on every real (non-padding) token of a padded batch."""
    tokens, mask, lengths = padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = our_logits(graphdef, params, tokens, mask)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(ours[i, :n], ref[i, :n], atol=1e-4, rtol=0, err_msg=family)


def test_logits_match_with_padding(pair):
    family, hf, graphdef, params, _, _ = pair
    assert_same_logits(hf, graphdef, params, family)


def test_packed_equals_unpacked(pair):
    _, _, graphdef, params, _, _ = pair
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, VOCAB, 5), rng.integers(3, VOCAB, 8)
    packed = np.concatenate([a, b, [0, 0, 0]])[None]
    seg = np.array([[1] * 5 + [2] * 8 + [0] * 3])
    pos = np.array([list(range(5)) + list(range(8)) + [0] * 3])
    out = our_logits(graphdef, params, packed, seg, pos)
    for x, sl in ((a, slice(0, 5)), (b, slice(5, 13))):
        single = our_logits(graphdef, params, x[None], np.ones((1, len(x))))
        np.testing.assert_allclose(out[0, sl], single[0], atol=1e-5, rtol=0)


def test_completion_only_loss_matches_labels(pair):
    _, hf, graphdef, params, _, _ = pair
    tokens, mask, _ = padded_batch()
    loss_mask = mask.copy()
    loss_mask[:, :4] = 0
    labels = np.where(loss_mask == 1, tokens, -100)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 labels=torch.tensor(labels)).loss.item()
    logits = our_logits(graphdef, params, tokens[:, :-1], mask[:, :-1])
    sums = token_loss(jnp.asarray(logits), jnp.asarray(tokens[:, 1:], jnp.int32),
                      jnp.asarray(loss_mask[:, 1:], jnp.float32))
    np.testing.assert_allclose(float(sums["loss_sum"] / sums["tokens"]), ref, rtol=1e-5)


@pytest.mark.parametrize("batch_size", [3, 1])
def test_greedy_generation_matches_generate(pair, batch_size):
    """In batches of 3, and of 1: a decode step's attention at one row takes products and sums
    instead of dots (``trainer.models.attention._softmax_attend_fwd``)."""
    family, hf, graphdef, params, _, _ = pair
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, VOCAB, n).astype(np.int32) for n in (5, 9, 3)]
    new = 24
    gen = make_generate_fn(graphdef, max_new_tokens=new, eos_ids=[-1], pad_id=0)
    ours = generate_all(gen, params, prompts, batch_size=batch_size, pad_id=0, eos_ids=[-1])
    width = max(map(len, prompts))
    ids = np.zeros((3, width), np.int64)
    att = np.zeros((3, width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], att[i, width - len(p):] = p, 1
    hf.generation_config.eos_token_id = None  # run all 24 steps; EOS is just another token here
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(att), do_sample=False,
                          max_new_tokens=new, pad_token_id=0).numpy()[:, width:]
    for i in range(3):
        assert list(ours[i]) == ref[i].tolist(), family


def test_export_round_trip_reloads_in_transformers(pair, tmp_path):
    family, _, graphdef, params, cfg, raw = pair
    out = tmp_path / "export"
    out.mkdir()
    tensors = hf_io.params_to_hf(jax.device_get(params), cfg, raw["model_type"])
    files = hf_io.save_hf(tensors, str(out), max_shard_bytes=60_000)  # force several shards + index
    assert len(files) > 1 and (out / "model.safetensors.index.json").exists()
    (out / "config.json").write_text(json.dumps(raw))
    again = hf_io.load_hf(str(out), cfg, raw["model_type"])  # our import reads the shards back
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(again),
                                                                jax.tree.leaves(params)))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    assert_same_logits(reloaded, graphdef, params, family)


def test_unsupported_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(hf_io.HFError, match="supported: llama, mistral"):
        hf_io.model_config_from_hf({"model_type": "mamba"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(hf_io.HFError, match="refused"):
        hf_io.SafetensorsReader(str(tmp_path))
