"""LoRA and QLoRA: the adapters against independent references (a merged-weight model for gradients,
Hugging Face PEFT for the adapter format, transformers for the merged export), resume, sharding, and
one clear line for each bad input."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import helpers
from trainer import experiment, hf_io, lora, quant
from trainer.cli import UserError
from trainer.model import LORA_TARGETS, Transformer
from trainer.step import make_forward, make_train_step

VOCAB, SEQ = 64, 36
ALL = tuple(LORA_TARGETS)


def lora_config(rank=4, mesh=None, **extra):
    c = helpers.tiny_config(**(mesh or dict(data=1, fsdp=1, tensor=1)))
    c.lora.rank = rank
    c.lora.alpha = 8.0
    for k, v in extra.items():
        c.lora[k] = v
    return c


def randomize_b(params, seed=1):
    """Non-zero B everywhere (a trained adapter), so the LoRA branch matters."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(seed)
    out = [jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype) if str(p[-1].key).endswith("_lora_b") else x
           for p, x in leaves]
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def test_zero_init_is_the_base_and_a_step_changes_only_adapters():
    config = lora_config()
    _, spec, tx, schedule, state_sh, batch_sh = helpers.setup(config, VOCAB, jax.devices()[:1])
    plain_cfg = helpers.tiny_config(data=1, fsdp=1, tensor=1)
    _, plain, *_ = helpers.setup(plain_cfg, VOCAB, jax.devices()[:1])
    base = plain.init_params(0)
    state = experiment.init_train_state(spec, tx, 0, state_sh)
    tokens = helpers.random_batch(2, SEQ, VOCAB)["inputs"]
    np.testing.assert_array_equal(helpers.our_logits(spec.graphdef, state.model_params, tokens),
                                  helpers.our_logits(plain.graphdef, base, tokens))
    assert helpers.tree_equal(state.frozen, base)  # the same seed gives the same base
    # optimizer state exists for the adapters only
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    n_adapters = sum(x.size for x in jax.tree.leaves(state.params))
    assert all(lora.is_adapter(tuple(k.key for k in p)) for p, _ in
               jax.tree_util.tree_flatten_with_path(state.params)[0])
    assert n_opt <= 2 * n_adapters + 8
    frozen_before, adapters_before = jax.device_get(state.frozen), jax.device_get(state.params)
    step = experiment.jit_train_step(spec, tx, schedule, 1, state_sh, batch_sh)
    state, m = step(state, helpers.to_global(helpers.random_batch(8, SEQ, VOCAB), batch_sh))
    assert helpers.tree_equal(jax.device_get(state.frozen), frozen_before)  # bitwise
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), adapters_before, state.params)
    assert all(jax.tree.leaves(changed)) and float(m["grad_norm"]) > 0


def test_adapter_gradients_equal_those_of_the_merged_weight_model():
    """Reference: a plain model (no LoRA) whose weights are ``W + (alpha/r) A B`` -- differentiated
    through that merge by JAX. Our step differentiates the LoRA branch instead."""
    config = lora_config(rank=3)
    _, spec, *_ = helpers.setup(config, VOCAB, jax.devices()[:1])
    params = randomize_b(spec.init_params(0))
    adapters, frozen = spec.split(params)
    plain_cfg = dataclasses.replace(spec.cfg, lora_rank=0)
    plain_graph, _ = nnx.split(nnx.eval_shape(lambda: Transformer(plain_cfg, rngs=nnx.Rngs(0))))
    batch = jax.tree.map(jnp.asarray, helpers.random_batch(4, SEQ, VOCAB))

    def ours(ad):
        return make_forward(spec.graphdef)(lora.combine(frozen, ad), batch)["loss_sum"]

    def reference(ad):
        merged = jax.tree.map(lambda x: x, frozen)
        for i, layer in ad["layers"].items():
            for part, leaves in layer.items():
                for name in ALL:
                    if f"{name}_lora_a" in leaves:
                        a, b = leaves[f"{name}_lora_a"], leaves[f"{name}_lora_b"]
                        w = merged["layers"][i][part][name]
                        merged["layers"][i][part][name] = w + jnp.tensordot(a, b, axes=1) * (8.0 / 3)
        return make_forward(plain_graph)(merged, batch)["loss_sum"]

    np.testing.assert_allclose(float(ours(adapters)), float(reference(adapters)), rtol=1e-6)
    g_ours, g_ref = jax.grad(ours)(adapters), jax.grad(reference)(adapters)
    for x, y in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=1e-4)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_ours)) > 1e-3


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
def test_sharded_lora_run_equals_one_device():
    """data x fsdp x tensor = 2 x 2 x 2, dropout on, 2 micro-batches: the same adapters as on one
    device after 3 steps; adapters shard like their projections."""
    batches = [helpers.random_batch(8, SEQ, VOCAB, seed=s) for s in range(3)]
    out = []
    for mesh, devices in ((dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                          (dict(data=2, fsdp=2, tensor=2), jax.devices()[:8])):
        config = lora_config(mesh=mesh, dropout=0.1)
        _, spec, tx, schedule, state_sh, batch_sh = helpers.setup(config, VOCAB, devices)
        state = experiment.init_train_state(spec, tx, 0, state_sh)
        step = experiment.jit_train_step(spec, tx, schedule, 2, state_sh, batch_sh, seed=0)
        for b in batches:
            state, _ = step(state, helpers.to_global(b, batch_sh))
        out.append((jax.device_get(state.params), state))
    for x, y in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)
    q_b = out[1][1].params["layers"][0]["attn"]["q_lora_b"]  # [rank, heads, head_dim]: heads on tensor
    assert q_b.addressable_shards[0].data.shape == (4, 2, 8)


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    """Adapters, optimizer state and every logged loss: stopped at step 2 and resumed vs straight
    through (dropout on, so its keys must follow the step too)."""
    from trainer import loop  # noqa: PLC0415

    def config():
        c = lora_config(dropout=0.1, mesh=dict(data=-1, fsdp=1, tensor=1))
        c.train.num_steps, c.train.checkpoint_every, c.train.eval_every = 4, 2, 2
        return c

    straight = loop.train(config(), str(tmp_path / "a"))
    loop.train(config(), str(tmp_path / "b"), stop_at=2)
    resumed = loop.train(config(), str(tmp_path / "b"))
    assert helpers.tree_equal(jax.device_get(straight.params), jax.device_get(resumed.params))
    assert helpers.tree_equal(jax.device_get(straight.opt_state), jax.device_get(resumed.opt_state))
    losses = [[json.loads(line) for line in open(tmp_path / w / "metrics.jsonl")] for w in "ab"]
    pick = lambda rows: [(r["step"], r.get("train/loss")) for r in rows if "train/loss" in r]  # noqa: E731
    assert pick(losses[0]) == pick(losses[1]) and len(pick(losses[0])) == 4
    saved = os.listdir(tmp_path / "b" / "checkpoints" / "4")
    assert "base" in saved and "params" in saved  # the base's identity, not its weights
    params_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                       os.walk(tmp_path / "b" / "checkpoints" / "4" / "params") for f in fs)
    assert params_bytes < 200_000  # adapters only (the frozen base would add its 160 kB + more)


@pytest.mark.parametrize("kind,max_gap", [("int8", 2e-3), ("nf4", 5e-2)])
def test_qlora_base_is_quantised_and_close_to_the_float_base(kind, max_gap):
    """The quantised base's loss within ``max_gap`` (relative) of the float base's on the same batch,
    its projections stored in int8 / packed 4-bit, and a step trains the adapters."""
    batch = helpers.random_batch(8, SEQ, VOCAB)
    losses, nbytes = {}, {}
    for quant_kind in ("", kind):
        config = lora_config(base_quant=quant_kind)
        config.model.scan_layers = True
        _, spec, tx, schedule, state_sh, batch_sh = helpers.setup(config, VOCAB, jax.devices()[:1])
        state = experiment.init_train_state(spec, tx, 0, state_sh)
        out = make_forward(spec.graphdef)(state.model_params, jax.tree.map(jnp.asarray, batch))
        losses[quant_kind] = float(out["loss_sum"] / out["tokens"])
        q = state.frozen["layers"]["mlp"]["up"]
        nbytes[quant_kind] = q.nbytes
        step = experiment.jit_train_step(spec, tx, schedule, 1, state_sh, batch_sh)
        state, m = step(state, helpers.to_global(batch, batch_sh))
        assert np.isfinite(float(m["loss"])) and float(m["skipped"]) == 0
    assert isinstance(state.frozen["layers"]["mlp"]["up"], quant.QTensor)
    assert abs(losses[kind] - losses[""]) / losses[""] < max_gap
    assert nbytes[kind] < nbytes[""] / (3.5 if kind == "int8" else 6)


def test_quantisers_round_trip_and_nf4_matches_its_levels():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 64, 4, 8)).astype(np.float32)  # stacked q: [layers, embed, heads, head_dim]
    q8 = quant.quantize(w, "int8", (-3,))
    assert q8.codes.dtype == np.int8 and q8.scale.shape == (2, 1, 4, 8)
    np.testing.assert_allclose(np.asarray(quant.dequantize(q8)), w, atol=np.abs(w).max() / 254 + 1e-6)
    q4 = quant.quantize(w, "nf4", (-3,))
    assert q4.codes.dtype == np.uint8 and q4.codes.size == w.size // 2
    d = np.asarray(quant.dequantize(q4))
    # every value is a scaled NF4 level, and the nearest one
    blocks = w.reshape(2, 1, 64, 4, 8)
    scale = np.abs(blocks).max(axis=2, keepdims=True)
    want = quant.NF4_LEVELS[np.abs(blocks[..., None] / scale[..., None] - quant.NF4_LEVELS).argmin(-1)] * scale
    np.testing.assert_allclose(d, want.reshape(w.shape), rtol=1e-6)
    # a layer's slice dequantises to that layer's weights (what lax.scan sees)
    layer1 = jax.tree.map(lambda x: jnp.asarray(x)[1], q4)
    np.testing.assert_array_equal(np.asarray(layer1[...]), d[1])


# ---------------------------------------------------------------------------------------------
# PEFT round trips (transformers + peft as the reference)
# ---------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from tests.families_test import hf_model, padded_batch  # noqa: E402


def _ours_with_adapters(path, rank=4, targets=ALL):
    raw = hf_io.read_hf_config(path)
    cfg = hf_io.model_config_from_hf(raw, lora_rank=rank, lora_alpha=8.0, lora_targets=targets)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0, lora=1))),
                                   nnx.Param)
    adapters = lora.split(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0, lora=1)), nnx.Param).to_pure_dict(),
                          True)[0]
    params = lora.combine(jax.tree.map(jnp.asarray, hf_io.load_hf(path, cfg, raw["model_type"])),
                          randomize_b(adapters))
    return cfg, raw["model_type"], graphdef, params


def _torch_logits(model):
    tokens, mask, lengths = padded_batch()
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_peft_adapter_and_merged_export_round_trip(family, tmp_path_factory, tmp_path):
    """Ours == PEFT(base, our adapter) == transformers(our merged export), within 1e-4 (float32);
    the adapter read back is bitwise ours."""
    hf, path = hf_model(family, tmp_path_factory)
    targets = ALL if family == "llama3" else ("q", "v", "down")
    cfg, model_type, graphdef, params = _ours_with_adapters(path, targets=targets)
    tokens, mask, lengths = padded_batch()
    ours = helpers.our_logits(graphdef, params, tokens, mask)
    host = jax.device_get(params)

    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    from safetensors.numpy import save_file  # noqa: PLC0415
    save_file(lora.peft_tensors(host, cfg, model_type), str(adapter_dir / "adapter_model.safetensors"))
    (adapter_dir / "adapter_config.json").write_text(json.dumps(lora.adapter_config(cfg, path, model_type)))
    base_logits = _torch_logits(hf)
    peft_model = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
    ref = _torch_logits(peft_model)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(ours[i, :n], ref[i, :n], atol=1e-4, rtol=0)
    assert np.abs(ref - base_logits).max() > 1e-2  # the adapters matter: a wrong layout would show

    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    plain_cfg = dataclasses.replace(cfg, lora_rank=0, lora_targets=())
    hf_io.save_hf(hf_io.params_to_hf(lora.merge(host, cfg), plain_cfg, model_type), str(merged_dir))
    shutil.copy(os.path.join(path, "config.json"), merged_dir / "config.json")
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(merged_dir), attn_implementation="eager")
    got = _torch_logits(merged.eval())
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(got[i, :n], ref[i, :n], atol=1e-4, rtol=0)

    expected = lora.split(jax.eval_shape(lambda: params), True)[0]
    back = lora.read_peft(str(adapter_dir), cfg, model_type, expected)
    assert helpers.tree_equal(back, lora.split(host, True)[0])
    # and scanned: the same adapter into stacked [layers, ...] params
    scfg = dataclasses.replace(cfg, scan_layers=True)
    stacked = jax.eval_shape(lambda: nnx.state(Transformer(scfg, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict())
    back_s = lora.read_peft(str(adapter_dir), scfg, model_type, lora.split(stacked, True)[0])
    np.testing.assert_array_equal(back_s["layers"]["attn"]["q_lora_b"][1],
                                  host["layers"][1]["attn"]["q_lora_b"])


def test_bad_adapters_are_one_line_each(tmp_path_factory, tmp_path):
    _, path = hf_model("llama3", tmp_path_factory)
    cfg, model_type, _, params = _ours_with_adapters(path, rank=2, targets=("q", "v"))
    host = jax.device_get(params)
    from safetensors.numpy import save_file  # noqa: PLC0415
    d = tmp_path / "a"
    d.mkdir()
    save_file(lora.peft_tensors(host, cfg, model_type), str(d / "adapter_model.safetensors"))
    ac = lora.adapter_config(cfg, path, model_type)
    expected = lora.split(jax.eval_shape(lambda: params), True)[0]

    def error(**change):
        (d / "adapter_config.json").write_text(json.dumps({**ac, **change}))
        with pytest.raises(lora.LoraError) as e:
            lora.read_peft(str(d), cfg, model_type, expected)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "'IA3' adapter" in error(peft_type="IA3")
    assert "lora.rank=8" in error(r=8)
    assert "use_dora" in error(use_dora=True)
    # an adapter for a wider base: the shapes say so
    (d / "adapter_config.json").write_text(json.dumps(ac))
    wide = dataclasses.replace(cfg, hidden_size=cfg.hidden_size * 2)
    wide_expected = lora.split(jax.eval_shape(lambda: nnx.state(
        Transformer(wide, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()), True)[0]
    with pytest.raises(lora.LoraError, match="trained on another base model"):
        lora.read_peft(str(d), wide, model_type, wide_expected)


def test_bad_lora_config_is_one_line_each():
    from trainer import config_checks  # noqa: PLC0415
    c = lora_config(targets=("q", "qkv"), dropout=1.5, base_quant="int3")
    problems = config_checks.problems(c, 1)
    assert any("unknown 'qkv'; valid: q, k, v, o, gate, up, down" in p for p in problems), problems
    assert any("lora.dropout" in p for p in problems) and any("lora.base_quant" in p for p in problems)
    c = lora_config(rank=64)  # tiny: q is 32 x 32
    with pytest.raises(UserError, match=r"lora.rank=64 is larger than the projection it adapts: q \(32x32\)"):
        helpers.setup(c, VOCAB, jax.devices()[:1])


# ---------------------------------------------------------------------------------------------
# End to end through the entry points, from a Hugging Face base
# ---------------------------------------------------------------------------------------------

from tests.cli_test import assert_clean_error, run  # noqa: E402
from tests.hf_run_test import hf_dir  # noqa: E402,F401 (a fixture: tiny Qwen2 + tokenizer)


def test_lora_run_exports_what_peft_and_transformers_load(hf_dir, tmp_path):  # noqa: F811
    """train (LoRA) -> eval (base and fine-tuned rows from one base) -> export --adapter (PEFT loads it
    with our logits) and the merged export (transformers, equal to PEFT) -> lora.init_from reads it
    back; a base replaced under a run's feet is refused on resume."""
    base = str(tmp_path / "base")
    shutil.copytree(hf_dir, base)
    wd, adapter, merged = (str(tmp_path / n) for n in ("run", "adapter", "merged"))
    args = ["--config", "configs/tiny.py", f"--hf_path={base}", "--config.tokenizer.kind=hf",
            "--config.lora.rank=4", "--config.lora.alpha=8", "--config.lora.dropout=0.05",
            "--config.optimizer.learning_rate=0.05"]
    r = run("trainer.train", "--workdir", wd, *args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "trainable parameters" in r.stdout
    r = run("trainer.eval", "--workdir", wd, "--checkpoint", "latest", "--baselines", "zero_shot")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| base (base) | zero-shot |" in r.stdout and "| fine-tuned (step 2) |" in r.stdout
    r = run("trainer.export", "--workdir", wd, "--out", adapter, "--checkpoint", "latest", "--adapter")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run("trainer.export", "--workdir", wd, "--out", merged, "--checkpoint", "latest")
    assert r.returncode == 0, r.stderr[-3000:]

    # ours: the run's base + its checkpoint's adapters
    config = experiment.load_config(wd)
    config.mesh = dict(data=1, fsdp=1, tensor=1)
    tok = experiment.build_or_load_tokenizer(config, wd, train_rows=None)
    mesh = helpers.sharding_lib.make_mesh(dict(config.mesh), jax.devices()[:1])
    spec = experiment.model_spec(config, len(tok), mesh)
    from trainer.checkpoint import Checkpointer  # noqa: PLC0415
    ckpt = Checkpointer(wd, read_only=True)
    adapters = ckpt.restore_params(2, spec.abstract_trainable())
    ckpt.close()
    trained_b = [np.abs(np.asarray(x)).max() for p, x in jax.tree_util.tree_flatten_with_path(adapters)[0]
                 if str(p[-1].key).endswith("_lora_b")]
    assert min(trained_b) > 0  # B left zero-init would make every comparison below trivial
    params = lora.combine(spec.split(spec.init_params(0))[1], adapters)
    tokens = np.random.default_rng(0).integers(3, 200, (2, 10))
    ours = helpers.our_logits(spec.graphdef, params, tokens)

    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["base_model_name_or_path"] == os.path.abspath(base)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager").eval()
    with torch.no_grad():
        np.testing.assert_allclose(plain(input_ids=torch.tensor(tokens)).logits.numpy(), ref, atol=1e-4,
                                   rtol=0)

    # lora.init_from: the exported adapter back in, exactly the checkpoint's
    config.lora.init_from = adapter
    again = experiment.model_spec(config, len(tok), mesh)
    assert helpers.tree_equal(jax.device_get(again.split(again.init_params(0))[0]), jax.device_get(adapters))

    # the base's weights replaced in place (same path, same config): resume refuses, in one line
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in hf2.parameters():
            p.add_(0.01)
    hf2.save_pretrained(base)
    r = run("trainer.train", "--workdir", wd, *args, "--config.train.num_steps=4",
            "--config.train.allow_num_steps_change=True")
    assert_clean_error(r, "adapters only fit the base they were trained on")


def test_lora_under_remat_dots_keeps_each_projection_once(monkeypatch):
    """remat="dots" keeps each projection's output; an adapted projection is two matmuls (+ a
    low-rank one), and keeping both outputs made a LoRA step need more memory than full fine-tuning
    (1B preset on an H200: 38.98 vs 37.92 GB per device). The named policy keeps the sum only; the
    plain dots policy, patched back in, needs 20%+ more temporaries -- so this can fail."""
    from trainer import dry_run, model  # noqa: PLC0415

    def temporaries():
        c = lora_config(rank=8)
        c.model.hidden_size, c.model.intermediate_size, c.model.head_dim = 128, 512, 32
        c.model.scan_layers, c.model.remat = True, "dots"
        c.train.batch_size, c.data.max_length = 8, 256
        return dry_run.dry_run(c, 1, quiet=True)["memory_per_device_bytes"]["temporaries"]

    named = temporaries()
    monkeypatch.setattr(model, "_policy", lambda remat, lora=False: model.REMAT_POLICIES[remat])
    plain = temporaries()
    assert named < 0.85 * plain, (named, plain)
