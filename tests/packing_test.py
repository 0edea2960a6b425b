"""Packing and the grain loader: bins, efficiency on real data, packed == unpacked losses, epochs,
per-process sharding and checkpointable iterator state."""

import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from data_pipeline import loader, packing, pipeline, sources
from data_pipeline import tokenizer as tokenizer_lib
from tests import helpers
from tests.helpers import resolved
from trainer.models.transformer import Transformer
from trainer.training.modeling import model_config

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def examples(lengths, seed=0, vocab=60):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = rng.integers(3, vocab, n + 1).astype(np.int32)
        mask = np.zeros(n + 1, np.int32)
        mask[int(rng.integers(1, n + 1)):] = 1  # a supervised suffix
        out.append(loader.Example(ids, mask, {"source": "s", "task": str(i % 3)}))
    return out


@pytest.mark.parametrize("method", ["best_fit", "first_fit"])
def test_pack_places_every_example_once_within_capacity(method):
    lengths = np.random.default_rng(0).integers(1, 100, 500).tolist()
    bins = packing.pack(lengths, 128, method)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert packing.efficiency(lengths, bins, 128) > 0.95
    assert bins == packing.pack(lengths, 128, method)  # deterministic
    with pytest.raises(ValueError, match="more than the row"):
        packing.pack([129], 128, method)


@pytest.mark.parametrize("method", ["best_fit", "first_fit"])
def test_pack_holds_at_most_max_segments_a_row(method):
    """cuDNN's packed attention reads a row's first ``max_segments`` segments only, so the packer
    never makes more: short examples (1-8 tokens) would put ~28 in a 128-token row."""
    lengths = np.random.default_rng(0).integers(1, 9, 500).tolist()
    assert max(len(b) for b in packing.pack(lengths, 128, method)) > 8
    bins = packing.pack(lengths, 128, method, max_segments=8)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert max(len(b) for b in bins) == 8 and all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) == 63  # ceil(500 / 8): the count, not the tokens, closes every row


def test_packed_rows_restart_positions_and_number_segments():
    exs = examples([3, 5, 2])
    row = loader.pack_examples(exs, 12, pad_id=0)
    assert row["segment_ids"].tolist() == [1] * 3 + [2] * 5 + [3] * 2 + [0] * 2
    assert row["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 0, 0]
    assert row["inputs"][3:8].tolist() == exs[1].ids[:-1].tolist()
    assert row["targets"][3:8].tolist() == exs[1].ids[1:].tolist()
    assert row["weights"][3:8].tolist() == exs[1].loss_mask[1:].tolist()
    assert row["weights"][10:].sum() == 0


def test_packed_and_unpacked_per_example_losses_are_equal():
    """Each example's summed loss, packed with others, equals its loss alone in a padded row."""
    model = Transformer(model_config(resolved(helpers.tiny_config()), 60), rngs=nnx.Rngs(0))
    exs = examples([7, 20, 3, 11, 9, 30, 5], seed=1)
    seq = 36
    bins = packing.pack([len(e.ids) - 1 for e in exs], seq)
    assert len(bins) < len(exs)

    def per_token(batch):
        logits = model.forward_logits(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                                      jnp.asarray(batch["segment_ids"]))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                             jnp.asarray(batch["targets"]))
        return np.asarray(ce) * batch["weights"]

    packed_loss = {}
    for b in bins:
        row = loader.pack_examples([exs[i] for i in b], seq, 0)
        ce = per_token({k: v[None] for k, v in row.items()})[0]
        for k, i in enumerate(b):
            packed_loss[i] = ce[row["segment_ids"] == k + 1].sum()
    for i, ex in enumerate(exs):
        row = loader.pack_examples([ex], seq, 0)
        alone = per_token({k: v[None] for k, v in row.items()})[0].sum()
        np.testing.assert_allclose(packed_loss[i], alone, rtol=1e-5, atol=1e-5)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_loader_new_order_each_epoch_and_restored_state_gives_same_batches():
    exs = examples(list(range(2, 18)))  # 16 examples
    ds = loader.train_dataset(exs, seq_len=20, pad_id=0, batch_size=4, seed=3)
    it = iter(ds)
    epoch1 = take(it, 4)
    epoch2 = take(it, 4)
    first_tokens = lambda bs: [r[:3].tolist() for b in bs for r in b["inputs"]]  # noqa: E731
    assert sorted(map(tuple, first_tokens(epoch1))) == sorted(map(tuple, first_tokens(epoch2)))
    assert first_tokens(epoch1) != first_tokens(epoch2)  # same rows, a new order
    state = it.get_state()
    expected = take(it, 5)
    it2 = iter(loader.train_dataset(exs, seq_len=20, pad_id=0, batch_size=4, seed=3))
    it2.set_state(state)
    assert helpers.tree_equal(take(it2, 5), expected)


def test_packed_loader_state_and_per_process_shards():
    exs = examples(np.random.default_rng(2).integers(2, 15, 40).tolist())
    kw = dict(seq_len=32, pad_id=0, seed=1, packing="best_fit")
    single = take(iter(loader.train_dataset(exs, batch_size=4, **kw)), 6)
    shards = [take(iter(loader.train_dataset(exs, batch_size=4, process_index=p, process_count=2, **kw)),
                   6) for p in range(2)]
    # Process p's rows are every 2nd row of the single-process stream, starting at p.
    single_rows = np.concatenate([b["inputs"] for b in single])
    for p in range(2):
        rows = np.concatenate([b["inputs"] for b in shards[p]])
        np.testing.assert_array_equal(rows, single_rows[p::2][: len(rows)])
    it = iter(loader.train_dataset(exs, batch_size=4, **kw))
    take(it, 3)
    state = it.get_state()
    after = take(it, 3)
    it2 = iter(loader.train_dataset(exs, batch_size=4, **kw))
    it2.set_state(state)
    assert helpers.tree_equal(take(it2, 3), after)
    # Every example appears in the packed rows of one epoch exactly once.
    bins = loader.row_bins(exs, 32, "best_fit")
    assert sorted(i for b in bins for i in b) == list(range(len(exs)))


@pytest.mark.parametrize("config_name", ["gsm8k", "t0_mix"])
def test_packing_efficiency_on_shared_data_at_512(config_name):
    if not os.path.isdir(SHARED):
        pytest.skip("../shared/data absent")
    import importlib  # noqa: PLC0415
    config = importlib.import_module(f"configs.{config_name}").get_config()
    config.data.cache = False
    rows, _ = sources.build_splits(config.data)
    tok = tokenizer_lib.build_tokenizer(config.tokenizer, (r["messages"] for r in rows["train"]))
    exs, rep = pipeline.tokenize_split(config.data, tok, rows["train"])
    lengths = [len(e.ids) - 1 for e in exs]
    bins = packing.pack(lengths, 512)
    eff = packing.efficiency(lengths, bins, 512)
    print(f"{config_name}: {len(exs)} examples -> {len(bins)} rows of 512, efficiency {eff:.4f}")
    assert rep.kept == len(rows["train"]) and eff >= 0.97


def test_background_worker_processes_give_the_same_batches_and_state():
    from absl import flags  # noqa: PLC0415
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (entry points parse)
        flags.FLAGS.mark_as_parsed()
    exs = examples(list(range(2, 18)))
    kw = dict(seq_len=20, pad_id=0, batch_size=4, seed=5, packing="best_fit")
    threads = take(iter(loader.train_dataset(exs, **kw)), 6)
    it = iter(loader.train_dataset(exs, worker_count=1, **kw))
    assert helpers.tree_equal(take(it, 3), threads[:3])
    state = it.get_state()
    it2 = iter(loader.train_dataset(exs, worker_count=1, **kw))
    it2.set_state(state)
    assert helpers.tree_equal(take(it2, 3), threads[3:])


@pytest.mark.parametrize("packing_method", ["none", "best_fit"])
def test_eval_batches_hold_every_example_once_in_rows_that_do_not_depend_on_the_process_count(packing_method):
    """The eval's batches: every example's shifted tokens exactly once, as a segment of its own; the
    rows the same for one process as the union of two processes' shares; one row per example
    unpacked, fewer packed."""
    exs = examples([3, 17, 5, 9, 12, 2, 7, 30, 4, 6, 11])
    kw = dict(seq_len=32, pad_id=0, batch_size=4, packing=packing_method)
    single = list(loader.eval_batches(exs, **kw))
    rows = {k: np.concatenate([b[k] for b in single]) for k in loader.FIELDS}
    # Each example is one segment of one row: its inputs, targets, loss weights and positions.
    found = []
    for r in range(len(rows["inputs"])):
        for seg in range(1, rows["segment_ids"][r].max() + 1):
            at = rows["segment_ids"][r] == seg
            found.append((rows["inputs"][r][at].tolist(), rows["targets"][r][at].tolist(),
                          rows["weights"][r][at].tolist(), rows["positions"][r][at].tolist()))
    want = [(e.ids[:-1].tolist(), e.ids[1:].tolist(), e.loss_mask[1:].astype(np.float32).tolist(),
             list(range(len(e.ids) - 1))) for e in exs]
    assert sorted(found) == sorted(want)
    assert rows["weights"][rows["segment_ids"] == 0].sum() == 0  # padding and filler rows weigh nothing
    used = int((rows["segment_ids"] > 0).any(1).sum())
    assert used == (len(exs) if packing_method == "none" else len(loader.row_bins(exs, 32, packing_method)))
    if packing_method == "best_fit":
        assert used < len(exs) and len(single) < -(-len(exs) // 4)
    # Two processes: the same number of batches each, and together the single process's rows.
    shards = [list(loader.eval_batches(exs, **kw, process_index=p, process_count=2)) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(single)
    for b, whole in enumerate(single):
        for k in loader.FIELDS:
            np.testing.assert_array_equal(np.concatenate([shards[0][b][k], shards[1][b][k]]), whole[k])
