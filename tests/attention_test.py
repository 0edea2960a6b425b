"""Attention backends: what ``auto`` picks, and the splash kernel (Pallas, interpret mode on CPU)
against the XLA path -- with packed segments, padding, GQA, sliding windows and soft-capping, on one
device and under shard_map on a data x fsdp x tensor mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer import sharding as sharding_lib
from trainer.models import attention as attention_lib
from trainer.models import attention_kernels as kernels
from trainer.models.attention import resolve_attention
from trainer.models.config import ModelConfig
from trainer.models.transformer import Transformer
from trainer.training.step import make_forward

BASE = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   attention_batch_axes=("data", "fsdp"), attention_head_axes=("tensor",))
GEMMA2_LIKE = dataclasses.replace(BASE, sliding_window=5, attn_logit_softcap=5.0,
                                  query_pre_attn_scalar=12.0, norm_offset=1.0, post_norms=True,
                                  layer_types=("sliding_attention", "full_attention"))


def test_auto_picks_per_platform_and_bad_choices_are_explained():
    bf16 = dataclasses.replace(BASE, dtype="bfloat16")
    assert resolve_attention(BASE, "cpu") == "xla" and resolve_attention(BASE, "tpu") == "splash"
    assert resolve_attention(bf16, "gpu") == "cudnn" and resolve_attention(BASE, "gpu") == "xla"
    assert resolve_attention(dataclasses.replace(bf16, attn_logit_softcap=5.0), "gpu") == "xla"
    with pytest.raises(ValueError, match="bfloat16/float16"):
        resolve_attention(dataclasses.replace(BASE, attention_impl="cudnn"), "gpu")


def batch(b=4, s=128, seed=0):
    """Rows of 2-3 packed segments of different lengths, then padding."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, s), np.int32)
    pos = np.zeros((b, s), np.int32)
    for i in range(b):
        at = 0
        for k, n in enumerate(rng.integers(10, 50, 3), 1):
            n = min(int(n), s - at - 3)
            seg[i, at:at + n], pos[i, at:at + n] = k, np.arange(n)
            at += n
    tokens = rng.integers(3, 97, (b, s)).astype(np.int32) * (seg > 0)
    weights = (seg > 0).astype(np.float32)
    return {"inputs": tokens, "targets": np.roll(tokens, -1, 1), "weights": weights, "positions": pos,
            "segment_ids": seg}


def _naive_attention(q, k, v, seg, pos, window, scale, softcap):
    """The textbook formula, differentiated by JAX: k/v repeated to every query head, one [s, s] mask."""
    k, v = (jnp.repeat(x, q.shape[2] // x.shape[2], axis=2) for x in (k, v))
    logits = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32) * scale
    if softcap:
        logits = softcap * jnp.tanh(logits / softcap)
    s = q.shape[1]
    mask = (jnp.tril(jnp.ones((s, s), bool))[None] & (seg[:, :, None] == seg[:, None, :])
            & (seg[:, None, :] != 0))
    if window:
        mask = mask & (pos[:, :, None] - pos[:, None, :] < window)
    probs = jax.nn.softmax(jnp.where(mask[:, None], logits, -1e30), axis=-1)
    return jnp.einsum("bhst,bthd->bshd", probs, v.astype(jnp.float32))


@pytest.mark.parametrize("block", [0, 32], ids=["dense", "blockwise"])
@pytest.mark.parametrize("softcap,window", [(0.0, None), (5.0, 24)], ids=["plain", "softcap_window"])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_xla_path_gradients_match_the_naive_formula(block, softcap, window, head_dim):
    """The XLA path's hand-written backward (row sums from the output, one pass for mask and softmax)
    against JAX's autodiff of the textbook formula: packed segments, padding, GQA, float32. Key
    blocks of 32-128 slots take the keys' and values' gradients in both operand orders (head_dim 16:
    swapped from 64 slots on; 64: never)."""
    b = batch(b=2, s=128)
    seg, pos = jnp.asarray(b["segment_ids"]), jnp.asarray(b["positions"])
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 128, h, head_dim)), jnp.float32) for h in (4, 2, 2))
    w = jnp.asarray(rng.normal(size=(2, 128, 4, head_dim)), jnp.float32) * (seg > 0)[:, :, None, None]

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))

    ours = loss(lambda q, k, v: attention_lib._xla_attention(q, k, v, seg, seg, pos, pos, 0, window, 0.3,
                                                             softcap, block))(q, k, v)
    ref = loss(lambda q, k, v: _naive_attention(q, k, v, seg, pos, window, 0.3, softcap))(q, k, v)
    for a, r in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [2, 1])
@pytest.mark.parametrize("softcap,window", [(0.0, None), (5.0, 24)], ids=["plain", "softcap_window"])
def test_xla_path_reads_the_kv_caches_layout(softcap, window, rows):
    """k and v as the KV cache holds them (``cached``: k [b, kv_heads, head_dim, slots], v [b,
    kv_heads, slots, head_dim]) give the same output, and the same gradients in that layout, as the
    [b, slots, kv_heads, head_dim] form: packed segments, padding, GQA, a query offset. One row
    takes products and sums instead of the dots (``products``, ``_softmax_attend_fwd``)."""
    b = batch(b=2, s=64)
    seg, pos = jnp.asarray(b["segment_ids"])[:rows], jnp.asarray(b["positions"])[:rows]
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(rows, 3, 4, 16)), jnp.float32)  # the last 3 slots query
    k, v = (jnp.asarray(rng.normal(size=(rows, 64, 2, 16)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def run(q, k, v, cached):
        out = attention_lib._xla_attention(q, k, v, seg[:, -3:], seg, pos[:, -3:], pos, 61, window, 0.3,
                                           softcap, 0, cached, products=cached and rows == 1)
        return jnp.sum(out * w)

    grad = jax.jit(jax.value_and_grad(run, argnums=(0, 1, 2)), static_argnums=3)
    plain = grad(q, k, v, False)
    loss, (dq, dk, dv) = grad(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), True)
    got = (loss, (dq, dk.transpose(0, 3, 1, 2), dv.transpose(0, 2, 1, 3)))
    for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [BASE, GEMMA2_LIKE], ids=["llama_gqa", "gemma2_window_softcap"])
def test_splash_matches_xla_on_one_device(cfg):
    b = batch()
    outs = {}
    for impl in ("xla", "splash"):
        c = dataclasses.replace(cfg, attention_impl=impl)
        model = Transformer(c, rngs=nnx.Rngs(0))
        logits = model.forward_logits(jnp.asarray(b["inputs"]), jnp.asarray(b["positions"]),
                                      jnp.asarray(b["segment_ids"]))
        outs[impl] = np.asarray(logits)
    real = b["segment_ids"] > 0
    np.testing.assert_allclose(outs["splash"][real], outs["xla"][real], atol=2e-5, rtol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["two_backward_kernels", "fused_backward"])
def test_splash_backward_with_several_blocks_matches_xla(fused):
    """Splash with 128-token blocks over 256-token rows (``model.splash_block_size``; segments cross a
    block boundary), sliding window, soft-capping and GQA, Pallas interpret mode: loss and every
    gradient equal the XLA path's, with dQ from its own kernel or from the fused one (which sums one
    partial dQ per key block)."""
    b = batch(b=2, s=256)
    out = {}
    for impl in ("xla", "splash"):
        c = dataclasses.replace(GEMMA2_LIKE, attention_impl=impl, splash_block_size=128,
                                splash_fused_backward=fused)
        graphdef, params = nnx.split(Transformer(c, rngs=nnx.Rngs(0)), nnx.Param)
        fwd = make_forward(graphdef)
        grad = jax.jit(jax.value_and_grad(lambda p, x: fwd(p, x)["loss_sum"]))
        out[impl] = grad(params.to_pure_dict(), {k: jnp.asarray(v) for k, v in b.items()})
    np.testing.assert_allclose(float(out["splash"][0]), float(out["xla"][0]), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(out["splash"][1]), jax.tree.leaves(out["xla"][1]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=3e-4, rtol=1e-3)


def test_splash_under_shard_map_on_a_3d_mesh_matches_xla():
    mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    b = batch()
    sums = {}
    for impl in ("xla", "splash"):
        c = dataclasses.replace(GEMMA2_LIKE, attention_impl=impl)
        graphdef, params = nnx.split(Transformer(c, rngs=nnx.Rngs(0)), nnx.Param)
        params = params.to_pure_dict()
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        fwd = sharding_lib.with_mesh(mesh, jax.jit(make_forward(graphdef)))
        sums[impl] = fwd(params, {k: jax.device_put(v, rows) for k, v in b.items()})
    np.testing.assert_allclose(float(sums["splash"]["loss_sum"]), float(sums["xla"]["loss_sum"]),
                               rtol=1e-5)


def test_auto_on_gpu_takes_segment_ids_for_packed_rows():
    bf16 = dataclasses.replace(BASE, dtype="bfloat16")
    assert resolve_attention(dataclasses.replace(bf16, packed_inputs=True), "gpu") == "flash"
    with pytest.raises(ValueError, match="packed segments"):
        resolve_attention(dataclasses.replace(bf16, packed_inputs=True, attention_impl="cudnn"), "gpu")
    with pytest.raises(ValueError, match="soft-capping or sliding"):
        resolve_attention(dataclasses.replace(GEMMA2_LIKE, attention_impl="flash"), "gpu")


def _loss_and_grads(cfg, b):
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    fwd = make_forward(graphdef)
    batch = {k: jnp.asarray(v) for k, v in b.items()}
    return jax.value_and_grad(lambda p: fwd(p, batch)["loss_sum"])(params.to_pure_dict())


@pytest.mark.parametrize("remat", ["none", "dots_with_context"])
def test_flash_kernel_matches_xla_in_interpret_mode(remat):
    """The Pallas GPU kernel (segment ids, causal), run by Pallas' interpreter on the CPU: packed rows
    give the loss and gradients of the XLA path -- also through our custom VJP that names the kernel's
    residuals for remat="dots_with_context"."""
    b = batch(b=2, s=64)
    cfg = dataclasses.replace(BASE, packed_inputs=True)
    ref_loss, ref_g = _loss_and_grads(dataclasses.replace(cfg, attention_impl="xla"), b)
    loss, g = _loss_and_grads(dataclasses.replace(cfg, attention_impl="flash", remat=remat), b)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-3, rtol=1e-3)


def _calls(jaxpr, primitive: str, name: str | None = None) -> int:
    """How many ``primitive`` equations (named ``name``, for a Pallas kernel) run in ``jaxpr``, counting
    the jaxprs nested in its equations (a scan's body once)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == primitive and (name is None or str(eqn.params.get("name")) == name)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                sub = getattr(sub, "jaxpr", sub)
                n += _calls(sub, primitive, name) if hasattr(sub, "eqns") else 0
    return n


@pytest.mark.parametrize("impl,packed", [("flash", True), ("cudnn", False), ("cudnn", True)])
def test_dots_with_context_runs_the_gpu_kernels_forward_once(impl, packed, monkeypatch):
    """remat="dots_with_context" keeps what the GPU kernels' backward needs of their forward, so the
    forward kernel runs once a layer, not again in the backward pass as under "dots" -- counted in the
    traced train step (2 layers, unrolled). The Pallas kernel's residuals are named by our custom VJP
    (without it: 4 calls); cuDNN's are kept by their primitive, traced here with JAX's cuDNN version
    checks stubbed (it is never compiled on a CPU)."""
    if impl == "cudnn":
        from jax._src.cudnn import fused_attention_stablehlo as cudnn  # noqa: PLC0415
        monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
        monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    primitive, name = (("pallas_call", "mha_forward") if impl == "flash"
                       else (kernels.CUDNN_FORWARD, None))
    b = {k: jnp.asarray(v) for k, v in batch(b=2, s=64).items()}
    calls = {}
    for remat in ("none", "dots", "dots_with_context"):
        cfg = dataclasses.replace(BASE, attention_impl=impl, remat=remat, scan_layers=False, head_dim=64,
                                  packed_inputs=packed, max_segments=4, dtype="bfloat16")
        graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        fwd = make_forward(graphdef)
        step = jax.make_jaxpr(jax.grad(lambda p: fwd(p, b)["loss_sum"]))(params.to_pure_dict())  # noqa: B023
        calls[remat] = _calls(step.jaxpr, primitive, name)
    assert calls == {"none": 2, "dots": 4, "dots_with_context": 2}, calls


def test_segment_layout_is_cudnns_packed_layout():
    """Lengths and offsets of each row's segments, -1 past the last (JAX's documented example: rows
    of 3 and 2 segments of one token give offsets [[0, 1, 2, -1], [0, 1, -1, -1]])."""
    seg = jnp.asarray([[1, 2, 3, 0], [1, 2, 0, 0], [1, 1, 2, 2], [0, 0, 0, 0]], jnp.int32)
    lengths, offsets = kernels.segment_layout(seg, 3)
    np.testing.assert_array_equal(lengths, [[1, 1, 1], [1, 1, -1], [2, 2, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 1, 2, -1], [0, 1, -1, -1], [0, 2, -1, -1], [-1, -1, -1, -1]])


def test_auto_takes_cudnn_for_packed_rows_only_with_a_segment_bound_on_hopper(monkeypatch):
    packed = dataclasses.replace(BASE, dtype="bfloat16", packed_inputs=True)
    monkeypatch.setattr(kernels, "hopper_or_later", lambda: True)
    assert resolve_attention(packed, "gpu") == "flash"  # no bound: cuDNN cannot take the rows
    assert resolve_attention(dataclasses.replace(packed, max_segments=64), "gpu") == "cudnn"
    assert resolve_attention(dataclasses.replace(packed, max_segments=64, attention_impl="cudnn"), "gpu") == "cudnn"
    monkeypatch.setattr(kernels, "hopper_or_later", lambda: False)
    assert resolve_attention(dataclasses.replace(packed, max_segments=64), "gpu") == "flash"


@pytest.mark.parametrize("impl,packed", [("flash", True), ("cudnn", False), ("cudnn", True)])
def test_gpu_kernels_match_xla(impl, packed):
    """On a GPU (skipped elsewhere; run by hand on the device): loss and gradients of the fused
    kernels equal the XLA path's in bf16 -- packed rows for the segment-id kernel and cuDNN's packed
    layout, padded rows for cuDNN's causal one."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    b = batch() if packed else {**batch(), "segment_ids": (batch()["segment_ids"] > 0).astype(np.int32)}
    if not packed:  # one segment per row, right-padded: cuDNN's causal mask is then exact
        seg = np.zeros_like(b["segment_ids"])
        for i, n in enumerate((128, 100, 77, 50)):
            seg[i, :n] = 1
        b["segment_ids"], b["positions"] = seg, np.where(seg > 0, np.arange(128)[None], 0)
        b["weights"] = (seg > 0).astype(np.float32)
    cfg = dataclasses.replace(BASE, dtype="bfloat16", packed_inputs=packed, head_dim=64, max_segments=4)
    ref_loss, ref_g = _loss_and_grads(dataclasses.replace(cfg, attention_impl="xla"), b)
    loss, g = _loss_and_grads(dataclasses.replace(cfg, attention_impl=impl), b)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=2e-2)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        scale = float(jnp.max(jnp.abs(y.astype(jnp.float32)))) + 1e-6
        assert float(jnp.max(jnp.abs((x - y).astype(jnp.float32)))) <= 0.05 * scale


@pytest.mark.parametrize("cfg", [BASE, GEMMA2_LIKE], ids=["llama_gqa", "gemma2_window_softcap"])
def test_blockwise_xla_equals_dense(cfg):
    """Query blocks that skip the keys above the diagonal (and, on sliding layers, the keys out of
    the window) give the dense path's logits on packed, padded rows."""
    b = batch(s=128)
    outs = []
    for block in (0, 16):  # 0: one dense block; 16 at 128 tokens: 4 blocks (at least 2 x head_dim)
        model = Transformer(dataclasses.replace(cfg, attention_impl="xla", attention_block_size=block),
                            rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        # jitted: run op by op, each block's small ops compile on their own (33 s here)
        logits = jax.jit(lambda p, *x: nnx.merge(graphdef, p).forward_logits(*x))(  # noqa: B023
            params, *(jnp.asarray(b[k]) for k in ("inputs", "positions", "segment_ids")))
        outs.append(np.asarray(logits))
    real = b["segment_ids"] > 0
    np.testing.assert_allclose(outs[1][real], outs[0][real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["splash", "flash"])
@pytest.mark.parametrize("tensor", [1, 2, 4])
def test_gqa_kernels_loss_and_gradients_match_xla(kernel, tensor):
    """Grouped-query attention (4 query heads, 2 k/v heads) through splash and the Pallas GPU kernel,
    Pallas interpret mode: k/v go in unrepeated (the kernel groups the heads) while the head axis
    splits the k/v heads evenly (tensor 1: a device's 4 query heads read 2 k/v heads; tensor 2: 2
    read 1), repeated when it does not (tensor 4 > 2 k/v heads); loss and every gradient equal the
    XLA path's."""
    mesh = sharding_lib.make_mesh({"data": 8 // tensor, "fsdp": 1, "tensor": tensor}, jax.devices()[:8])
    b = batch(b=8, s=128)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    out = {}
    for impl in ("xla", kernel):
        cfg = dataclasses.replace(BASE, attention_impl=impl, packed_inputs=True)
        graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        fwd = make_forward(graphdef)
        grad = sharding_lib.with_mesh(mesh, jax.jit(jax.value_and_grad(lambda p, x: fwd(p, x)["loss_sum"])))
        out[impl] = grad(params.to_pure_dict(), {k: jax.device_put(v, rows) for k, v in b.items()})
    np.testing.assert_allclose(float(out[kernel][0]), float(out["xla"][0]), rtol=1e-5)
    # The kernel sums in its own order: float32 gradients differ by < 1e-4 (with repeated heads as
    # much as without); a wrong head grouping differs by ~0.1.
    for x, y in zip(jax.tree.leaves(out[kernel][1]), jax.tree.leaves(out["xla"][1])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=3e-4, rtol=1e-3)


def test_flash_kernel_reads_the_kv_heads_unrepeated():
    """The Pallas GPU kernel's forward and backward calls take k and v with their 2 heads, not
    repeated to the 4 query heads (the [b, s, heads, d] copies ``jnp.repeat`` made every layer)."""
    cfg = dataclasses.replace(BASE, attention_impl="flash", packed_inputs=True, scan_layers=False)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    fwd = make_forward(graphdef)
    b = {k: jnp.asarray(v) for k, v in batch(b=2, s=64).items()}
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: fwd(p, b)["loss_sum"]))(params.to_pure_dict()).jaxpr
    kv_heads = {}  # kernel name -> the head counts of its k and v operands

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                name = str(eqn.params["name"])
                if name in ("mha_forward", "mha_backward"):
                    kv_heads.setdefault(name, set()).update(x.aval.shape[2] for x in eqn.invars[1:3])
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        visit(sub)

    visit(jaxpr)
    assert kv_heads == {"mha_forward": {2}, "mha_backward": {2}}, kv_heads
