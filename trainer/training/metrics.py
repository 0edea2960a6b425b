"""Metrics: token-weighted aggregation, JSONL + TensorBoard writers, and a progress bar."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from trainer.imports import import_without
from trainer.io import paths


def summarize(sums: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Combines per-step ``{loss_sum, tokens, correct}`` into token-weighted means.

    ``loss = sum(loss_sum) / sum(tokens)`` -- not the mean of per-step means, which would overweight
    steps with few supervised tokens. With no supervised token at all only ``tokens`` (0) is returned.
    """
    sums = jax.device_get(list(sums))
    sums = [s for s in sums if not s.get("skipped", 0)]  # steps the non-finite guard skipped
    tot = {k: float(np.sum([s[k] for s in sums])) for k in ("loss_sum", "tokens", "correct")}
    if tot["tokens"] == 0:  # no supervised token: there is no loss, and 0.0 would be a lie
        return {"tokens": 0.0}
    return {"loss": tot["loss_sum"] / tot["tokens"], "token_accuracy": tot["correct"] / tot["tokens"],
            "tokens": tot["tokens"]}


class MetricWriter:
    """Appends ``{"step": N, ...}`` lines to ``workdir/metrics.jsonl`` and writes TensorBoard events.

    Only process 0 writes; other processes get a no-op writer. A remote (``gs://``) workdir cannot be
    appended to: both are written to a local mirror and uploaded whole by ``sync`` (the loop calls it
    at each checkpoint) and ``close``.
    """

    def __init__(self, workdir: str, enabled: bool = True, resumed_at: int | None = None):
        """``resumed_at``: the restored checkpoint's step. Rows logged after it by the run that
        crashed or was preempted are dropped from ``metrics.jsonl`` and purged from TensorBoard, so
        every step appears once."""
        from trainer.io import paths  # noqa: PLC0415
        self.enabled = enabled and jax.process_index() == 0
        self._tb = None
        self.dropped = 0
        self.workdir = workdir
        if self.enabled:
            local = paths.fresh_local_dir(workdir)  # the workdir itself when it is local
            self.local = local
            os.makedirs(local, exist_ok=True)
            remote_jsonl = paths.join(workdir, "metrics.jsonl")
            if paths.is_remote(workdir) and paths.exists(remote_jsonl):
                with open(os.path.join(local, "metrics.jsonl"), "w") as f:
                    f.write(paths.read_text(remote_jsonl))
            if resumed_at is not None:
                from trainer.training.rundir import truncate_metrics  # noqa: PLC0415
                self.dropped = truncate_metrics(local, resumed_at)
            self._jsonl = open(os.path.join(local, "metrics.jsonl"), "a", buffering=1)
            # imported lazily (process 0 only), without torch or GCS' client: trainer.imports
            SummaryWriter = import_without("tensorboardX", "torch", "google.cloud.storage").SummaryWriter
            self._tb = SummaryWriter(os.path.join(local, "tensorboard"),
                                     purge_step=None if resumed_at is None else resumed_at + 1)

    def sync(self) -> None:
        """A remote workdir: uploads ``metrics.jsonl`` and the TensorBoard events written so far."""
        from trainer.io import paths  # noqa: PLC0415
        if not self.enabled or not paths.is_remote(self.workdir):
            return
        self._jsonl.flush()
        self._tb.flush()
        paths.upload_dir(self.local, self.workdir)

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        finite = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}  # JSON has no NaN
        row = {"step": int(step), "time": time.time(), **{f"{prefix}{k}": v for k, v in finite.items()}}
        from trainer.errors import UserError  # noqa: PLC0415
        try:
            self._jsonl.write(json.dumps(row) + "\n")
        except OSError as e:  # a full disk, a vanished mount: one line, not a traceback
            raise UserError(f"cannot write the metrics of step {step} to {self._jsonl.name}: {e} (free "
                            f"space there: {paths.free_space(self._jsonl.name)})") from None
        if not self._tb_alive():
            # tensorboardX writes from a thread through a bounded queue: once that thread has died (a
            # full disk), add_scalar would block forever when the queue fills.
            raise UserError(f"cannot write TensorBoard events for step {step} under "
                            f"{os.path.dirname(self._jsonl.name)}/tensorboard: its writer thread "
                            "stopped (a full disk? free space there: "
                            f"{paths.free_space(self._jsonl.name)})")
        for k, v in finite.items():
            self._tb.add_scalar(f"{prefix}{k}", v, int(step))

    def _tb_alive(self) -> bool:
        try:
            return self._tb._get_file_writer().event_writer._worker.is_alive()  # noqa: SLF001
        except AttributeError:  # another tensorboardX layout: assume alive
            return True

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tb_alive():  # a remote workdir's last upload (a dead writer thread would block it)
            self.sync()
        try:
            self._jsonl.close()
        except OSError:
            pass
        # tensorboardX flushes from a background thread; if that thread died (a full disk), close()
        # would wait for it forever. Give it a few seconds, then let it go.
        if not self._tb_alive():
            return  # close() would wait for the dead thread's queue forever
        closer = threading.Thread(target=self._tb.close, daemon=True)
        closer.start()
        closer.join(timeout=10)


class Progress:
    """A tqdm bar over steps, showing loss and tokens/s; ETA comes from tqdm's rate."""

    def __init__(self, total: int, initial: int, enabled: bool, **tqdm_kwargs: Any):
        self.bar = None
        if enabled and jax.process_index() == 0:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            smoothing=0.1, **tqdm_kwargs)

    def update(self, n: int, **postfix: Any) -> None:
        """Advances ``n`` steps and shows ``postfix`` (this interval's loss, tokens/s) in the same
        redraw: the postfix is set first, so the bar never shows the previous interval's numbers."""
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        elif jax.process_index() == 0:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
