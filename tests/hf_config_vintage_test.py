"""Every family's ``config.json`` as its release shipped it (older transformers' key forms), key for
key with only the sizes shrunk: our import must compute what transformers computes from the same file.

Released forms that a naive reader gets wrong (and this code did, before reading configs through
``transformers.AutoConfig``): Gemma 2 without ``layer_types`` (every layer sliding), Gemma 3 with
``sliding_window_pattern`` / ``rope_local_base_freq`` (every layer sliding, local RoPE everywhere),
Gemma 1 with ``hidden_act: "gelu"`` (meaning the tanh form).
"""

import json

import numpy as np
import pytest

from tests.conftest import reference

torch = reference("torch")
transformers = reference("transformers")

from tests.helpers import load_base, our_logits  # noqa: E402
from trainer.io import hf as hf_io  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, vocab_size=128,
             max_position_embeddings=256)

# Release config.json files, key for key; SMALL (and the per-entry overrides) shrink the sizes.
RELEASES = {
    "llama2_7b": ({
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
        "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000},
        dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama3_1_8b": ({
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
        "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256},
        dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
             rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64, "rope_type": "llama3"})),
    "llama3_2_1b": ({
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256},
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
             rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                           "original_max_position_embeddings": 64, "rope_type": "llama3"})),
    "mistral_7b_v0_1": ({
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000},
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=5)),
    "qwen2_5_0_5b": ({
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
        "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False,
        "use_sliding_window": False, "vocab_size": 151936},
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=5, max_window_layers=4)),
    "qwen3_0_6b": ({
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
        "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936},
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_window_layers=4)),
    "gemma_2b": ({
        "architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 2, "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 16384, "max_position_embeddings": 8192,
        "model_type": "gemma", "num_attention_heads": 8, "num_hidden_layers": 18, "num_key_value_heads": 1,
        "pad_token_id": 0, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
        "torch_dtype": "bfloat16", "transformers_version": "4.38.0.dev0", "use_cache": True,
        "vocab_size": 256000},
        dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16)),
    "gemma2_2b": ({
        "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
        "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
        "initializer_range": 0.02, "intermediate_size": 9216, "max_position_embeddings": 8192,
        "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4,
        "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
        "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.4", "use_cache": True,
        "vocab_size": 256000},
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
             sliding_window=5, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3_1b": ({
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid",
        "eos_token_id": 1, "final_logit_softcapping": None, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
        "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
        "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True,
        "vocab_size": 262144},
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
             sliding_window=5, sliding_window_pattern=3, num_hidden_layers=7)),
    # The Gemma 3 text model inside the 4B+ checkpoints: scaled global RoPE, unscaled local RoPE.
    "gemma3_text_4b": ({
        "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": None,
        "cache_implementation": "hybrid", "final_logit_softcapping": None, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2560, "initializer_range": 0.02,
        "intermediate_size": 10240, "max_position_embeddings": 131072, "model_type": "gemma3_text",
        "num_attention_heads": 8, "num_hidden_layers": 34, "num_key_value_heads": 4,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0,
        "sliding_window": 1024, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
        "use_cache": True, "vocab_size": 262208},
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
             sliding_window=5, sliding_window_pattern=3, num_hidden_layers=7)),
    "gpt2": ({
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
        "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None,
        "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
        "summary_use_proj": True, "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": 50257},
        dict(n_embd=64, n_head=4, n_layer=2, n_ctx=256, n_positions=256, vocab_size=128)),
}


def shrunk(name):
    release, sizes = RELEASES[name]
    cfg = dict(release)
    if cfg["model_type"] != "gpt2":
        cfg.update({k: v for k, v in SMALL.items()})
    cfg.update(sizes)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in cfg:
            cfg[k] = min(cfg[k], 3)
    assert set(cfg) == set(release) | set(sizes), "a release key was lost"
    return cfg


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_release_config_imports_like_transformers(name, tmp_path):
    legacy = shrunk(name)
    hf_cfg = transformers.AutoConfig.for_model(**legacy)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    with torch.no_grad():  # non-trivial norms, so a wrong norm form cannot hide
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln_" in pname:
                p.uniform_(0.5, 1.5) if pname.endswith("weight") else p.uniform_(-0.5, 0.5)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.15)
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(legacy))  # the release form, not today's
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                                  dtype=torch.float32).eval()

    graphdef, params, cfg = load_base(str(tmp_path))
    tokens = np.random.default_rng(0).integers(4, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(our_logits(graphdef, params, tokens), ref, atol=1e-4, rtol=0, err_msg=name)


def test_config_transformers_cannot_read_is_one_clear_error():
    with pytest.raises(hf_io.HFError, match="unsupported model_type 'mamba'; supported: llama"):
        hf_io.model_config_from_hf({"model_type": "mamba"})
    with pytest.raises(hf_io.HFError, match="RoPE type 'yarn' is not supported"):
        hf_io.model_config_from_hf({"model_type": "llama", **SMALL, "num_attention_heads": 4,
                                    "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 64}})
