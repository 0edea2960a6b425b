"""Sampling filters, stop strings, prompt buckets and the decode loop's compiled form (greedy decoding
is checked against transformers in model_test.py)."""

import re
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from tests import helpers
from trainer import sharding as sharding_lib
from trainer.benchmarks import topology
from trainer.evaluation.generate import (
    GATHER_BUDGET,
    MIN_STREAM_ROWS,
    PREFILL_TOKENS,
    CompiledGenerate,
    _decode,
    _pick,
    bucket_length,
    cut_at_stop,
    gather_plan,
    gather_weights,
    generate_all,
    left_pad,
    make_generate_fn,
    prefill_chunks,
    row_streams,
)
from trainer.models import quant
from trainer.models.config import ModelConfig
from trainer.models.kv_cache import KVCache
from trainer.models.transformer import Transformer

LOGITS = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))


def sample(n, top_k, top_p):
    """``n`` tokens sampled from ``LOGITS``, one key each (one jitted program: run op by op, the 850
    samples of the test below took 33 s)."""
    keys = jax.random.split(jax.random.key(0), n)
    return np.asarray(jax.jit(jax.vmap(lambda k: _pick(LOGITS, k, 1.0, top_k, top_p)[0]))(keys))


def test_top_p_keeps_the_nucleus_and_at_least_the_argmax():
    assert set(sample(200, top_k=0, top_p=0.7)) == {0, 1}  # 0.5 + 0.3 covers 0.7
    assert set(sample(50, top_k=0, top_p=1e-6)) == {0}
    assert set(sample(400, top_k=0, top_p=1.0)) == {0, 1, 2, 3}
    assert set(sample(200, top_k=2, top_p=1.0)) == {0, 1}


def test_greedy_and_stop_strings():
    assert int(_pick(LOGITS, jax.random.key(1), 0.0, 0)[0]) == 0
    assert cut_at_stop("42\n\nQuestion: next", ("\n\n", "Question:")) == "42"
    assert cut_at_stop("no stop here", ("\n\n",)) == "no stop here"
    assert cut_at_stop("x", ()) == "x"


def test_greedy_takes_the_first_of_equal_maxima_like_argmax():
    logits = jnp.asarray([[0.0, 2.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0], [-1.0, -2.0, -3.0, -0.5]])
    assert _pick(logits, jax.random.key(0), 0.0, 0).tolist() == [1, 0, 3]
    many = jax.random.normal(jax.random.key(1), (16, 1000))
    assert (_pick(many, jax.random.key(0), 0.0, 0) == jnp.argmax(many, -1)).all()


def test_bucket_lengths_pad_by_under_a_third():
    """16 x 1, 2, 3, 4, 6, 8, 12, ...: a batch whose longest prompt has 33 tokens is padded to 48,
    not 64 (plain powers of two nearly doubled a short batch's prefill)."""
    got = {n: bucket_length(n) for n in (1, 16, 17, 32, 33, 48, 49, 64, 65, 96, 97, 128, 129, 193, 300)}
    assert got == {1: 16, 16: 16, 17: 32, 32: 32, 33: 48, 48: 48, 49: 64, 64: 64, 65: 96, 96: 96,
                   97: 128, 128: 128, 129: 192, 193: 256, 300: 384}
    assert bucket_length(9, multiple=4) == 12


@pytest.mark.parametrize("rows", [3, 1])
def test_decode_steps_copy_no_layer_of_the_cache(rows):
    """The decode loop of an unrolled model writes each layer's keys/values in place and reads them
    where they lie: no op in the loop makes a copy of a layer's [batch, kv_heads, slots, head_dim]
    values or [batch, kv_heads, head_dim, slots] keys, in any order (a stacked cache read layer by
    layer, or one stored slots-first, cost a copy of every layer per step, a third of a small model's
    decode step on CPU). At one row, attention's dots made XLA:CPU copy every layer 4 times a step
    (``_softmax_attend_fwd``)."""
    _, hlo = _decode_hlo(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8), rows)
    layer = re.compile(rf"%(?P<name>\S+) = f32\[{rows},(2,21,8|21,2,8|2,8,21|8,2,21|21,8,2|8,21,2)\]\S* "
                       r"(?P<op>[\w-]+)\(")
    copies = []
    for line in _while_bodies(hlo):  # (a copy XLA inserts carries no op name to find it by)
        m = layer.search(line)
        if m and (m["op"] in ("copy", "transpose", "slice", "dynamic-slice")
                  or re.search("copy|transpose|slice_bitcast", m["name"])):
            copies.append(line.strip()[:160])
    assert copies == []


def _decode_hlo(cfg: ModelConfig, rows: int = 3) -> tuple[nnx.State, str]:
    """A model of ``cfg`` (its parameters), and the compiled text of generating 5 tokens for
    ``rows`` left-padded 7-token prompts."""
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    toks, valid = left_pad([np.arange(3, 10, dtype=np.int32)] * rows, 16, 0)
    gen = make_generate_fn(graphdef, max_new_tokens=5, eos_ids=[], pad_id=0)
    return params, gen.lower(params, toks, valid, jax.random.key(0)).compile().as_text()


def _while_bodies(hlo: str) -> list[str]:
    """The instruction lines of every while loop's body computation in compiled HLO text."""
    comps, _ = topology._computations(hlo)
    bodies = [m for line in hlo.splitlines() for m in re.findall(r" while\(.*body=%?([\w.\-]+)", line)]
    return [line for b in bodies for line in comps.get(b, [])]


def test_decode_steps_copy_no_weight():
    """The decode loop reads every projection's weight where it lies. With a weight's two head axes
    contracted (o: ``hd,hde``) or produced (q/k/v), XLA:CPU picked its own order of the pair and
    transposed the weight at every step -- a copy of every layer's o weight per new token, ~8 ms of a
    SmolLM2 decode step; the projections are plain 2-D matmuls now."""
    params, hlo = _decode_hlo(ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=40,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=16))
    weights = {int(np.prod(x.shape)) for x in jax.tree.leaves(params) if x.ndim >= 2}
    copied = []
    for line in _while_bodies(hlo):
        m = re.match(r"\s+%(?P<name>\S+) = f32\[(?P<dims>[\d,]*)\]\S* (?P<op>[\w-]+)\(", line)
        if m and (m["op"] in ("copy", "transpose") or m["name"].startswith("copy")):
            if int(np.prod([int(d) for d in m["dims"].split(",") if d])) in weights:
                copied.append(line.strip()[:160])
    assert copied == []


def _small(scan: bool = False, **kw) -> tuple[nnx.GraphDef, nnx.State]:
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, scan_layers=scan, **kw)
    return nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("kw", [{}, {"sliding_window": 3, "layer_types": ("full_attention", "sliding_attention"),
                                     "qk_norm": True, "post_norms": True}], ids=["llama", "mixed_layers"])
def test_prefill_of_the_last_position_only_equals_the_full_prefill(scan, kw):
    """``last_only``: the final layer runs at the last position alone; its hidden state and every
    layer's cache equal the full prefill's at left-padded rows of different lengths."""
    graphdef, params = _small(scan, **kw)
    model = nnx.merge(graphdef, params)
    toks, valid = left_pad([np.arange(3, 3 + n, dtype=np.int32) for n in (5, 12, 9)], 16, 0)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    outs = []
    for last_only in (False, True):  # (the empty cache made inside, as generate makes it: its index
        # is then a Python 0 and the prefill attends to its own keys)
        outs.append(jax.jit(lambda t, p, s, lo=last_only: model(t, p, s, KVCache.empty(model.cfg, 3, 24),
                                                                last_only=lo))(
            jnp.asarray(toks), positions, jnp.asarray(valid, jnp.int32)))
    (full, cache_full), (last, cache_last) = outs
    assert last.shape == (3, 1, 32)
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, -1]), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(cache_full), jax.tree.leaves(cache_last), strict=True):
        # (a scanned model's last layer is compiled outside the loop: its rounding may differ)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_prefill_chunks_are_the_fewest_that_fit_the_budget():
    assert [prefill_chunks(8, 16, b) for b in (128, 64, 32, 16, 8)] == [1, 2, 4, 8, 8]
    assert prefill_chunks(6, 16, 40) == 3  # 2 rows of 16 fit, 3 would not; chunks divide the rows
    assert prefill_chunks(64, 4096) == 8   # the 1B GPU preset's dry run: 8 rows of 4,096 at a time


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_prefill_in_row_chunks_generates_the_same_tokens(scan):
    """Rows of different lengths, prefilled 2 at a time (chunk j takes rows j, j + 4, ...): every
    row's cache must come back to its own row, or its tokens change."""
    graphdef, params = _small(scan)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 64, int(rng.integers(2, 15))).astype(np.int32) for _ in range(8)]
    whole, chunked = (generate_all(make_generate_fn(graphdef, max_new_tokens=6, eos_ids=[], pad_id=0,
                                                    prefill_tokens=t), params, prompts, batch_size=8,
                                   pad_id=0, eos_ids=[]) for t in (PREFILL_TOKENS, 32))
    assert chunked == whole
    assert len({tuple(r) for r in whole}) > 1


def test_row_streams_generate_each_batch_as_equal_groups_at_once_with_the_same_tokens():
    """A batch's rows split into streams: each group of ``batch / streams`` rows is generated in a
    thread of its own, the groups of a batch at the same time, and every row's greedy tokens and
    place are those of the batch generated whole."""
    graphdef, params = _small()
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 64, int(rng.integers(2, 30))).astype(np.int32) for _ in range(14)]
    gen = make_generate_fn(graphdef, max_new_tokens=6, eos_ids=[5], pad_id=0)
    whole = {n: generate_all(gen, params, prompts[:n], batch_size=8, pad_id=0, eos_ids=[5]) for n in (12, 14)}
    assert len({tuple(r) for r in whole[14]}) > 1

    compiled = CompiledGenerate(gen)
    calls, running, overlapped = [], [0], []
    lock = threading.Lock()

    def spy(params, toks, valid, rng):
        with lock:
            running[0] += 1
            calls.append((threading.current_thread().name, toks.shape[0]))
        time.sleep(0.2)  # long enough for the batch's other group to start meanwhile
        with lock:
            overlapped.append(running[0] > 1)
            running[0] -= 1
        return compiled(params, toks, valid, rng)

    # In batches of 8, 12 rows leave a second batch of 4: one group of 4, or two of 2 (a group of
    # nothing but filler rows is not run); 14 rows leave 6, so one group holds real and filler rows.
    for n, streams, groups in ((12, 2, [4, 4, 4]), (12, 4, [2] * 6), (14, 2, [4] * 4), (14, 4, [2] * 7)):
        calls.clear()
        overlapped.clear()
        assert generate_all(spy, params, prompts[:n], batch_size=8, pad_id=0, eos_ids=[5], streams=streams) == whole[n]
        assert [rows for _, rows in calls] == groups
        assert all(name.startswith("generate") for name, _ in calls) and any(overlapped)
    with pytest.raises(ValueError, match="3 row streams do not divide batches of 8 rows"):
        generate_all(gen, params, prompts, batch_size=8, pad_id=0, eos_ids=[5], streams=3)


def test_filler_rows_start_finished_and_do_not_keep_the_decode_loop_running():
    """A row with no valid prompt token (``generate_all``'s filler) generates only ``pad_id``, leaves
    the other rows' tokens as they are, and the loop stops when the real rows have finished: the
    decode steps are counted as they run."""
    graphdef, params = _small()
    prompts = [np.arange(3, 3 + n, dtype=np.int32) for n in (5, 9)]
    free = make_generate_fn(graphdef, max_new_tokens=8, eos_ids=[], pad_id=0)
    alone = np.asarray(free(params, *left_pad(prompts, 16, 0), jax.random.key(0)))
    eos = int(alone[0, 2])  # the first row ends at its third token
    gen = make_generate_fn(graphdef, max_new_tokens=8, eos_ids=[eos], pad_id=0)
    toks, valid = left_pad(prompts + [np.zeros(0, np.int32)], 16, 0)
    out = np.asarray(gen(params, toks, valid, jax.random.key(0)))
    assert (out[2] == 0).all()
    np.testing.assert_array_equal(out[:2], np.asarray(gen(params, toks[:2], valid[:2], jax.random.key(0))))

    steps = []

    class Counting:  # no token ever ends a row by itself: only ``done`` and the limit stop the loop
        def __call__(self, tok, pos, valid, cache):
            jax.debug.callback(lambda: steps.append(1))
            return jnp.zeros((tok.shape[0], 1, 4)), cache

        def logits(self, hidden):
            return hidden

    def decode(done):
        steps.clear()
        out = jax.jit(lambda done: _decode(Counting(), lambda logits, rng: jnp.full(2, 7, jnp.int32),
                                           jnp.asarray([5, 7]), jnp.zeros(2, jnp.int32), None,
                                           jax.random.key(0), n=6, eos=jnp.asarray([5]), pad_id=0,
                                           done=done))(done)
        jax.effects_barrier()
        return np.asarray(out).tolist(), len(steps)

    # Row 0's first token is EOS; row 1 (live) runs to the limit, (filler) not at all.
    assert decode(jnp.asarray([False, False])) == ([[5, 0, 0, 0, 0, 0], [7] * 6], 6)
    assert decode(jnp.asarray([False, True])) == ([[5, 0, 0, 0, 0, 0], [0] * 6], 1)


class _Device:
    def __init__(self, platform):
        self.platform = platform


def test_row_streams_one_per_core_of_a_single_cpu_device_in_greedy_decoding():
    cpu = [_Device("cpu")]
    assert MIN_STREAM_ROWS == 16
    assert [row_streams(r, devices=cpu, cores=2) for r in (1, 8, 16, 24, 32, 128)] == [1, 1, 1, 1, 2, 2]
    assert [row_streams(r, devices=cpu, cores=8) for r in (32, 48, 96, 100, 128, 256)] == [2, 3, 6, 5, 8, 8]
    assert row_streams(128, devices=cpu, cores=1) == 1
    assert row_streams(128, greedy=False, devices=cpu, cores=2) == 1  # a sample depends on the grouping
    assert row_streams(128, devices=cpu * 2, cores=2) == 1  # several devices: collectives in issue order
    assert row_streams(128, devices=[_Device("gpu")], cores=2) == 1
    assert row_streams(128, devices=[_Device("tpu")], cores=2) == 1


def test_row_streams_count_the_cores_where_the_os_has_no_affinity_call(monkeypatch):
    monkeypatch.delattr("os.sched_getaffinity", raising=False)  # macOS
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert row_streams(128, devices=[_Device("cpu")]) == 4


def test_prefill_in_row_chunks_under_a_mesh_moves_no_rows():
    """Batch split 4 ways, kv heads 2 ways: 2 rows per device, prefilled one per device at a time.
    The tokens equal the unsharded whole prefill's, and chunking adds no collective to the program."""
    mesh = sharding_lib.make_mesh({"data": 4, "fsdp": 1, "tensor": 2}, jax.devices()[:8])
    graphdef, params = _small(attention_batch_axes=("data", "fsdp"), attention_head_axes=("tensor",))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 64, int(rng.integers(2, 15))).astype(np.int32) for _ in range(8)]
    ref = generate_all(make_generate_fn(graphdef, max_new_tokens=6, eos_ids=[], pad_id=0), params,
                       prompts, batch_size=8, pad_id=0, eos_ids=[])
    collectives = []
    for budget in (PREFILL_TOKENS, 16):
        gen = make_generate_fn(graphdef, max_new_tokens=6, eos_ids=[], pad_id=0, mesh=mesh,
                               prefill_tokens=budget)
        assert generate_all(gen, params, prompts, batch_size=8, pad_id=0, eos_ids=[]) == ref
        toks, valid = left_pad(prompts, 16, 0)
        hlo = gen.lower(params, toks, valid, jax.random.key(0)).compile().as_text()
        collectives.append(sorted(re.findall(r"= \S+ (all-gather|all-to-all|collective-permute)[-a-z]*\(", hlo)))
    assert collectives[1] == collectives[0]


def _fsdp_spec(mesh_axes: dict[str, int]):
    """The demo model's spec on 8 devices split as ``mesh_axes``, and random parameters in its
    shardings (as the evaluator gets them from training)."""
    config = demo.get_config()
    config.mesh = dict(mesh_axes)
    _, spec, *_ = helpers.setup(config, 64, jax.devices()[:8])
    return spec, spec.init_params(0)


def _loop_collectives(hlo: str) -> list[str]:
    """Collectives of more than a few bytes inside the compiled program's while loops (the decode
    loop; its stop test's all-reduce of one flag per row is not counted)."""
    comps, _ = topology._computations(hlo)
    bodies = [m for line in hlo.splitlines() for m in re.findall(r"(?:body|condition)=%?([\w.\-]+)", line)]
    seen, found = set(), []
    while bodies:
        name = bodies.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in comps.get(name, ()):
            op = re.search(r"= (\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                           r"[-a-z]*\(", line)
            if op and sum(topology._array_bytes(op.group(1))) > 64:
                found.append(line.strip()[:120])
            bodies += re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", line)
    return found


def test_fsdp_generation_gathers_the_weights_once_not_per_new_token():
    """Weights split over the batch's mesh axis (FSDP over 8 devices): "once" gathers them before the
    decode loop, so the loop moves no weight; "per_step" (what generation did before) gathers them in
    every decode step. Both generate the tokens one device does."""
    spec, params = _fsdp_spec({"data": 1, "fsdp": 8, "tensor": 1})
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 64, int(rng.integers(2, 15))).astype(np.int32) for _ in range(16)]
    ref = generate_all(make_generate_fn(spec.graphdef, max_new_tokens=6, eos_ids=[], pad_id=0),
                       jax.device_get(params), prompts, batch_size=16, pad_id=0, eos_ids=[])
    toks, valid = left_pad(prompts, 16, 0)
    loops = {}
    for mode in ("once", "per_step"):
        gen = make_generate_fn(spec.graphdef, max_new_tokens=6, eos_ids=[], pad_id=0, mesh=spec.mesh,
                               param_shardings=spec.param_shardings, gather=mode)
        assert generate_all(gen, params, prompts, batch_size=16, pad_id=0, eos_ids=[]) == ref, mode
        loops[mode] = _loop_collectives(gen.lower(params, toks, valid, jax.random.key(0)).compile().as_text())
    assert loops["once"] == []
    assert len(loops["per_step"]) >= 4  # (every layer's weights, or their pieces, each step)
    assert len({tuple(r) for r in ref}) > 1


def test_gather_plan_keeps_tensor_splits_and_respects_the_budget():
    spec, params = _fsdp_spec({"data": 1, "fsdp": 4, "tensor": 2})
    bf16 = jnp.dtype(jnp.bfloat16)
    gathered, size = gather_plan(params, spec.param_shardings, ("data", "fsdp"), bf16, "once")
    specs = [s.spec for s in jax.tree.leaves(gathered)]
    assert all("fsdp" not in str(s) for s in specs) and any("tensor" in str(s) for s in specs)
    # bytes per device: bfloat16 weights (float32 norms), each split only by its tensor axis
    expect = 0.0
    for (path, x), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(gathered)):
        norm = any(str(getattr(k, "key", "")).endswith("norm") for k in path)
        expect += x.size * (4 if norm else 2) / (2 if "tensor" in str(sh.spec) else 1)
    assert size == expect
    fits = size / GATHER_BUDGET  # the smallest device memory "auto" gathers for
    assert gather_plan(params, spec.param_shardings, ("data", "fsdp"), bf16, "auto", 1.01 * fits)[0] is not None
    assert gather_plan(params, spec.param_shardings, ("data", "fsdp"), bf16, "auto", 0.99 * fits)[0] is None
    assert gather_plan(params, spec.param_shardings, ("data", "fsdp"), bf16, "per_step")[0] is None
    assert gather_plan(params, spec.param_shardings, ("data", "fsdp"), bf16, "auto", None)[0] is None  # CPU
    assert gather_plan(params, spec.param_shardings, ("data", "fsdp"), bf16, "once", 1.0)[0] is not None
    data_only, params_d = _fsdp_spec({"data": 8, "fsdp": 1, "tensor": 1})  # replicated weights: nothing to do
    assert gather_plan(params_d, data_only.param_shardings, ("data", "fsdp"), bf16, "once")[0] is None
    with pytest.raises(ValueError, match="gather_weights must be one of"):
        gather_plan(params, spec.param_shardings, ("data", "fsdp"), bf16, "never")


def test_weights_cast_before_the_gather_give_the_same_logits_bitwise():
    """Generation casts every weight but a norm's to the compute dtype before gathering it: the model
    casts them there where it uses them, so its logits are bitwise the same. A norm's weight is used
    in float32 -- cast to bfloat16 too early, the logits change (the check can fail)."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, qk_norm=True, post_norms=True,
                      dtype="bfloat16", param_dtype="float32")
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape, x.dtype),
                          state.to_pure_dict())  # norms no longer all ones (exact in bfloat16)
    mesh = sharding_lib.make_mesh({"data": 1}, jax.devices()[:1])
    shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), params)
    tokens = jnp.asarray(np.arange(3, 19, dtype=np.int32)[None])
    pos, seg = jnp.arange(16, dtype=jnp.int32)[None], jnp.ones((1, 16), jnp.int32)

    @jax.jit
    def logits(p):
        model = nnx.merge(graphdef, p)
        return model.logits(model(tokens, pos, seg)[0])

    early = jax.jit(lambda p: gather_weights(p, shardings, jnp.bfloat16))(params)
    dtypes = {jax.tree_util.keystr(k): x.dtype for k, x in jax.tree_util.tree_flatten_with_path(early)[0]}
    assert dtypes["['layers'][0]['attn']['q']"] == jnp.bfloat16 and dtypes["['embed']"] == jnp.bfloat16
    assert dtypes["['final_norm']['scale']"] == jnp.float32
    assert dtypes["['layers'][0]['attn']['q_norm']['scale']"] == jnp.float32
    np.testing.assert_array_equal(np.asarray(logits(early)), np.asarray(logits(params)))
    everything = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert not np.array_equal(np.asarray(logits(everything)), np.asarray(logits(params)))
    # a quantised (QLoRA) base weight keeps its float32 scales: dequantisation reads them as they are
    q = {"up": quant.quantize(np.ones((64, 32), np.float32), "nf4", (-2,))}
    kept = jax.jit(lambda p: gather_weights(p, jax.tree.map(lambda _: shardings["embed"], p), jnp.bfloat16))(q)
    assert kept["up"].scale.dtype == jnp.float32 and kept["up"].codes.dtype == q["up"].codes.dtype


@pytest.mark.parametrize("rows", [3, 1])
def test_scanned_decode_steps_copy_no_cache_stack(rows):
    """A scanned model's decode loop writes the cache's [layers, ...] stacks in place. At one row,
    attention's products and sums (the unrolled model's, ``_softmax_attend_fwd``) read layer i
    straight out of the stack, and XLA then copied both whole stacks every step: 19% slower for
    SmolLM2; the scanned model keeps the dots."""
    # (head_dim 64: with 8, XLA fused the read another way and made no copy either way)
    _, hlo = _decode_hlo(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                     scan_layers=True), rows)
    stack = re.compile(rf"%(?P<name>\S+) = f32\[3,{rows},(2,64,21|2,21,64)\]\S* (?P<op>[\w-]+)\(")
    copies = [line.strip()[:160] for line in _while_bodies(hlo)
              if (m := stack.search(line)) and (m["op"] == "copy" or "copy" in m["name"])]
    assert copies == []


def test_scanned_prefill_reads_layers_out_of_the_stack_without_copying_it():
    """The prefill's loop over all but the last layer reads each layer where it lies: slicing the
    stacked weights to ``[:-1]`` first copied all but one layer's weights (15 GB per chip for the 8B
    preset's gathered weights, by the TPU compiler)."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, scan_layers=True)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    toks, valid = left_pad([np.arange(3, 10, dtype=np.int32)] * 2, 16, 0)
    hlo = make_generate_fn(graphdef, max_new_tokens=3, eos_ids=[], pad_id=0).lower(
        params, toks, valid, jax.random.key(0)).compile().as_text()
    # every weight of two of the three layers: [2, 32, 48] (gate, up), [2, 48, 32] (down), [2, 32, 4, 8] (q)...
    stacks = re.findall(r"= f32\[2,(?:32,48|48,32|32,4,8|32,2,8|4,8,32)\]\S* \S+\(", hlo)
    assert stacks == []
