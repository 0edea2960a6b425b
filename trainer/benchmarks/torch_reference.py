r"""``trainer.bench``'s PyTorch reference, in a process of its own that takes turns with ours.

The reference is the transformers model with ``torch.optim.AdamW``, trained on the same batches
(``batches``: the same seed, so both processes build the same arrays). It used to run in the bench's
own process, under glibc's malloc settings for its turns (``host_memory.glibc_defaults``). But a
process has one heap, and a CPU run of ours keeps its freed pages there (``trainer.host_memory``):

- with glibc's trimming on, PyTorch's frees trimmed the pages ours keeps, and ours ran 9,500-17,500
  tokens/s over the rounds of one run at the demo shape (15,700-17,000 alone);
- with it off, PyTorch was spared its own trims and ran faster than it does on its own: 4,914 tokens/s
  at vocabulary 32,000, against 2,989 in a process with glibc's settings throughout.

In a process of its own (``reference_process``) each side keeps its own heap and its own settings.
The sides still take turns on the same minutes (``timing.timed_rounds``): the bench asks for a
timing, the reference runs its steps and answers, and the bench's process waits on the pipe, idle.

Imports neither JAX nor any model code of ours (``python -m trainer.benchmarks.torch_reference`` is
the reference's process).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from trainer import host_memory
from trainer.benchmarks.reference_process import ReferenceProcess, serve_requests


def batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` full-length random batches (``inputs``/``targets``: ``[batch, seq] int32``)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(3, vocab, (batch, seq + 1)).astype(np.int32)
        out.append({"inputs": ids[:, :-1], "targets": ids[:, 1:],
                    "weights": np.ones((batch, seq), np.float32),
                    "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
                    "segment_ids": np.ones((batch, seq), np.int32)})
    return out


def bench_torch(hf_config: dict[str, Any], data: list[dict[str, np.ndarray]], warmup: int,
                lr: float, dtype: str = "float32") -> dict[str, Any] | None:
    """The transformers model, built in ``dtype`` -- the run's compute dtype, never the checkpoint's
    ``torch_dtype`` (SmolLM2's config says bfloat16: a bf16 reference on a CPU is slow, and the "win"
    against it was not real). Seconds for ``data[warmup:]``; ``timed`` times them again."""
    try:
        import torch  # noqa: PLC0415 (test-time/benchmark reference only)
        import transformers  # noqa: PLC0415
    except ImportError:
        return None
    cfg = transformers.AutoConfig.for_model(**hf_config)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model = model.to(getattr(torch, dtype))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(b):
        logits = model(input_ids=torch.from_numpy(b["inputs"]).long()).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                 torch.from_numpy(b["targets"]).long().flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for b in data[:warmup]:
        step(b)
    last = {}

    def timed() -> float:
        host_memory.settle(lambda: step(data[0]))  # untimed (``timing.timed_rounds``)
        t0 = time.perf_counter()
        for b in data[warmup:]:
            last["loss"] = step(b)
        return time.perf_counter() - t0

    seconds = timed()
    return {"seconds": seconds, "timed": timed, "loss": float(last["loss"]), "threads": torch.get_num_threads(),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


class TorchProcess:
    """``bench_torch`` in a child process (``reference_process``). ``first`` is its answer after the
    warm-up and the first timing (None where torch is not installed); ``timed()`` times the same steps
    again there. ``keep_freed_memory``: the child applies ours' malloc settings (``trainer.host_memory``)
    rather than glibc's, to show what they do for PyTorch too."""

    def __init__(self, hf_config: dict[str, Any], shape: tuple[int, int, int, int], warmup: int, lr: float,
                 dtype: str, keep_freed_memory: bool):
        self._proc = ReferenceProcess("trainer.benchmarks.torch_reference", keep_freed_memory)
        self.first: dict[str, Any] | None = self._proc.ask(
            {"hf_config": hf_config, "shape": shape, "warmup": warmup, "lr": lr, "dtype": dtype})

    def timed(self) -> float:
        return float(self._proc.ask("time")["seconds"])

    def close(self) -> None:
        self._proc.close()


def main() -> None:
    def serve():
        spec = yield
        ref = bench_torch(spec["hf_config"], batches(*spec["shape"]), spec["warmup"], spec["lr"], spec["dtype"])
        if ref is None:
            yield None
            return
        yield {**{k: v for k, v in ref.items() if k != "timed"}, "pid": os.getpid(),
               "kept_memory": host_memory.applied()}
        while True:
            yield {"seconds": ref["timed"]()}

    serve_requests(serve())


if __name__ == "__main__":
    main()
