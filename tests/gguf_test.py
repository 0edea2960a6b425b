"""GGUF import against transformers reading the same file (``gguf_file=``, torch at test time only).

The test writes tiny Llama and Qwen2 models as GGUF files with the ``gguf`` package's writer, the way
llama.cpp's converter lays them out (q/k rows permuted for ``llama``, quantised matrices), with a
byte-level BPE tokenizer and a chat template inside. Our import must give transformers' logits and
greedy tokens, and our torch-free tokenizer must encode like transformers' GGUF tokenizer.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import reference

torch = reference("torch")
transformers = reference("transformers")
gguf = reference("gguf")
reference("accelerate")  # transformers needs it to load GGUF files

from data_pipeline import gguf_parse  # noqa: E402
from data_pipeline import tokenizer as tokenizer_lib  # noqa: E402
from tests.helpers import load_base, our_logits  # noqa: E402
from trainer.evaluation.generate import generate_all, make_generate_fn  # noqa: E402
from trainer.io import gguf as gguf_io  # noqa: E402
from trainer.io import hf as hf_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = gguf.GGMLQuantizationType
TEXTS = ["Reverse the letters of \"ABCD\".", "hello world 12345", "<|im_start|>user\nhi<|im_end|>"]


def demo_tokenizer():
    convs = [[{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}] for t in
             ["Reverse the letters of \"ABCDEFG\".", "hello world, what is 12 plus 7?", "sort these words"] * 30]
    return tokenizer_lib.train_demo_tokenizer(convs, vocab_size=300, min_frequency=2)


def write_gguf(path, arch: str, qtypes: dict[str, int]):
    """A random tiny model of ``arch`` as a GGUF file; returns the token list length (vocab)."""
    tok = demo_tokenizer()
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    specials = set(tok.all_special_tokens)
    e, f, h, k, n = 64, 96, 4, 2, 2
    # Qwen3: head_dim != hidden / heads, stated as key_length (128: transformers' GGUF loader ignores
    # key_length and assumes Qwen3's default).
    d = 128 if arch == "qwen3" else e // h
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[arch]
    hf_cfg = cls(vocab_size=len(tokens), hidden_size=e, intermediate_size=f, num_hidden_layers=n,
                 num_attention_heads=h, num_key_value_heads=k, max_position_embeddings=128,
                 rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 **({"head_dim": d} if arch == "qwen3" else {}))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    sd = {name: p.detach().numpy().astype(np.float32) for name, p in model.state_dict().items()}
    for name in sd:
        if "norm" in name:
            sd[name] = np.random.default_rng(1).uniform(0.5, 1.5, sd[name].shape).astype(np.float32)
        elif name.endswith("bias"):
            sd[name] = np.random.default_rng(2).uniform(-0.5, 0.5, sd[name].shape).astype(np.float32)
        else:
            sd[name] = np.random.default_rng(3).normal(0, 0.15, sd[name].shape).astype(np.float32)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny " + arch)
    w.add_context_length(128)
    w.add_embedding_length(e)
    w.add_block_count(n)
    w.add_feed_forward_length(f)
    w.add_head_count(h)
    w.add_head_count_kv(k)
    w.add_rope_dimension_count(d)
    if arch == "qwen3":
        w.add_key_length(d)
        w.add_value_length(d)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tokenizer_lib.CHATML_TEMPLATE)

    to_gguf = {hf: gg for gg, hf in {**gguf_io.GLOBAL_NAMES, **{f"blk.{i}.{k}": f"model.layers.{i}.{v}"
               for i in range(n) for k, v in gguf_io.LAYER_NAMES.items()}}.items()}
    for name, x in sd.items():
        target = to_gguf[name]
        if arch == "llama" and name.endswith("q_proj.weight"):  # as llama.cpp's converter does
            x = gguf_io.permute_rope_rows(x, h)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            x = gguf_io.permute_rope_rows(x, k)
        qtype = next((t for key, t in qtypes.items() if key in target), Q.F32) if x.ndim == 2 else Q.F32
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(target, x.astype(np.float16 if qtype == Q.F16 else np.float32))
        else:
            w.add_tensor(target, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


QTYPES = {"llama": {"token_embd": Q.Q8_0, "attn_q": Q.Q4_1, "attn_k": Q.Q4_0, "attn_v": Q.F16,
                    "ffn_": Q.Q8_0, "output.": Q.Q5_1},
          "qwen2": {"attn_": Q.Q8_0, "ffn_up": Q.Q4_1, "token_embd": Q.F16},
          "qwen3": {"attn_q.": Q.Q4_1, "attn_output": Q.Q8_0, "ffn_down": Q.Q4_0}}


@pytest.fixture(scope="module", params=sorted(QTYPES))
def gguf_file(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{request.param}.gguf"
    write_gguf(path, request.param, QTYPES[request.param])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    return request.param, str(path), hf


def test_gguf_logits_and_greedy_match_transformers(gguf_file):
    arch, path, hf = gguf_file
    graphdef, params, cfg = load_base(path)
    assert cfg.tie_word_embeddings is False and cfg.qkv_bias == (arch == "qwen2")
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, (2, 14))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(our_logits(graphdef, params, tokens), ref, atol=1e-4, rtol=0, err_msg=arch)

    prompts = [rng.integers(3, cfg.vocab_size, n).astype(np.int32) for n in (5, 9)]
    gen = make_generate_fn(graphdef, max_new_tokens=24, eos_ids=[-1], pad_id=0)
    got = generate_all(gen, params, prompts, batch_size=2, pad_id=0, eos_ids=[-1])
    hf.generation_config.eos_token_id = None
    for p, g in zip(prompts, got):
        with torch.no_grad():
            want = hf.generate(torch.tensor(p[None].astype(np.int64)), do_sample=False, max_new_tokens=24,
                               pad_token_id=0).numpy()[0, len(p):]
        assert g == want.tolist(), arch


def test_gguf_permutation_round_trips():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert not np.array_equal(gguf_io.permute_rope_rows(w, 8), w)
    np.testing.assert_array_equal(gguf_io.unpermute_rope_rows(gguf_io.permute_rope_rows(w, 8), 8), w)


def test_gguf_tokenizer_matches_transformers(gguf_file):
    _, path, _ = gguf_file
    ours_tok = tokenizer_lib.load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    # Exactly the file's tokens (transformers adds a 301st, "<|endoftext|>", past the embeddings).
    assert len(ours_tok) == hf_io.read_hf_config(path)["vocab_size"] == 300
    for text in TEXTS:
        assert ours_tok(text).input_ids == theirs(text).input_ids, text
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    assert ours_tok.apply_chat_template(msgs, tokenize=False) == theirs.apply_chat_template(msgs, tokenize=False)
    assert (ours_tok.bos_token, ours_tok.eos_token) == (theirs.bos_token, theirs.eos_token)


def test_gguf_export_is_a_plain_hf_directory(gguf_file, tmp_path):
    """A GGUF user leaves with safetensors + config.json that transformers loads without gguf_file."""
    arch, path, hf = gguf_file
    graphdef, params, cfg = load_base(path)
    raw = hf_io.read_hf_config(path)
    hf_io.save_hf(hf_io.params_to_hf(jax.device_get(params), cfg, raw["model_type"]), str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(raw))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        np.testing.assert_allclose(again(ids).logits.numpy(), hf(ids).logits.numpy(), atol=1e-5, rtol=0)


# ---- bad input: one clear error naming the file ---------------------------------------------

def test_a_run_parses_its_gguf_file_once(gguf_file, tmp_path, monkeypatch):
    """The tokenizer, the config and the weights of one file share one parse (SmolLM2's took about 2 s);
    a file rewritten in place is parsed again."""
    _, path, _ = gguf_file
    copy = tmp_path / "model.gguf"
    copy.write_bytes(open(path, "rb").read())
    opened = []
    monkeypatch.setattr(gguf, "GGUFReader", lambda p, _real=gguf.GGUFReader: opened.append(p) or _real(p))
    tokenizer_lib.load_tokenizer(str(copy))
    load_base(str(copy))
    assert len(opened) == 1, opened
    data = copy.read_bytes()
    copy.write_bytes(data + b"\0" * 32)  # another size: another file
    os.utime(copy, ns=(0, 0))
    gguf_parse.reader(str(copy))
    assert len(opened) == 2, opened


def test_bad_gguf_files_fail_clearly(gguf_file, tmp_path):
    _, path, _ = gguf_file
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(gguf_io.GGUFError, match="truncated.gguf: "):
        hf_io.load_hf(str(truncated), *_cfg_and_type(path))
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(gguf_io.GGUFError, match="weights.gguf: not a GGUF file"):
        hf_io.read_hf_config(str(not_gguf))

    other = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(other), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(gguf_io.GGUFError, match="architecture 'falcon' is not supported; supported: llama"):
        hf_io.read_hf_config(str(other))

    iq = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(iq), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 136), np.uint8), raw_dtype=Q.IQ4_XS)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(gguf_io.GGUFError, match="type IQ4_XS, which is not supported; supported: F32"):
        hf_io.read_hf_config(str(iq))


def _cfg_and_type(path):
    raw = hf_io.read_hf_config(path)
    return hf_io.model_config_from_hf(raw), raw["model_type"]


def test_cli_reports_a_truncated_gguf_in_one_line(gguf_file, tmp_path):
    _, path, _ = gguf_file
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(open(path, "rb").read()[:5000])
    r = subprocess.run([sys.executable, "-m", "trainer.train", "--config", "configs/tiny.py",
                        "--workdir", str(tmp_path / "wd"), f"--gguf={bad}", "--config.tokenizer.kind=hf"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cut.gguf" in errors[0], r.stderr[-2000:]


@pytest.mark.slow
def test_fine_tune_from_gguf_then_export_for_transformers(gguf_file, tmp_path):
    """--gguf end to end: the file's tokenizer is saved in the workdir, the base rows of the eval use the
    GGUF weights, and the export is a plain HF directory that transformers loads with our logits."""
    from tests.hf_run_test import logits_both, ours_from_checkpoint  # noqa: PLC0415
    arch, path, _ = gguf_file
    wd, out = str(tmp_path / "run"), str(tmp_path / "export")
    r = subprocess.run([sys.executable, "-m", "trainer.train", "--config", "configs/tiny.py", "--workdir", wd,
                        f"--gguf={path}", "--config.tokenizer.kind=hf"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(os.path.join(wd, "tokenizer", "tokenizer.json"))
    r = subprocess.run([sys.executable, "-m", "trainer.eval", "--workdir", wd, "--checkpoint", "latest"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"| base ({os.path.basename(path)}) | zero-shot |" in r.stdout, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "trainer.export", "--workdir", wd, "--out", out, "--checkpoint",
                        "latest"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == arch
    spec, params = ours_from_checkpoint(wd)
    ours_l, ref = logits_both(spec, params, out)
    np.testing.assert_allclose(ours_l, ref, atol=1e-4, rtol=0)
    if arch == "llama":  # the GGUF itself, evaluated with no run: its tokenizer, a data file
        data = os.path.join(str(tmp_path), "rows.jsonl")
        with open(data, "w") as f:
            for i in range(60):
                f.write(json.dumps({"prompt": f"Add {i} and 1.", "completion": str(i + 1)}) + "\n")
        report_dir = os.path.join(str(tmp_path), "report")
        r = subprocess.run([sys.executable, "-m", "trainer.eval", f"--gguf={path}", f"--data={data}",
                            "--split=train", "--baselines=zero_shot", "--max_new_tokens=3", "--limit=6",
                            f"--out={report_dir}", "--noprogress"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"| {os.path.basename(path)} | zero-shot |" in r.stdout
        assert len(open(os.path.join(report_dir, "predictions.jsonl")).readlines()) == 6
