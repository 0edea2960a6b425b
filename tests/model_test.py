"""Our NNX Llama against the transformers PyTorch Llama (the independent reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import reference

torch = reference("torch")
transformers = reference("transformers")

from trainer.evaluation.generate import generate_all, make_generate_fn  # noqa: E402
from trainer.io.hf import model_config_from_hf, params_from_hf  # noqa: E402
from trainer.models.transformer import Transformer  # noqa: E402
from trainer.training.step import token_loss  # noqa: E402

VOCAB = 97


def hf_llama(tie: bool, seed: int = 0):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=tie, initializer_range=0.2, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm scales, so a wrong norm mapping cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return cfg, model


def ours(hf_cfg, hf_model):
    cfg = model_config_from_hf(hf_cfg.to_dict())
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    params = jax.tree.map(jnp.asarray, params_from_hf(lambda n: sd[n], cfg, "llama"))
    return graphdef, params


def padded_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, VOCAB, (3, 12)).astype(np.int64)
    lengths = np.array([12, 7, 9])
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int64)
    tokens = tokens * mask  # right padding with pad id 0
    return tokens, mask, lengths


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers_with_padding(tie):
    hf_cfg, hf = hf_llama(tie)
    graphdef, params = ours(hf_cfg, hf)
    tokens, mask, lengths = padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    positions = np.broadcast_to(np.arange(12), tokens.shape).astype(np.int32)
    logits = nnx.merge(graphdef, params).forward_logits(jnp.asarray(tokens, jnp.int32),
                                                        jnp.asarray(positions), jnp.asarray(mask, jnp.int32))
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(logits)[i, :n], ref[i, :n], atol=1e-4, rtol=0)


def test_packed_equals_unpacked():
    hf_cfg, hf = hf_llama(False)
    graphdef, params = ours(hf_cfg, hf)
    model = nnx.merge(graphdef, params)
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, VOCAB, 5), rng.integers(3, VOCAB, 8)
    packed = np.concatenate([a, b, [0, 0, 0]])[None].astype(np.int32)
    seg = np.array([[1] * 5 + [2] * 8 + [0] * 3], np.int32)
    pos = np.array([list(range(5)) + list(range(8)) + [0] * 3], np.int32)
    out = model.forward_logits(jnp.asarray(packed), jnp.asarray(pos), jnp.asarray(seg))
    for x, sl in ((a, slice(0, 5)), (b, slice(5, 13))):
        single = model.forward_logits(jnp.asarray(x[None], jnp.int32), jnp.arange(len(x))[None],
                                      jnp.ones((1, len(x)), jnp.int32))
        np.testing.assert_allclose(np.asarray(out)[0, sl], np.asarray(single)[0], atol=1e-5, rtol=0)


def test_completion_only_loss_matches_transformers_labels():
    hf_cfg, hf = hf_llama(False)
    graphdef, params = ours(hf_cfg, hf)
    tokens, mask, lengths = padded_batch()
    loss_mask = mask.copy()
    loss_mask[:, :4] = 0  # the first 4 tokens of every row are "prompt"
    labels = np.where(loss_mask == 1, tokens, -100)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 labels=torch.tensor(labels)).loss.item()
    inputs, targets, weights = tokens[:, :-1], tokens[:, 1:], loss_mask[:, 1:].astype(np.float32)
    positions = np.broadcast_to(np.arange(11), inputs.shape).astype(np.int32)
    logits = nnx.merge(graphdef, params).forward_logits(
        jnp.asarray(inputs, jnp.int32), jnp.asarray(positions), jnp.asarray(mask[:, :-1], jnp.int32))
    sums = token_loss(logits, jnp.asarray(targets, jnp.int32), jnp.asarray(weights))
    np.testing.assert_allclose(float(sums["loss_sum"] / sums["tokens"]), ref, rtol=1e-5)


def test_greedy_generation_matches_transformers_generate():
    """Batched prompts of different lengths (left-padded), 24 new tokens, token for token."""
    hf_cfg, hf = hf_llama(False, seed=3)
    graphdef, params = ours(hf_cfg, hf)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, VOCAB, n).astype(np.int32) for n in (5, 9, 3)]
    n_new = 24
    gen = make_generate_fn(graphdef, max_new_tokens=n_new, eos_ids=[], pad_id=0)
    ours_out = generate_all(gen, params, prompts, batch_size=4, pad_id=0, eos_ids=[], multiple=4)
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    am = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], am[i, width - len(p):] = p, 1
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am), do_sample=False,
                          max_new_tokens=n_new, min_new_tokens=n_new, eos_token_id=None,
                          pad_token_id=0).numpy()[:, width:]
    for i in range(len(prompts)):
        assert ours_out[i] == ref[i].tolist()


def test_generation_stops_at_eos_and_pads():
    hf_cfg, hf = hf_llama(False, seed=3)
    graphdef, params = ours(hf_cfg, hf)
    prompt = [np.array([5, 6, 7], np.int32)]
    gen_free = make_generate_fn(graphdef, max_new_tokens=8, eos_ids=[], pad_id=0)
    free = generate_all(gen_free, params, prompt, batch_size=1, pad_id=0, eos_ids=[])[0]
    stop = free[3]  # pretend the 4th generated token is EOS
    gen = make_generate_fn(graphdef, max_new_tokens=8, eos_ids=[stop], pad_id=0)
    out = generate_all(gen, params, prompt, batch_size=1, pad_id=0, eos_ids=[stop])[0]
    assert out == free[: free.index(stop)]


def test_rope_from_a_table_equals_plain_rope_and_marks_positions_past_the_bound():
    """On a CPU, a call over its own tokens reads cos/sin from a [length, d/2] table by position:
    the same values as the plain form, and NaN (not a wrong angle) for a position past the bound."""
    from trainer.models.rope import rope  # noqa: PLC0415
    inv = 1.0 / (10000 ** (np.arange(0, 16, 2, dtype=np.float32) / 16))
    x = jax.random.normal(jax.random.key(0), (2, 6, 3, 16))
    pos = jnp.asarray([[0, 1, 2, 0, 1, 5], [3, 4, 5, 2, 1, 0]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(rope(x, pos, inv, below=6)), np.asarray(rope(x, pos, inv)))
    past = np.asarray(rope(x, pos.at[1, 2].set(6), inv, below=6))
    assert np.isnan(past[1, 2]).all() and not np.isnan(np.delete(past.reshape(12, -1), 8, 0)).any()


def _fusion_roots_with(txt: str, ops: tuple[str, ...]) -> list[int]:
    """Element counts of the results of the compiled computations that evaluate any of ``ops``."""
    import re  # noqa: PLC0415

    from trainer.benchmarks import topology  # noqa: PLC0415
    counts = []
    for lines in topology._computations(txt)[0].values():
        if any(f" {op}(" in line for line in lines for op in ops):
            root = next(line for line in lines if line.lstrip().startswith("ROOT "))
            result = re.match(r"\s*ROOT \S+ = (\([^)]*\)|\S+)", root).group(1)  # a shape or a tuple of them
            for dims in re.findall(r"\[([\d,]*)\]", result):
                counts.append(int(np.prod([int(n) for n in dims.split(",") if n] or [1])))
    return counts


def test_cpu_training_evaluates_cos_and_sin_once_per_position():
    """XLA:CPU fused a plain cos/sin into rope's consumers and evaluated them for every element of q
    and k (every head), forward and backward. Compiled now, no fusion that evaluates them writes
    more than one value per token and frequency."""
    hf_cfg, hf = hf_llama(False)
    graphdef, params = ours(hf_cfg, hf)
    b, s = 2, 16
    tokens = jnp.ones((b, s), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p).forward_logits(tokens, positions, jnp.ones((b, s), jnp.int32)))

    txt = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    counts = _fusion_roots_with(txt, ("cosine", "sine"))
    half = hf_cfg.hidden_size // hf_cfg.num_attention_heads // 2
    assert counts and max(counts) <= b * s * half, counts
