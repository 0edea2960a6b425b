"""LoRA adapters in the Hugging Face PEFT format: round trips against ``peft`` and transformers, and
a LoRA run end to end through the entry points (train, eval, export --adapter / merged, init_from).
(Apart from ``lora_test.py`` so that the two files run on two workers.)"""

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
from tests.conftest import reference
from tests.lora_test import ALL, randomize_b
from trainer.io import hf as hf_io
from trainer.io import peft as peft_io
from trainer.models import lora
from trainer.models.transformer import Transformer
from trainer.training import experiment, modeling, rundir

torch = reference("torch")
transformers = reference("transformers")
peft = reference("peft")
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
    save_file(peft_io.peft_tensors(host, cfg, model_type), str(adapter_dir / "adapter_model.safetensors"))
    (adapter_dir / "adapter_config.json").write_text(json.dumps(peft_io.adapter_config(cfg, path, model_type)))
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
    back = peft_io.read_peft(str(adapter_dir), cfg, model_type, expected)
    assert helpers.tree_equal(back, lora.split(host, True)[0])
    # and scanned: the same adapter into stacked [layers, ...] params
    scfg = dataclasses.replace(cfg, scan_layers=True)
    stacked = jax.eval_shape(lambda: nnx.state(Transformer(scfg, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict())
    back_s = peft_io.read_peft(str(adapter_dir), scfg, model_type, lora.split(stacked, True)[0])
    np.testing.assert_array_equal(back_s["layers"]["attn"]["q_lora_b"][1],
                                  host["layers"][1]["attn"]["q_lora_b"])


def test_bad_adapters_are_one_line_each(tmp_path_factory, tmp_path):
    _, path = hf_model("llama3", tmp_path_factory)
    cfg, model_type, _, params = _ours_with_adapters(path, rank=2, targets=("q", "v"))
    host = jax.device_get(params)
    from safetensors.numpy import save_file  # noqa: PLC0415
    d = tmp_path / "a"
    d.mkdir()
    save_file(peft_io.peft_tensors(host, cfg, model_type), str(d / "adapter_model.safetensors"))
    ac = peft_io.adapter_config(cfg, path, model_type)
    expected = lora.split(jax.eval_shape(lambda: params), True)[0]

    def error(**change):
        (d / "adapter_config.json").write_text(json.dumps({**ac, **change}))
        with pytest.raises(lora.LoraError) as e:
            peft_io.read_peft(str(d), cfg, model_type, expected)
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
        peft_io.read_peft(str(d), wide, model_type, wide_expected)


# ---------------------------------------------------------------------------------------------
# End to end through the entry points, from a Hugging Face base
# ---------------------------------------------------------------------------------------------

from tests.cli_test import assert_clean_error, run  # noqa: E402
from tests.hf_run_test import hf_dir  # noqa: E402,F401 (a fixture: tiny Qwen2 + tokenizer)


@pytest.mark.slow
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
    config = rundir.load_config(wd)
    tok = experiment.build_or_load_tokenizer(config, wd, train_rows=None)
    mesh = helpers.sharding_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    spec = modeling.model_spec(config, len(tok), mesh)
    from trainer.io.checkpoint import Checkpointer  # noqa: PLC0415
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
    config = config.replace(lora=dataclasses.replace(config.lora, init_from=adapter))
    again = modeling.model_spec(config, len(tok), mesh)
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


