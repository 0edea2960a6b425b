r"""The chunked loss's forward + backward against the full-logits reference, in one process.

    python -m trainer.benchmarks.loss [--batch 8 --seq 2048 --embed 576 --vocab 49152 --chunk 8192]
        [--supervised 0.5] [--dtype float32] [--repeats 5]

Ours is ``chunked_token_loss`` (tiles of ``--chunk`` tokens, a custom VJP: three head matmuls per
tile); the reference is ``token_loss`` on ``[batch, seq, vocab]`` float32 logits under plain
autodiff. Both take the gradient of ``loss_sum`` with respect to the hidden states and the head, under
``jax.jit``, on the same random data; the median of ``--repeats`` timed calls after one warm-up.
Prints seconds, tokens/s, the ratio, each side's compiled temporary memory, and the largest
difference between the two gradients.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from trainer.benchmarks.timing import median_seconds
from trainer.models.transformer import softcap_logits
from trainer.training.loss import chunked_token_loss, token_loss

flags.DEFINE_integer("batch", 8, "Rows.")
flags.DEFINE_integer("seq", 2048, "Tokens per row.")
flags.DEFINE_integer("embed", 576, "Hidden size.")
flags.DEFINE_integer("vocab", 49152, "Vocabulary.")
flags.DEFINE_integer("chunk", 8192, "Tokens per tile (train.loss_chunk_tokens).")
flags.DEFINE_float("supervised", 0.5, "Share of supervised tokens (the rest carry no loss).")
flags.DEFINE_float("softcap", 0.0, "Final-logit soft-capping.")
flags.DEFINE_string("dtype", "float32", "Hidden states' and head's dtype.")
flags.DEFINE_integer("repeats", 5, "Timed calls per side.")


def run(batch: int, seq: int, embed: int, vocab: int, chunk: int, supervised: float, softcap: float,
        dtype: str, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(batch, seq, embed)), dtype)
    head = jnp.asarray(rng.normal(size=(embed, vocab)) / np.sqrt(embed), dtype)
    targets = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
    weights = jnp.asarray(rng.random((batch, seq)) < supervised, jnp.float32)

    def ours(h, w):
        return chunked_token_loss(h, w, targets, weights, chunk=chunk, softcap=softcap)["loss_sum"]

    def reference(h, w):
        logits = softcap_logits(jnp.einsum("bse,ev->bsv", h, w, preferred_element_type=jnp.float32),
                                softcap)
        return token_loss(logits, targets, weights)["loss_sum"]

    out: dict[str, Any] = {"batch": batch, "seq": seq, "embed": embed, "vocab": vocab, "chunk": chunk,
                           "dtype": dtype, "backend": jax.default_backend()}
    grads = {}
    for name, fn in (("ours", ours), ("reference", reference)):
        step = jax.jit(jax.grad(fn, argnums=(0, 1)))
        memory = step.lower(hidden, head).compile().memory_analysis()
        seconds, grads[name] = median_seconds(step, hidden, head, repeats=repeats)
        out[name] = {"seconds": seconds, "tokens_per_s": batch * seq / seconds,
                     "temporary_bytes": getattr(memory, "temp_size_in_bytes", None)}
    out["speedup"] = out["reference"]["seconds"] / out["ours"]["seconds"]
    out["max_grad_difference"] = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                                     for a, b in zip(grads["ours"], grads["reference"]))
    return out


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    r = run(f.batch, f.seq, f.embed, f.vocab, f.chunk, f.supervised, f.softcap, f.dtype, f.repeats)
    for side in ("ours", "reference"):
        s = r[side]
        print(f"{side:>9}: {s['seconds'] * 1e3:9.1f} ms  {s['tokens_per_s']:11,.0f} tokens/s  "
              f"temporaries {s['temporary_bytes'] / 1e9:.2f} GB")
    print(f"ours / reference: {r['speedup']:.2f}x; largest gradient difference "
          f"{r['max_grad_difference']:.2e}")
    print(json.dumps(r))


if __name__ == "__main__":
    app.run(main)
