"""Fine-tuning from a Hugging Face checkpoint directory end to end: train -> eval -> export, and the
exported directory reloads in transformers with our checkpoint's logits."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import reference

torch = reference("torch")
transformers = reference("transformers")

from data_pipeline.synthetic import synthetic_splits  # noqa: E402
from data_pipeline.templating import prompt_completion_messages  # noqa: E402
from data_pipeline.tokenizer import train_demo_tokenizer  # noqa: E402
from tests.cli_test import run  # noqa: E402
from tests.helpers import resolved
from trainer.training import modeling  # noqa: E402
from trainer.training.runs import open_run  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Qwen2 (qkv biases, tied embeddings) with a padded vocabulary, plus tokenizer."""
    return qwen2_checkpoint(str(tmp_path_factory.mktemp("qwen2_tiny")), hidden_size=32,
                            intermediate_size=64, num_hidden_layers=2,
                            max_position_embeddings=8192)  # the GPU preset's 4-shot prompts of
    # 1,024-token rows need 5k positions (Qwen2.5 has 32k)


def qwen2_checkpoint(path: str, **sizes) -> str:
    """A random Qwen2 of ``sizes`` (4 heads, 2 k/v heads, tied embeddings) saved at ``path`` with the
    demo tokenizer trained on the synthetic rows; its vocabulary padded to a multiple of 64."""
    rows = synthetic_splits(400, 0, {"train": 1.0})["train"]
    tok = train_demo_tokenizer([prompt_completion_messages(r["prompt"], r["completion"]) for r in rows],
                               vocab_size=300, min_frequency=4)
    tok.save_pretrained(path)
    cfg = transformers.Qwen2Config(
        vocab_size=-(-len(tok) // 64) * 64, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **sizes)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def ours_from_checkpoint(wd):
    run = open_run(wd)  # a full fine-tuning run: its trainable params are the whole model
    _, params = run.restore("latest")
    run.close()
    return run.spec, params


def logits_both(spec, params, out_dir):
    tokens = np.random.default_rng(0).integers(3, 200, (2, 10))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens)).logits.numpy()
    ours = nnx.merge(spec.graphdef, params).forward_logits(
        jnp.asarray(tokens, jnp.int32), jnp.broadcast_to(jnp.arange(10), (2, 10)),
        jnp.ones((2, 10), jnp.int32))
    return np.asarray(ours), ref


@pytest.mark.slow
def test_train_eval_export_from_hf_checkpoint(hf_dir, tmp_path):
    wd, out = str(tmp_path / "run"), str(tmp_path / "export")
    r = run("trainer.train", "--config", "configs/tiny.py", "--workdir", wd, f"--hf_path={hf_dir}",
            "--config.tokenizer.kind=hf")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    r = run("trainer.eval", "--workdir", wd, "--checkpoint", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"| base ({os.path.basename(hf_dir)}) | zero-shot |" in r.stdout
    r = run("trainer.export", "--workdir", wd, "--out", out, "--checkpoint", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "qwen2"
    assert os.path.exists(os.path.join(out, "generation_config.json"))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    spec, params = ours_from_checkpoint(wd)
    base = spec.init_params(0)  # the imported weights: fine-tuning changed them
    assert not np.allclose(np.asarray(base["embed"]), np.asarray(params["embed"]))
    ours, ref = logits_both(spec, params, out)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_export_of_a_model_trained_from_scratch(tmp_path):
    wd, out = str(tmp_path / "run"), str(tmp_path / "export")
    assert run("trainer.train", "--config", "configs/tiny.py", "--workdir", wd).returncode == 0
    r = run("trainer.export", "--workdir", wd, "--out", out, "--checkpoint", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "llama"
    spec, params = ours_from_checkpoint(wd)
    ours, ref = logits_both(spec, params, out)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    r = run("trainer.export", "--workdir", wd, "--out", out)
    assert r.returncode == 2 and "not empty" in r.stderr


def test_bad_hf_path_is_one_clear_error(tmp_path):
    r = run("trainer.train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
            f"--config.model.hf_path={tmp_path}", "--config.tokenizer.kind=train_bpe")
    assert r.returncode == 2 and "no config.json" in r.stderr and "Traceback" not in r.stderr


def test_import_places_each_shard_on_its_device_only(hf_dir):
    """On a data x fsdp x tensor mesh, every imported leaf has its target sharding, devices hold only
    their shards, and the values are the checkpoint's."""
    from tests.helpers import tiny_config  # noqa: PLC0415
    from trainer import sharding as sharding_lib  # noqa: PLC0415
    from trainer.io import hf as hf_io
    config = tiny_config(data=2, fsdp=2, tensor=2)
    config.model.hf_path = hf_dir
    mesh = sharding_lib.make_mesh(dict(config.mesh))
    spec = modeling.model_spec(resolved(config), 300, mesh)
    params = spec.init_params(0)
    plain = hf_io.load_hf(hf_dir, spec.cfg, "qwen2")
    assert jax.tree.structure(params) == jax.tree.structure(plain)
    sharded_somewhere = False
    for x, want, sh in zip(jax.tree.leaves(params), jax.tree.leaves(plain),
                           jax.tree.leaves(spec.param_shardings)):
        assert x.sharding == sh
        np.testing.assert_array_equal(np.asarray(x), want)
        shard_shape = x.addressable_shards[0].data.shape
        sharded_somewhere |= shard_shape != x.shape
    assert sharded_somewhere  # e.g. the embedding is split over fsdp x tensor


@pytest.mark.skipif(not os.path.isdir(os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                   "data")), reason="../shared/data absent")
@pytest.mark.slow
def test_gpu_preset_runs_with_a_tiny_checkpoint_in_place_of_qwen(hf_dir, tmp_path):
    """The preset's own settings (bf16 compute, packing at 1024, chatml, answer pattern) on CPU."""
    wd = str(tmp_path / "run")
    tiny = ["--config.train.num_steps=2", "--config.train.batch_size=8", "--config.train.eval_every=2",
            "--config.train.checkpoint_every=2", "--config.train.log_every=1",
            "--config.train.progress_bar=False", "--config.data.sources.gsm8k.max_rows=40",
            "--config.data.cache=False", "--config.eval.max_examples=4", "--config.eval.max_new_tokens=8",
            "--config.eval.batch_size=4", "--config.eval.few_shot_k=1"]
    r = run("trainer.train", "--config", "configs/qwen2_5_0_5b_gpu.py", "--workdir", wd,
            f"--config.model.hf_path={hf_dir}", *tiny)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    r = run("trainer.eval", "--workdir", wd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| base (qwen2_tiny" in r.stdout
    r = run("data_pipeline.inspect", "--config", "configs/qwen2_5_0_5b_gpu.py", "--preview", "1",
            f"--config.model.hf_path={hf_dir}", "--config.data.cache=False")
    assert r.returncode == 0 and "packed (best_fit)" in r.stdout, r.stderr[-3000:]


def test_config_and_weights_that_disagree_are_one_clear_error(hf_dir, tmp_path):
    """config.json says one size, the safetensors another: one line naming the file and the tensor."""
    import shutil  # noqa: PLC0415
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the weights have 64
    (bad / "config.json").write_text(json.dumps(cfg))
    r = run("trainer.train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
            f"--hf_path={bad}", "--config.tokenizer.kind=hf", "--config.train.num_steps=1")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(errors) == 1 and str(bad) in errors[0], r.stderr[-3000:]
    assert "model.layers.0.mlp.gate_proj.weight (64, 32)" in errors[0], errors
