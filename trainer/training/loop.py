"""The training loop: ``train(config, workdir, evaluators=...)`` (the CLI is ``trainer.train``).

Resumes from the newest checkpoint that restores when ``workdir`` already has one. Fault tolerance:
one run per workdir (``rundir.RunLock``); SIGTERM/SIGINT finish the step, checkpoint it and exit
(``preemption``); the async save in flight is always waited for; a failed save stops the run in one
line; non-finite steps are skipped inside the step and a run of ``train.max_bad_steps`` of them stops
training; a resumed run's logs hold every step once.

The shape, as in big_vision's ``train.py``: ``Trainer.create`` builds everything once -- mesh, data,
model, the jitted step, the evaluators as ``(name, evaluate, every)``, the checkpointer -- and
``Trainer.loop`` is the loop body as named steps: train a step, log the interval, evaluate what is
due, checkpoint, stop when asked. What is evaluated comes from the caller (``evaluators``: for a
run, ``trainer.evaluation.in_training.scheduled_evals``), so this package never imports evaluation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from data_pipeline import loader
from trainer import console
from trainer import sharding as sharding_lib
from trainer.errors import UserError
from trainer.io.checkpoint import Checkpointer
from trainer.models.flops import flops_per_token, peak_flops
from trainer.settings.spec import RunSpec
from trainer.training import experiment, modeling, rundir
from trainer.training import metrics as metrics_lib
from trainer.training.preemption import Preempted, StopRequests
from trainer.training.rundir import RunLock
from trainer.training.step import TrainState, make_optimizer


def train(config: RunSpec, workdir: str, *, evaluators: EvalsFactory, stop_at: int | None = None
          ) -> TrainState:
    """Trains (or resumes) the run in ``workdir``; returns the final state.

    Args:
      config: the run spec (``RunSpec.from_config`` of a preset and its overrides).
      workdir: run directory; resumed from its latest checkpoint if it has one.
      evaluators: builds the run's ``ScheduledEval``s once the model and data exist
        (``trainer.evaluation.in_training.scheduled_evals``, what ``trainer.train`` passes).
      stop_at: stop after this step, checkpointing it, as a preempted job would; the LR schedule
        still spans ``train.num_steps``, so a later call resumes the same run.
    """
    experiment.validate_config(config)
    lock = RunLock(workdir, enabled=jax.process_index() == 0)
    if warning := lock.acquire():
        console.log(warning)
    try:
        with StopRequests() as stops:
            trainer = Trainer.create(config, workdir, evaluators)
            try:
                start, state = trainer.restore_or_init()
                if start >= config.train.num_steps:
                    console.log(f"already trained to step {start} (train.num_steps="
                                f"{config.train.num_steps}); nothing to do")
                    return state
                last = min(config.train.num_steps, stop_at or config.train.num_steps)
                return trainer.loop(state, start, last, stops)
            finally:
                trainer.close()
    finally:
        lock.release()


@dataclasses.dataclass
class ScheduledEval:
    """An evaluator the loop calls on its schedule: every ``every`` steps (0: never on a schedule) and,
    with ``at_checkpoints``, at every checkpoint. Its metrics are logged as ``val/<key>``."""

    name: str
    evaluate: Callable[[Any], dict[str, float]]   # params -> metrics
    every: int
    at_checkpoints: bool
    describe: Callable[[int, dict[str, float]], str]  # the progress line

    def due(self, step: int, is_checkpoint: bool) -> bool:
        return bool(self.every and step % self.every == 0) or (is_checkpoint and self.at_checkpoints)


# (config, spec, tokenizer, rows by split, tokenised data, batch sharding) -> the evaluators
EvalsFactory = Callable[[RunSpec, modeling.ModelSpec, Any, dict, Any, Any], list[ScheduledEval]]


@dataclasses.dataclass
class Trainer:
    """Everything one training run needs, built once by ``create``."""

    config: RunSpec
    workdir: str
    old_num_steps: int | None          # train.num_steps of a resumed run, when it changed
    train_iter: Any                     # grain iterator with get_state/set_state
    batch_sh: Any
    spec: modeling.ModelSpec
    tx: Any
    schedule: Any
    state_sh: TrainState
    abstract: TrainState                # the state's shapes, dtypes and shardings (state_sh)
    train_step: experiment.CompiledAhead
    evals: list[ScheduledEval]
    ckpt: Checkpointer
    num_params: int
    writer: metrics_lib.MetricWriter | None = None

    @classmethod
    def create(cls, config: RunSpec, workdir: str, evaluators: EvalsFactory) -> Trainer:
        old_num_steps = rundir.save_or_check_config(config, workdir)
        mesh = modeling.make_mesh(config)
        batch_sh = sharding_lib.batch_sharding(mesh, modeling.rules(config))
        console.log(f"mesh {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} devices "
                    f"({jax.process_count()} process(es))")
        rows, tok, data, train_iter = _data(config, workdir, batch_sh)
        spec = modeling.model_spec(config, len(tok), mesh)
        tx, schedule = make_optimizer(config.optimizer, config.train.num_steps)
        state_sh = experiment.state_shardings(spec, tx)
        num_params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(spec.init_params_fn(0))))
        console.log(f"model: {num_params / 1e6:.2f}M parameters, vocab {len(tok)}")
        chunk = experiment.loss_chunk_tokens(config, batch_sh)
        train_step = experiment.jit_train_step(spec, tx, schedule, config.train.grad_accum_steps, state_sh,
                                               batch_sh, chunk, config.seed)
        evals = evaluators(config, spec, tok, rows, data, batch_sh)
        ckpt = Checkpointer.for_run(config, workdir, base=modeling.base_identity(spec, config.seed))
        abstract = experiment.abstract_state(spec, tx, state_sh)
        # compiled while restore_or_init reads or makes the state (started last: close() waits for it),
        # unless the newest checkpoint already holds the last step
        train_step = experiment.compile_train_step_ahead(
            train_step, abstract, config.train.batch_size, config.data.max_length, batch_sh,
            start=(ckpt.latest_step() or 0) < config.train.num_steps)
        return cls(config, workdir, old_num_steps, train_iter, batch_sh, spec, tx, schedule, state_sh,
                   abstract, train_step, evals, ckpt, num_params)

    # ---- start ---------------------------------------------------------------------------------
    def restore_or_init(self) -> tuple[int, TrainState]:
        """The newest checkpoint that restores (and the data position with it), else step 0."""
        config, spec, abstract = self.config, self.spec, self.abstract
        params0 = None
        if spec.lora.enabled:  # a resume needs the frozen base too: read it once, here
            params0 = spec.init_params(config.seed)
            abstract = abstract.replace(frozen=spec.split(params0)[1])
            n_train = sum(x.size for x in jax.tree.leaves(abstract.params))
            console.log(f"LoRA rank {spec.lora.rank} on {','.join(spec.lora.targets)}: "
                        f"{n_train / 1e6:.3f}M trainable parameters "
                        f"({100 * n_train / self.num_params:.2f}% of the model); base frozen in "
                        f"{spec.lora.base_quant or spec.lora.base_dtype or spec.cfg.param_dtype}")
        restored = self.ckpt.restore_latest(abstract)
        if restored is None:
            return 0, experiment.init_train_state(spec, self.tx, config.seed, self.state_sh, params0)
        start, state, data_state = restored
        if data_state:
            self.train_iter.set_state(data_state)
        console.log(f"resumed from the checkpoint at step {start}")
        if self.old_num_steps is not None:
            _, old_schedule = make_optimizer(config.optimizer, self.old_num_steps)
            console.log(
                f"train.num_steps {self.old_num_steps} -> {config.train.num_steps} (allow_num_steps_change): "
                f"the warmup + cosine schedule now spans the new length; at step {start} the learning "
                f"rate goes from {float(old_schedule(start)):.3g} to {float(self.schedule(start)):.3g}")
        return start, state

    # ---- the loop ------------------------------------------------------------------------------
    def loop(self, state: TrainState, start: int, last_step: int, stops: StopRequests) -> TrainState:
        """Steps ``start + 1 .. last_step``: each trains, then logs, evaluates, checkpoints and stops
        as its schedule (or a stop request) says."""
        tcfg = self.config.train
        # Rows past the restored step (or any row, when no checkpoint survived) were logged by an
        # interrupted run whose steps are trained again: dropped, so every step appears once.
        self.writer = metrics_lib.MetricWriter(self.workdir, resumed_at=start)
        if self.writer.dropped:
            console.log(f"metrics.jsonl: dropped {self.writer.dropped} rows logged after step {start} "
                        "by the interrupted run (those steps are trained again)")
        interval = TrainLog(self.config, self.spec, self.writer,
                            metrics_lib.Progress(tcfg.num_steps, start, tcfg.progress_bar),
                            sharding_lib.process_rows(self.batch_sh)[1])
        saved_step = start
        for step in range(start + 1, last_step + 1):
            local = next(self.train_iter)
            state, m = self.train_step(state, experiment.global_batch(local, self.batch_sh))
            interval.add(m, local)
            self.ckpt.check_async_error(saved_step)  # a failed async save stops the run here, in one line
            stop = stops.stop_requested(step)
            is_ckpt = step % tcfg.checkpoint_every == 0 or step == last_step or stop is not None
            if step % tcfg.log_every == 0 or is_ckpt:
                interval.flush(step, saved_step)
            if stop is not None:  # a preemption notice leaves seconds: checkpoint now, evaluate later
                self.save(step, state, metrics=None)
                self.stop(step, stop, interval)
            val = self.evaluate(step, state, is_ckpt, interval)
            if is_ckpt and self.checkpoint(step, state, val, interval):
                saved_step = step
        interval.progress.close()
        return state

    def evaluate(self, step: int, state: TrainState, is_ckpt: bool, interval: TrainLog) -> dict[str, float]:
        """Runs the evaluators due at ``step``; returns their metrics (keys without ``val/``)."""
        val: dict[str, float] = {}
        for ev in self.evals:
            if ev.due(step, is_ckpt):
                out = ev.evaluate(state.model_params)
                self.writer.write(step, out, prefix="val/")
                interval.progress.write(ev.describe(step, out))
                val.update(out)
        if val:
            interval.restart_clock()  # evaluation time is not training throughput
        return val

    def checkpoint(self, step: int, state: TrainState, val: dict[str, float], interval: TrainLog) -> bool:
        """Saves ``step`` with its finite metrics; False (and a warning) when its validation loss is
        not finite: a checkpoint never carries one (the previous ones stay)."""
        if not np.isfinite(val.get("loss", np.nan)):
            interval.progress.write(f"warning: step {step}: validation loss {val.get('loss')} is not "
                                    "finite; no checkpoint written at this step")
            return False
        # Only finite metrics are kept: a NaN must never rank as the best checkpoint.
        self.save(step, state, metrics={f"val/{k}": float(v) for k, v in val.items() if np.isfinite(v)})
        return True

    def save(self, step: int, state: TrainState, metrics: dict[str, float] | None) -> None:
        try:
            self.ckpt.save(step, state, self.train_iter.get_state(), metrics=metrics)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 -- the previous async save's error, or this one's
            raise self.ckpt.save_error(step, e) from None
        self.writer.sync()  # a remote workdir's metrics, up to this checkpoint

    def stop(self, step: int, reason: str, interval: TrainLog) -> None:
        """Waits until the checkpoint of ``step`` is committed on every host, then leaves."""
        try:
            self.ckpt.wait()
        except Exception as e:  # noqa: BLE001
            raise self.ckpt.save_error(step, e) from None
        interval.progress.close()
        console.log(f"{reason}: stopped after step {step}; its checkpoint is saved in "
                    f"{self.ckpt.directory}/{step}. Rerun the same command to resume.")
        raise Preempted(reason, step)

    def close(self) -> None:
        """Whatever ends the run -- the last step, a preemption, an exception -- the in-flight async
        save is waited for (never abandoned half-written), then everything is closed."""
        # A run that ends before its first step (an error reading or making the state) still
        # waits for the step's ahead compile: at exit jax tears its backend down, which a compiler
        # still at work on another thread would be using.
        self.train_step.wait()
        try:
            self.ckpt.wait()
        except Exception as e:  # noqa: BLE001 -- reported; an exception already on its way goes on
            console.log(f"warning: {self.ckpt.save_error(None, e)}")
        self.ckpt.close()
        if self.writer is not None:
            self.writer.close()


class TrainLog:
    """The logging interval: the steps' metrics pending on the device, fetched together every
    ``train.log_every`` steps (one host sync per interval, not per step), summarised token-weighted,
    written as ``train/*`` with tokens/s and MFU, and checked for a run of skipped (non-finite) steps."""

    def __init__(self, config: RunSpec, spec: modeling.ModelSpec, writer, progress, row_blocks: int = 1):
        self.writer, self.progress = writer, progress
        self.row_blocks = row_blocks  # distinct blocks of rows the processes feed (process_rows)
        self.max_bad = config.train.max_bad_steps
        self.flops_token = flops_per_token(spec.cfg, config.data.max_length)
        self.peak = peak_flops(jax.devices()[0])
        self.pending: list[dict[str, Any]] = []
        self.real_tokens, self.bad_run = 0, 0  # bad_run: consecutive steps the guard skipped
        self.t_last = time.perf_counter()

    def add(self, m: dict[str, Any], local: dict[str, np.ndarray]) -> None:
        self.pending.append(m)
        self.real_tokens += int(np.count_nonzero(local["segment_ids"])) * self.row_blocks

    def restart_clock(self) -> None:
        self.t_last = time.perf_counter()

    def flush(self, step: int, saved_step: int) -> None:
        fetched = jax.device_get(self.pending)  # blocks until these steps are done
        diverged_at = self._diverged_at(step, fetched)
        dt = time.perf_counter() - self.t_last
        row = self._row(fetched, dt)
        self.writer.write(step, row, prefix="train/")
        self.progress.update(len(self.pending), loss=f"{row.get('loss', float('nan')):.4f}",
                             tok_s=f"{row['tokens_per_s']:.0f}",
                             **({"mfu": f"{100 * row['mfu']:.1f}%"} if self.peak else {}),
                             **({"skipped": int(row["skipped_steps"])} if row["skipped_steps"] else {}))
        self.pending, self.real_tokens, self.t_last = [], 0, time.perf_counter()
        if diverged_at is not None:
            raise UserError(
                f"training diverged: {self.max_bad} steps in a row up to step {diverged_at} had a "
                "non-finite loss or gradient norm and were skipped (params unchanged); the "
                f"last checkpoint is step {saved_step}. Lower optimizer.learning_rate or check "
                "the data (train.max_bad_steps sets the limit)")

    def _diverged_at(self, step: int, fetched: list[dict[str, Any]]) -> int | None:
        diverged_at = None
        for i, f in enumerate(fetched):
            self.bad_run = self.bad_run + 1 if f["skipped"] else 0
            if self.bad_run >= self.max_bad and diverged_at is None:
                diverged_at = step - len(fetched) + 1 + i
        return diverged_at

    def _row(self, fetched: list[dict[str, Any]], dt: float) -> dict[str, float]:
        summary = metrics_lib.summarize(fetched)
        last = fetched[-1]
        row = {"grad_norm": float(last["grad_norm"]), "learning_rate": float(last["learning_rate"]),
               "tokens_per_s": self.real_tokens / dt, "supervised_tokens_per_s": summary["tokens"] / dt,
               "skipped_steps": float(sum(f["skipped"] for f in fetched))}
        if "loss" in summary:
            row.update(loss=summary["loss"], token_accuracy=summary["token_accuracy"])
        # Model FLOP/s on real (non-padding) tokens, per device, and MFU where the peak is known:
        # the formula of trainer.bench (trainer.models.flops).
        row["model_tflops_per_device"] = self.real_tokens / dt * self.flops_token / jax.device_count() / 1e12
        if self.peak:
            row["mfu"] = row["model_tflops_per_device"] * 1e12 / self.peak
        return row


def _data(config: RunSpec, workdir: str, batch_sh):
    """Rows, tokenizer, tokenised splits and the train iterator (this process's shard)."""
    rows, source_reports = experiment.read_rows(config)
    tok = experiment.build_or_load_tokenizer(config, workdir, rows["train"])
    data = experiment.tokenize(config, tok, rows, source_reports)
    for rep in source_reports:
        if rep.bad.total:
            console.log(f"warning: data source {rep.name}: skipped {rep.bad.total} bad rows "
                        f"({dict(rep.bad.counts)})")
    for split, rep in data.reports.items():
        console.log(f"data {split:<10} {rep.summary()}")
    for split in ("train", "validation"):  # training needs both: validation picks the best checkpoint
        if not data.examples.get(split):
            rep = data.reports.get(split)
            raise UserError(f"data: the {split} split is empty" + (f" ({rep.summary()})" if rep else "")
                            + "; check data.sources, data.split_fractions and data.max_length "
                            "(python -m data_pipeline.inspect shows why)")
    tcfg = config.train
    try:
        train_ds = loader.train_dataset(
            data.examples["train"], seq_len=config.data.max_length, pad_id=tok.pad_token_id,
            batch_size=tcfg.batch_size, seed=config.seed, packing=config.data.packing,
            max_segments=config.data.max_segments_per_row,
            **experiment.loader_shard(batch_sh), **config.data.loader)
    except ValueError as e:
        raise UserError(f"data: {e}") from e
    return rows, tok, data, iter(train_ds)
