"""Batched generation with a KV cache, one ``jax.jit`` per (batch, prompt length) shape.

Prompts of different lengths are *left*-padded to a common length P, so every row's next token is
written to the same cache slot (P + t) and all rows decode in lockstep; each row's positions still
start at 0 on its first real token, and padding slots are masked out of attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _pick(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float = 1.0
          ) -> jax.Array:
    """Next token from [batch, vocab] float32 logits: greedy at temperature 0, else sampled from the
    top-k and then the top-p (nucleus) tokens."""
    if temperature == 0.0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        # Keep the most likely tokens whose probability mass *before* them is < top_p (so at least
        # the argmax survives), as HF's TopPLogitsWarper does.
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, -1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(
            sorted_logits)
    return jax.random.categorical(rng, logits).astype(jnp.int32)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (generation halts there)."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(ends)] if ends else text


def make_generate_fn(graphdef: nnx.GraphDef, *, max_new_tokens: int, eos_ids: Sequence[int],
                     pad_id: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """Returns jitted ``generate(params, prompts, prompt_valid, rng) -> [batch, max_new_tokens] int32``.

    ``prompts``: [batch, P] int32, left-padded; ``prompt_valid``: [batch, P] bool. Output tokens after a
    row's first EOS are ``pad_id``; the loop stops early once every row has finished.
    """
    eos = jnp.asarray(list(eos_ids), jnp.int32)
    n = max_new_tokens

    @jax.jit
    def generate(params, prompts: jax.Array, prompt_valid: jax.Array, rng: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        cfg = model.cfg
        b, p = prompts.shape
        t_len = p + n
        dt = jnp.dtype(cfg.dtype)
        cache = [(jnp.zeros((b, t_len, cfg.num_key_value_heads, cfg.head_size), dt),) * 2
                 for _ in range(cfg.num_hidden_layers)]
        positions = jnp.maximum(jnp.cumsum(prompt_valid, axis=1) - 1, 0).astype(jnp.int32)
        key_valid = jnp.concatenate([prompt_valid, jnp.zeros((b, n), bool)], axis=1)
        slots = jnp.arange(t_len)
        q = jnp.arange(p)
        mask = (slots[None, None, :] <= q[None, :, None]) & key_valid[:, None, :]
        mask = mask | (slots[None, None, :] == q[None, :, None])  # padding rows attend to themselves
        key_pos = jnp.concatenate([positions, jnp.zeros((b, n), jnp.int32)], axis=1)
        logits, cache = model(prompts, positions, mask, cache, jnp.int32(0), key_pos, last_only=True)
        rng, sub = jax.random.split(rng)
        tok = _pick(logits[:, -1], sub, temperature, top_k, top_p)
        out = jnp.full((b, n), pad_id, jnp.int32)
        done = jnp.zeros((b,), bool)
        pos = positions[:, -1]

        def cond(carry):
            t, _, _, _, _, _, done, _, _ = carry
            return (t < n) & ~jnp.all(done)

        def body(carry):
            t, tok, pos, cache, key_valid, key_pos, done, out, rng = carry
            out = out.at[:, t].set(jnp.where(done, pad_id, tok))
            done = done | jnp.isin(tok, eos)
            key_valid = key_valid.at[:, p + t].set(True)
            pos = pos + 1
            key_pos = key_pos.at[:, p + t].set(pos)
            logits, cache = model(tok[:, None], pos[:, None], key_valid[:, None, :], cache, p + t,
                                  key_pos)
            rng, sub = jax.random.split(rng)
            tok = _pick(logits[:, 0], sub, temperature, top_k, top_p)
            return t + 1, tok, pos, cache, key_valid, key_pos, done, out, rng

        carry = (jnp.int32(0), tok, pos, cache, key_valid, key_pos, done, out, rng)
        return jax.lax.while_loop(cond, body, carry)[7]

    return generate


def left_pad(prompts: Sequence[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to ``[len(prompts), length]``; returns (tokens, valid)."""
    toks = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for i, ids in enumerate(prompts):
        if len(ids) > length:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the prompt length {length}")
        toks[i, length - len(ids):] = ids
        valid[i, length - len(ids):] = True
    return toks, valid


def generate_all(generate, params, prompts: Sequence[np.ndarray], *, batch_size: int, pad_id: int,
                 eos_ids: Sequence[int], seed: int = 0, multiple: int = 16) -> list[list[int]]:
    """Generates for every prompt; returns each completion's ids up to (excluding) its EOS.

    All batches share one shape (prompt length rounded up to ``multiple``, the last batch filled with
    empty prompts), so ``generate`` compiles once.
    """
    length = -(-max(len(x) for x in prompts) // multiple) * multiple
    rng = jax.random.key(seed)
    results: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        real = len(chunk)
        chunk += [np.asarray([pad_id], np.int32)] * (batch_size - real)
        toks, valid = left_pad(chunk, length, pad_id)
        rng, sub = jax.random.split(rng)
        out = np.asarray(jax.device_get(generate(params, toks, valid, sub)))[:real]
        for row in out:
            ids = []
            for t in row.tolist():
                if t in eos_ids:
                    break
                ids.append(t)
            results.append(ids)
    return results
