"""Batched generation with a KV cache, one ``jax.jit`` per (batch, prompt length) shape.

Prompts of different lengths are *left*-padded to a common length P, so every row's next token is
written to the same cache slot (P + t) and all rows decode in lockstep; each row's positions still
start at 0 on its first real token, and padding slots are masked out of attention.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trainer.models import flops as flops_lib
from trainer.models.kv_cache import KVCache
from trainer.settings.options import GATHER_WEIGHTS
from trainer.sharding import shard_count, spec_axes, with_mesh, without_axes


def _pick(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float = 1.0
          ) -> jax.Array:
    """Next token from [batch, vocab] float32 logits: greedy at temperature 0, else sampled from the
    top-k and then the top-p (nucleus) tokens."""
    if temperature == 0.0:
        return _first_argmax(logits)
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


def _first_argmax(logits: jax.Array) -> jax.Array:
    """``argmax(logits, -1)`` (the first of equal maxima) as a max and then a min over the maxima's
    indices: XLA:CPU runs argmax's (value, index) reduction 3.7x slower (3.5 ms a decode step for 32
    rows of SmolLM2's 49,152-token vocabulary). [batch, vocab] -> [batch] int32."""
    vocab = logits.shape[-1]
    at_max = logits == logits.max(-1, keepdims=True)
    first = jnp.min(jnp.where(at_max, jnp.arange(vocab, dtype=jnp.int32), vocab), -1)
    return jnp.minimum(first, vocab - 1)  # a row of NaNs has no maximum: the last token, not out of range


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (generation halts there)."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(ends)] if ends else text


# A prefill of more prompt tokens than this per device runs in row chunks, one after another: its
# attention temporaries grow with rows x prompt length^2 / blocks, and the 1B GPU preset's dry run
# (64 prompts of 4,096 tokens on one device) needed 101 GB of temporaries for a single prefill.
PREFILL_TOKENS = 32768


def prefill_chunks(rows: int, prompt_len: int, budget: int = PREFILL_TOKENS) -> int:
    """Into how many sequential chunks a prefill of ``rows`` prompts (one device's) is split: the
    fewest that divide ``rows`` and hold at most ``budget`` prompt tokens each (one row each when even
    that is more)."""
    return next((n for n in range(1, rows + 1) if rows % n == 0 and rows // n * prompt_len <= budget),
                rows)


# Weights that the batch's mesh axes also split (FSDP) are gathered where they are used, and inside
# the decode loop that is once per new token: the 8B preset on a v5p-64 gathered 3.4 TB per chip for
# 320 new tokens (the TPU compiler's HLO). Gathered once per call instead, a copy costs its size on
# every device: ``gather_weights="auto"`` takes that where the copy is at most this share of a
# device's known memory. The rest must hold the cache, the activations and, during training, the
# optimizer state: the 8B preset's 16.06 GB copy takes generation to 17.45 of a v6e's 32 GB per chip
# on a v6e-256 and to 21.24 of 95 on a v5p-64. Not on CPU devices (memory unknown): virtual devices
# share one memory, and 8 copies of a 33M model's weights ran generation 1.45x slower than gathering
# each layer where it is used (the demo's 0.9M ran 1.8x faster).
GATHER_BUDGET = 0.6


def gather_plan(params, param_shardings, batch_axes: Sequence[str], compute_dtype, mode: str = "auto",
                device_bytes: float | None = None) -> tuple[object | None, float]:
    """``(shardings, bytes)``: the weights' shardings with ``batch_axes`` dropped and what that copy
    holds per device (in the compute dtype, see ``gather_weights``), or ``(None, bytes)`` where
    generation should leave them split: ``mode`` "per_step", nothing split over those axes, or
    ("auto") more than ``GATHER_BUDGET`` of ``device_bytes`` or no ``device_bytes`` (CPUs).
    ``params``: arrays or shapes."""
    if mode not in GATHER_WEIGHTS:
        raise ValueError(f"gather_weights must be one of {GATHER_WEIGHTS}, got {mode!r}")
    gathered = without_axes(param_shardings, batch_axes)
    total = 0.0
    for (path, x), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(gathered),
                             strict=True):
        dtype = compute_dtype if _cast_early(path, x) else x.dtype
        total += x.size * jnp.dtype(dtype).itemsize / shard_count(sh)
    split = any(sh.mesh.shape[a] > 1 for sh in jax.tree.leaves(param_shardings)
                for a in spec_axes(sh.spec) if a in batch_axes)
    if mode == "per_step" or not split:
        return None, total
    if mode == "auto" and (not device_bytes or total > GATHER_BUDGET * device_bytes):
        return None, total
    return gathered, total


def _cast_early(path, x) -> bool:
    """Whether generation may cast this leaf to the compute dtype before gathering it: every floating
    weight is cast there where it is used, except a norm's, which is used in float32 (``Norm``); a
    quantised weight's scales stay as they are (dequantisation reads them)."""
    if isinstance(path[-1], jax.tree_util.GetAttrKey):  # a field of a QTensor, not a weight
        return False
    return (jnp.issubdtype(x.dtype, jnp.floating)
            and not any(str(getattr(k, "key", "")).endswith("norm") for k in path))


def gather_weights(params, shardings, compute_dtype):
    """``params`` cast (``_cast_early``) and constrained to ``shardings`` (``gather_plan``)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = [jax.lax.with_sharding_constraint(x.astype(compute_dtype) if _cast_early(p, x) else x, sh)
           for (p, x), sh in zip(flat, jax.tree.leaves(shardings), strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


def model_gather_plan(params, param_shardings, cfg, mesh: jax.sharding.Mesh | None, mode: str = "auto",
                      memory_bytes: float | None = None) -> tuple[object | None, float]:
    """``gather_plan`` for a model (``cfg``: its ``ModelConfig``) on ``mesh``: the batch axes are
    attention's that the mesh has, the memory a device's (``device_bytes``) unless given. What
    generation does, and what the dry run reports."""
    batch_axes = tuple(a for a in cfg.attention_batch_axes if mesh is not None and a in mesh.shape)
    if param_shardings is None or not batch_axes:
        return None, 0.0
    memory = memory_bytes if memory_bytes is not None else device_bytes(mesh)
    return gather_plan(params, param_shardings, batch_axes, jnp.dtype(cfg.dtype), mode, memory)


def device_bytes(mesh: jax.sharding.Mesh | None) -> float | None:
    """A device's memory: the runtime's limit (GPU, TPU), else the chip table's, else None (CPU)."""
    if mesh is None:
        return None
    device = mesh.devices.flat[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - topology devices (the dry run) and CPUs have none
        stats = {}
    if stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    gb = flops_lib.device_memory_gb(device)
    return gb * 1e9 if gb else None


def make_generate_fn(graphdef: nnx.GraphDef, *, max_new_tokens: int, eos_ids: Sequence[int],
                     pad_id: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                     mesh: jax.sharding.Mesh | None = None, prefill_tokens: int = PREFILL_TOKENS,
                     param_shardings=None, gather: str = "auto", memory_bytes: float | None = None):
    """Returns jitted ``generate(params, prompts, prompt_valid, rng) -> [batch, max_new_tokens] int32``.

    ``prompts``: [batch, P] int32, left-padded; ``prompt_valid``: [batch, P] bool. Output tokens after a
    row's first EOS are ``pad_id``; the loop stops early once every row has finished. A row with no
    valid prompt token (a last batch's filler, ``generate_all``) starts finished: all ``pad_id``, and
    it never keeps the loop running for the real rows. Prefill runs the
    final layer's queries, attention and MLP and the LM head at the last position only (every
    position's keys and values still go into the cache), in row chunks of at most ``prefill_tokens``
    prompt tokens per device (``prefill_chunks``). With ``mesh``, the prompts and the KV cache are
    split over the batch (and the cache over the kv heads) by the model's logical rules, so no device
    holds the whole cache. With ``param_shardings`` (the params' own), weights split over the batch's
    mesh axes are gathered once per call rather than by every decode step where ``gather_plan``
    says so (``gather``: auto | once | per_step; ``memory_bytes``: a device's, default
    ``device_bytes(mesh)``).
    """
    eos = jnp.asarray(list(eos_ids), jnp.int32)
    n = max_new_tokens

    def pick(logits, rng):
        return _pick(logits, rng, temperature, top_k, top_p)

    def shard(x, *names):
        """``x`` constrained to the mesh axes the model's batch/head dimensions map to."""
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*names))

    def generate(params, prompts: jax.Array, prompt_valid: jax.Array, rng: jax.Array) -> jax.Array:
        cfg = nnx.merge(graphdef, params).cfg
        b, p = prompts.shape
        gathered, _ = model_gather_plan(params, param_shardings, cfg, mesh, gather, memory_bytes)
        if gathered is not None:
            params = gather_weights(params, gathered, jnp.dtype(cfg.dtype))
        model = nnx.merge(graphdef, params)
        batch_axes = tuple(a for a in cfg.attention_batch_axes if mesh is not None and a in mesh.shape)
        head_axes = tuple(a for a in cfg.attention_head_axes if mesh is not None and a in mesh.shape)
        batch_axes = batch_axes if batch_axes and b % _size(mesh, batch_axes) == 0 else None
        head_axes = (head_axes if head_axes and cfg.num_key_value_heads % _size(mesh, head_axes) == 0
                     else None)
        cache_names = ((None,) if cfg.scan_layers else ()) + (batch_axes, head_axes, None, None)

        def prefill(prompts, valid, positions):
            """[rows, P] prompts -> hidden state [rows, embed] at the last slot, and their cache."""
            prompts = shard(prompts, batch_axes, None)
            cache = KVCache.empty(cfg, prompts.shape[0], p + n)
            cache = cache.replace(k=jax.tree.map(lambda a: shard(a, *cache_names), cache.k),
                                  v=jax.tree.map(lambda a: shard(a, *cache_names), cache.v))
            hidden, cache = model(prompts, positions, valid.astype(jnp.int32), cache, last_only=True)
            return hidden[:, -1], cache

        positions = jnp.maximum(jnp.cumsum(prompt_valid, axis=1) - 1, 0).astype(jnp.int32)
        chunks = prefill_chunks(b // (_size(mesh, batch_axes) if batch_axes else 1), p, prefill_tokens)
        if chunks == 1:
            last, cache = prefill(prompts, prompt_valid, positions)
        else:
            last, cache = _in_row_chunks(prefill, chunks, cfg.scan_layers, prompts, prompt_valid, positions)
        rng, sub = jax.random.split(rng)
        tok = pick(model.logits(last[:, None])[:, 0], sub)
        return _decode(model, pick, tok, positions[:, -1], cache, rng, n=n, eos=eos, pad_id=pad_id,
                       done=~prompt_valid.any(axis=1))

    if mesh is None:
        return jax.jit(generate)
    # The tokens come back replicated on every device: [batch, max_new_tokens] int32 is small, and
    # every process then reads all rows itself (a batch-sharded result spans other hosts' devices,
    # which no process can fetch).
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return with_mesh(mesh, jax.jit(generate, out_shardings=replicated))


def _decode(model, pick, tok: jax.Array, pos: jax.Array, cache: KVCache, rng: jax.Array, *, n: int,
            eos: jax.Array, pad_id: int, done: jax.Array) -> jax.Array:
    """The decode loop after a prefill: ``tok`` [batch] the token the prefill picked (the first new
    one), at the position after ``pos`` [batch], each step feeding the last token through ``model``
    and its ``cache`` and choosing the next with ``pick(logits, rng)``. -> [batch, n] int32, ``pad_id``
    after a row's first token in ``eos`` and in every row ``done`` [batch] bool at the start; stops
    once every row has finished."""
    b = tok.shape[0]
    ones = jnp.ones((b, 1), jnp.int32)

    def cond(carry):
        t, _, _, _, done, _, _ = carry
        return (t < n) & ~jnp.all(done)

    def body(carry):
        t, tok, pos, cache, done, out, rng = carry
        out = out.at[:, t].set(jnp.where(done, pad_id, tok))
        done = done | jnp.isin(tok, eos)
        pos = pos + 1
        hidden, cache = model(tok[:, None], pos[:, None], ones, cache)
        rng, sub = jax.random.split(rng)
        tok = pick(model.logits(hidden)[:, 0], sub)
        return t + 1, tok, pos, cache, done, out, rng

    carry = (jnp.int32(0), tok, pos, cache, done, jnp.full((b, n), pad_id, jnp.int32), rng)
    return jax.lax.while_loop(cond, body, carry)[5]


def _in_row_chunks(prefill, chunks: int, stacked: bool, *rows: jax.Array) -> tuple[jax.Array, KVCache]:
    """``prefill(*rows)`` run on ``chunks`` groups of rows in sequence (``lax.map``), the results put
    back in row order. Chunk j takes rows j, j + chunks, j + 2 chunks, ...: every device's contiguous
    share of a batch-sharded row axis then holds part of every chunk, so no row moves between devices.
    ``stacked``: the cache's keys/values are [layers, rows, ...] (a scanned model), else per layer."""
    def split(x):  # [rows, ...] -> [chunks, rows / chunks, ...]
        return x.reshape(x.shape[0] // chunks, chunks, *x.shape[1:]).swapaxes(0, 1)

    def join(x, axis=0):  # [chunks, ..., rows / chunks (at axis + 1), ...] -> [..., rows, ...]
        x = jnp.moveaxis(x, 0, axis + 1)
        return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])

    last, cache = jax.lax.map(lambda xs: prefill(*xs), tuple(split(x) for x in rows))
    kv_axis = 1 if stacked else 0
    return join(last), cache.replace(
        k=jax.tree.map(lambda a: join(a, kv_axis), cache.k), v=jax.tree.map(lambda a: join(a, kv_axis), cache.v),
        segment_ids=join(cache.segment_ids), positions=join(cache.positions), index=cache.index[0])


class CompiledGenerate:
    """``generate`` compiled ahead of its first call for each prompt shape, with the compile time
    counted apart (``compile_seconds``), so reported generation speed is generation, not XLA."""

    def __init__(self, generate):
        self.generate, self.compiled, self.compile_seconds = generate, {}, 0.0
        self._lock = threading.Lock()  # row streams (``generate_all``) call it from several threads

    def __call__(self, params, prompts, prompt_valid, rng):
        key = (prompts.shape, prompt_valid.shape)
        with self._lock:
            if key not in self.compiled:
                t0 = time.perf_counter()
                self.compiled[key] = self.generate.lower(params, prompts, prompt_valid, rng).compile()
                self.compile_seconds += time.perf_counter() - t0
        return self.compiled[key](params, prompts, prompt_valid, rng)


def _size(mesh, axes) -> int:
    return int(np.prod([mesh.shape[a] for a in axes]))


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


def bucket_length(n: int, multiple: int = 16) -> int:
    """The padded prompt length for a prompt of ``n`` tokens: ``multiple`` times 1, 2, 3, 4, 6, 8,
    12, 16, ... (a power of two, or 1.5 times one), so a whole eval compiles at most
    2 log2(longest / multiple) + 1 shapes and pads a batch's longest prompt by under a third (plain
    powers of two padded 33 tokens to 64 and made a prefill of short prompts up to 2x the work)."""
    units = -(-max(n, 1) // multiple)
    power = 1 << (units - 1).bit_length()
    return multiple * (power * 3 // 4 if power >= 4 and units <= power * 3 // 4 else power)


# A row stream (``generate_all``) holds at least this many rows. A small batch's decode step is
# bound by reading the weights, and each stream reads them all: SmolLM2's 8 rows as two streams of 4
# ran 0.81x of one stream of 8, its 32 rows as two of 16 1.09x, the demo's 32 rows 1.39x.
MIN_STREAM_ROWS = 16


def row_streams(rows: int, *, greedy: bool = True, devices: Sequence[jax.Device] | None = None,
                cores: int | None = None) -> int:
    """Into how many equal groups of rows ``generate_all`` splits a batch of ``rows``, running them
    at once, each in a thread of its own (``streams``): one per core, each of at least
    ``MIN_STREAM_ROWS`` rows, on a CPU that is the run's only device, in greedy decoding; else 1.

    Why: XLA:CPU splits each op of one program over its threads, and a decode step is many small ops
    (about 55 YNNPACK calls at the demo's shape), each handed to the other thread and waited for.
    Two programs side by side keep both cores busy instead: the demo's 128 rows in 122 ms against
    219 as one program (2 cores, tokens identical). Only greedy rows come out the same in any
    grouping (a sample depends on the batch's random key); only a single device, because a program
    over several (or several processes') runs their collectives in the order the programs are
    issued. ``devices``: default ``jax.devices()``; ``cores``: default the CPUs this process may run
    on."""
    devices = jax.devices() if devices is None else devices
    if not greedy or len(devices) != 1 or devices[0].platform != "cpu":
        return 1
    cores = _cores() if cores is None else cores
    return max(s for s in range(1, cores + 1) if rows % s == 0 and (s == 1 or rows // s >= MIN_STREAM_ROWS))


def _cores() -> int:
    """The CPUs this process may run on (macOS has no affinity call: all of them there)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def generate_all(generate, params, prompts: Sequence[np.ndarray], *, batch_size: int, pad_id: int,
                 eos_ids: Sequence[int], seed: int = 0, multiple: int = 16, streams: int = 1,
                 on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """Generates for every prompt; returns each completion's ids up to (excluding) its EOS, in the
    prompts' order.

    Prompts are sorted by length and batched with their neighbours; each batch is left-padded to its
    bucket (``bucket_length``), not to the longest prompt of the whole set, and the last batch is
    filled with empty prompts -- so a few short-prompt batches never pay for one long prompt, and the
    number of compiled shapes stays logarithmic. Greedy results do not depend on the batching.
    ``streams`` (``row_streams``; it must divide ``batch_size``): each batch's rows run as that many
    equal groups at once, each in a thread of its own, with the same random key. The last batch
    runs only the groups that hold a prompt, and its filler rows (empty prompts) start finished.
    ``on_batch(rows)`` is called after each batch (a progress bar).
    """
    if batch_size % streams:
        raise ValueError(f"{streams} row streams do not divide batches of {batch_size} rows")
    group = batch_size // streams
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    rng = jax.random.key(seed)
    results: list[list[int] | None] = [None] * len(prompts)
    with ThreadPoolExecutor(streams, thread_name_prefix="generate") if streams > 1 else nullcontext() as pool:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            chunk = [prompts[i] for i in idx]
            groups = -(-len(idx) // group)  # a group of nothing but filler would be all prefill, no use
            chunk += [np.zeros(0, np.int32)] * (groups * group - len(idx))
            toks, valid = left_pad(chunk, bucket_length(max(len(x) for x in chunk), multiple), pad_id)
            rng, sub = jax.random.split(rng)
            out = _in_streams(generate, params, toks, valid, sub, pool, groups)[:len(idx)]
            for i, row in zip(idx, out):
                ids = []
                for t in row.tolist():
                    if t in eos_ids:
                        break
                    ids.append(t)
                results[i] = ids
            if on_batch is not None:
                on_batch(len(idx))
    return results  # type: ignore[return-value]


def _in_streams(generate, params, toks: np.ndarray, valid: np.ndarray, rng: jax.Array,
                pool: ThreadPoolExecutor | None, streams: int) -> np.ndarray:
    """``generate`` over the batch's rows, as ``streams`` equal groups in ``pool``'s threads at once
    (each thread waits for its own group's tokens) -> [batch, new tokens] on the host."""
    def run(rows: slice) -> np.ndarray:
        return np.asarray(jax.device_get(generate(params, toks[rows], valid[rows], rng)))

    if pool is None:
        return run(slice(None))
    size = len(toks) // streams
    groups = [pool.submit(run, slice(g * size, (g + 1) * size)) for g in range(streams)]
    return np.concatenate([g.result() for g in groups])
