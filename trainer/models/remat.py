"""Rematerialisation (activation checkpointing) of a decoder layer: which values of its forward pass
the backward pass keeps, for each ``model.remat`` mode (``options.REMAT``); the rest it computes again.

- ``full``: nothing; the layer's forward runs again in the backward pass.
- ``dots``: the projections' outputs (matmuls without batch dims). With LoRA each adapted projection
  is two such matmuls plus a low-rank one, so there the projections are kept by name
  (``PROJECTION``, each one's summed output) -- the same tensors full fine-tuning keeps, not twice as
  many.
- ``dots_with_context`` (MaxText's ``minimal_with_context``): those, and what attention's backward
  needs of its forward (``attention.context_saveable``: the XLA path's output, a kernel's output and
  log-sum-exp), so the kernels go straight to their backward and the XLA path recomputes only the
  scores (its probabilities are too big to keep).
"""

from __future__ import annotations

import functools

import jax

from trainer.models import attention
from trainer.settings import options

_cp = jax.checkpoint_policies
PROJECTION = "projection"  # the name each projection's (summed, with LoRA) output carries

# what each mode keeps, in words the policies below turn into a checkpoint policy
KEEPS: dict[str, tuple[str, ...]] = {
    "full": (),
    "dots": ("projections",),
    "dots_with_context": ("projections", "context"),
}
assert set(KEEPS) | {"none"} == set(options.REMAT), "every remat mode has one entry"


def policy(remat: str, lora: bool = False):
    """The ``jax.checkpoint`` policy of ``remat`` (``None``: keep nothing)."""
    if remat not in KEEPS:
        raise ValueError(f"model.remat must be one of {', '.join(options.REMAT)}, got {remat!r}")
    parts = []
    if "projections" in KEEPS[remat]:
        parts.append(_cp.save_only_these_names(PROJECTION) if lora else _cp.dots_with_no_batch_dims_saveable)
    if "context" in KEEPS[remat]:
        parts.append(attention.context_saveable)
    return functools.reduce(_cp.save_from_both_policies, parts) if parts else None


def remat(fn, mode: str, lora: bool = False):
    """``fn`` rematerialised in the backward pass as ``mode`` asks (``none``: ``fn`` itself)."""
    if mode == "none":
        return fn
    return jax.checkpoint(fn, policy=policy(mode, lora), prevent_cse=False)
