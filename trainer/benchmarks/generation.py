r"""Generation speed: our batched KV-cache decoding against ``transformers.generate`` on the same model and
prompts (the CLI is ``trainer.bench_generate``).

Both sides decode greedily in float32 with a KV cache, generate exactly ``new_tokens`` per row (no
early EOS stop, so the work is equal), and get the same rows in the same batches: the prompts sorted
by length (what ``generate_all`` does in every eval), each batch left-padded -- to its longest prompt
for transformers, to our bucket (16 x a power of two, at least as long) for ours, which runs a batch in
row streams where ``trainer.eval`` would (``row_streams``). Ours is timed after its shapes are
compiled; transformers after a warm-up batch. Tokens are compared row by row.

The model is a random-weight Llama of the demo's shape or SmolLM2-135M's (``--model``), or any HF
directory (``--hf_path``); torch is a benchmark-time reference only.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np

from trainer.benchmarks.reference_process import ReferenceProcess, serve_requests
from trainer.benchmarks.timing import host_cpu, timed_rounds
from trainer.errors import UserError
from trainer.evaluation.generate import generate_all, make_generate_fn, row_streams
from trainer.io import hf as hf_io

SHAPES = {  # LlamaConfig kwargs
    "demo": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                 max_position_embeddings=4096),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5),
}


def _torch_model(model: str, hf_path: str, save_to: str):
    """The reference model: ``hf_path``'s, or a random-weight one of ``model``'s shape saved to
    ``save_to`` (for ours to load). Returns it and its directory."""
    import torch  # noqa: PLC0415 (benchmark-time reference only)
    import transformers  # noqa: PLC0415
    if hf_path:
        return transformers.AutoModelForCausalLM.from_pretrained(
            hf_path, torch_dtype=torch.float32).eval(), hf_path
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPES[model])).eval()
    hf.save_pretrained(save_to)
    return hf, save_to


def _torch_generate(hf, prompts: list[list[int]], batch: int, new_tokens: int) -> tuple[float, list[list[int]]]:
    """Seconds for ``transformers.generate`` over ``prompts`` in our batches (sorted by length), each
    left-padded to its longest prompt, after a warm-up batch; and each row's new tokens."""
    import torch  # noqa: PLC0415
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches_t = []
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = np.zeros((len(idx), width), np.int64)
        mask = np.zeros((len(idx), width), np.int64)
        for j, i in enumerate(idx):
            ids[j, width - len(prompts[i]):] = prompts[i]
            mask[j, width - len(prompts[i]):] = 1
        batches_t.append((idx, torch.from_numpy(ids), torch.from_numpy(mask)))
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True)
    with torch.inference_mode():
        hf.generate(input_ids=batches_t[0][1], attention_mask=batches_t[0][2], max_new_tokens=2,
                    min_new_tokens=2, **kw)  # warm-up
        ref: list[list[int]] = [[] for _ in prompts]
        t0 = time.perf_counter()
        for idx, ids, mask in batches_t:
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, **kw)[:, ids.shape[1]:].numpy()
            for i, r in zip(idx, out):
                ref[i] = r.tolist()
        return time.perf_counter() - t0, ref


class TransformersProcess:
    """``transformers.generate`` in a child process of its own, with glibc's malloc settings: as it
    runs on its own (in ours' process it shared one heap and one malloc arena with ours; see
    ``trainer/benchmarks/torch_reference.py``). ``first["path"]``: the model's directory
    (``hf_path``, or ``save_to`` where the random-weight model is saved), which ours loads too."""

    def __init__(self, model: str, hf_path: str, threads: int, save_to: str):
        self._proc = ReferenceProcess("trainer.benchmarks.generation", keep_freed_memory=False)
        self.first = self._proc.ask({"model": model, "hf_path": hf_path, "threads": threads,
                                     "save_to": save_to})

    def generate(self, prompts: list[np.ndarray], batch: int, new_tokens: int) -> tuple[float, list[list[int]]]:
        answer = self._proc.ask({"prompts": [p.tolist() for p in prompts], "batch": batch,
                                 "new_tokens": new_tokens})
        return answer["seconds"], answer["tokens"]

    def close(self) -> None:
        self._proc.close()


def bench(model: str = "demo", hf_path: str = "", batches: tuple[int, ...] = (1, 8, 32),
          prompt_len: int = 64, new_tokens: int = 32, num_batches: int = 2, threads: int = 0,
          seed: int = 0, rounds: int = 1, split: bool = False) -> list[dict[str, Any]]:
    """One row per batch size. ``rounds``: each side generates for the same prompts this many times,
    the sides taking turns in alternating order (``timing.timed_rounds``); tokens/s are the medians
    of the rounds, the ratio the median of the rounds' ratios, the tokens compared those of the
    first round. ``split``: each side also generates one token per row in the same rounds, which
    splits its time into the prompt's prefill and the decode steps after it (``_split``)."""
    if split and new_tokens < 2:
        raise UserError("--split needs --new_tokens of 2 or more (a decode step is what a token after the "
                        "first adds)")
    # The random-weight model's files live as long as the benchmark: each run left SmolLM2's 514 MB
    # in the temp directory.
    with tempfile.TemporaryDirectory(prefix=f"bench_generate_{model}_") as save_to:
        ref_proc = TransformersProcess(model, hf_path, threads, save_to)
        try:
            return _bench(ref_proc, model, hf_path, batches, prompt_len, new_tokens, num_batches, seed,
                          rounds, split)
        finally:
            ref_proc.close()


def _bench(ref_proc: TransformersProcess, model: str, hf_path: str, batches: tuple[int, ...], prompt_len: int,
           new_tokens: int, num_batches: int, seed: int, rounds: int, split: bool) -> list[dict[str, Any]]:
    graphdef, params, cfg = hf_io.load_model(ref_proc.first["path"])
    vocab = cfg.vocab_size
    name = os.path.basename(os.path.normpath(hf_path)) if hf_path else f"{model} shape (random weights)"
    gen = make_generate_fn(graphdef, max_new_tokens=new_tokens, eos_ids=[-1], pad_id=0)
    gen_one = make_generate_fn(graphdef, max_new_tokens=1, eos_ids=[-1], pad_id=0) if split else None
    cpu = host_cpu()
    print(f"host CPU: {cpu}", flush=True)
    rows = []
    for b in batches:
        rng = np.random.default_rng(seed)
        prompts = [rng.integers(3, vocab, int(rng.integers(max(1, prompt_len // 2), prompt_len + 1))
                               ).astype(np.int32) for _ in range(b * num_batches)]
        streams = row_streams(b)  # as trainer.eval runs its batches

        def run(g=gen):
            return generate_all(g, params, prompts, batch_size=b, pad_id=0, eos_ids=[-1], streams=streams)
        run()  # compiles every bucket shape
        t0 = time.perf_counter()
        ours = run()
        t_ours = time.perf_counter() - t0
        t_torch, ref = ref_proc.generate(prompts, b, new_tokens)
        sides = {"ours": (t_ours, lambda: _seconds(run)),
                 "torch": (t_torch, lambda: ref_proc.generate(prompts, b, new_tokens)[0])}
        if split:
            run(gen_one)  # compiles
            ours_one = lambda: _seconds(lambda: run(gen_one))  # noqa: E731
            torch_one = lambda: ref_proc.generate(prompts, b, 1)[0]  # noqa: E731
            sides |= {"ours_one_token": (ours_one(), ours_one), "torch_one_token": (torch_one(), torch_one)}
        seconds = timed_rounds(sides, rounds)
        ours_s, torch_s = np.asarray(seconds["ours"]), np.asarray(seconds["torch"])
        tokens = len(prompts) * new_tokens
        row = {"model": name, "batch": b, "streams": streams, "rows": len(prompts), "prompt_len": prompt_len,
               "new_tokens": new_tokens, "ours_tokens_per_s": tokens / float(np.median(ours_s)),
               "torch_tokens_per_s": tokens / float(np.median(torch_s)),
               "ratio": float(np.median(torch_s / ours_s)), "rounds": rounds,
               "seconds_per_round": {k: list(v) for k, v in seconds.items()},
               "identical_rows": sum(list(o) == r for o, r in zip(ours, ref)),
               "torch_threads": ref_proc.first["threads"], "cpu": cpu}
        rows.append(row)
        print(f"{name}: batch {b:>3} in {streams} row stream{'s' if streams > 1 else ''}, {row['rows']} prompts of "
              f"{prompt_len // 2}-{prompt_len} tokens, "
              f"{new_tokens} new tokens each: ours {row['ours_tokens_per_s']:8.1f} tokens/s, "
              f"transformers {row['torch_tokens_per_s']:8.1f} tokens/s, ratio {row['ratio']:.2f}x, "
              f"identical tokens in {row['identical_rows']}/{row['rows']} rows"
              + (f" (medians of {rounds} rounds)" if rounds > 1 else ""), flush=True)
        if split:
            row["split"] = _split(seconds, num_batches, new_tokens)
            _print_split(row["split"])
    return rows


def _split(seconds: dict[str, list[float]], num_batches: int, new_tokens: int) -> dict[str, Any]:
    """Each side's time for one batch split into the prefill (the prompt, and the first token from
    it: the ``*_one_token`` runs) and one decode step (what each further token adds), from the
    rounds' medians; and the decode step ours would need, after its prefill as measured, to take half
    the reference's time for the whole batch."""
    med = {k: float(np.median(v)) / num_batches for k, v in seconds.items()}
    steps = new_tokens - 1
    out: dict[str, Any] = {}
    for side in ("ours", "torch"):
        out[side] = {"prefill_s": med[f"{side}_one_token"],
                     "decode_step_ms": 1e3 * (med[side] - med[f"{side}_one_token"]) / steps}
    out["decode_step_ms_for_2x"] = 1e3 * (med["torch"] / 2 - out["ours"]["prefill_s"]) / steps
    return out


def _print_split(split: dict[str, Any]) -> None:
    ours, torch_ = split["ours"], split["torch"]
    print(f"  a batch's prefill and first token: ours {ours['prefill_s']:.3f} s, transformers "
          f"{torch_['prefill_s']:.3f} s; each further token: ours {ours['decode_step_ms']:.1f} ms, "
          f"transformers {torch_['decode_step_ms']:.1f} ms a step; 2x transformers' batch would need "
          f"{split['decode_step_ms_for_2x']:.1f} ms a step after ours' prefill", flush=True)


def _seconds(run) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def main() -> None:
    """The reference's process: builds (or loads) the model, then answers each batch of prompts."""
    def serve():
        spec = yield
        import torch  # noqa: PLC0415 (after serve_requests' malloc settings)
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        hf, path = _torch_model(spec["model"], spec["hf_path"], spec["save_to"])
        request = yield {"path": path, "threads": torch.get_num_threads()}
        while True:
            seconds, tokens = _torch_generate(hf, request["prompts"], request["batch"], request["new_tokens"])
            request = yield {"seconds": seconds, "tokens": tokens}

    serve_requests(serve())


if __name__ == "__main__":
    main()
