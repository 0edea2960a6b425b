"""The training loop: ``train(config, workdir)`` (the CLI is ``trainer.train``).

Resumes from the newest checkpoint that restores when ``workdir`` already has one. Fault tolerance:
one run per workdir (``rundir.RunLock``); SIGTERM/SIGINT finish the step, checkpoint it and exit
(``preemption``); the async save in flight is always waited for; a failed save stops the run in one
line; non-finite steps are skipped inside the step and a run of ``train.max_bad_steps`` of them stops
training; a resumed run's logs hold every step once.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np

from data_pipeline import loader
from trainer import sharding as sharding_lib
from trainer.training import experiment
from trainer.training import metrics as metrics_lib
from trainer.io.checkpoint import VAL_METRIC, Checkpointer
from trainer.errors import UserError
from trainer.evaluation.evaluator import Evaluator, log_pattern_warning, sample_rows
from trainer.training.preemption import Preempted, StopRequests
from trainer.training.rundir import RunLock
from trainer.models.flops import flops_per_token, peak_flops
from trainer.training.step import TrainState, make_eval_step, make_optimizer


def train(config, workdir: str, stop_at: int | None = None) -> TrainState:
    """Trains (or resumes) the run in ``workdir``; returns the final state.

    Args:
      config: the resolved config (see ``configs/demo.py``).
      workdir: run directory; resumed from its latest checkpoint if it has one.
      stop_at: stop after this step, checkpointing it, as a preempted job would; the LR schedule
        still spans ``train.num_steps``, so a later call resumes the same run.
    """
    experiment.validate_config(config)
    lock = RunLock(workdir, enabled=jax.process_index() == 0)
    if warning := lock.acquire():
        metrics_lib.log(warning)
    try:
        with StopRequests() as stops:
            return _train(config, workdir, stop_at, stops)
    finally:
        lock.release()


def _train(config, workdir: str, stop_at: int | None, stops: StopRequests) -> TrainState:
    old_num_steps = experiment.save_or_check_config(config, workdir)
    tcfg = config.train

    # ----------------------------------------------------------------------------------------
    # Mesh
    # ----------------------------------------------------------------------------------------
    mesh = experiment.make_mesh(config)
    rules = experiment.rules(config)
    batch_sh = sharding_lib.batch_sharding(mesh, rules)
    metrics_lib.log(f"mesh {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} devices "
                    f"({jax.process_count()} process(es))")

    # ----------------------------------------------------------------------------------------
    # Data
    # ----------------------------------------------------------------------------------------
    rows, source_reports = experiment.read_rows(config)
    tok = experiment.build_or_load_tokenizer(config, workdir, rows["train"])
    data = experiment.tokenize(config, tok, rows, source_reports)
    for rep in source_reports:
        if rep.bad.total:
            metrics_lib.log(f"warning: data source {rep.name}: skipped {rep.bad.total} bad rows "
                            f"({dict(rep.bad.counts)})")
    for split, rep in data.reports.items():
        metrics_lib.log(f"data {split:<10} {rep.summary()}")
    for split in ("train", "validation"):  # training needs both: validation picks the best checkpoint
        if not data.examples.get(split):
            rep = data.reports.get(split)
            raise UserError(f"data: the {split} split is empty" + (f" ({rep.summary()})" if rep else "")
                            + "; check data.sources, data.split_fractions and data.max_length "
                            "(python -m data_pipeline.inspect shows why)")
    try:
        train_ds = loader.train_dataset(
            data.examples["train"], seq_len=config.data.max_length, pad_id=tok.pad_token_id,
            batch_size=tcfg.batch_size, seed=config.seed, packing=config.data.packing,
            process_index=jax.process_index(), process_count=jax.process_count(),
            **dict(config.data.loader))
    except ValueError as e:
        raise UserError(f"data: {e}") from e
    train_iter = iter(train_ds)

    # ----------------------------------------------------------------------------------------
    # Model, optimizer and sharded state (created with eval_shape, then jit with out_shardings)
    # ----------------------------------------------------------------------------------------
    spec = experiment.model_spec(config, len(tok), mesh)
    tx, schedule = make_optimizer(config.optimizer, tcfg.num_steps)
    state_sh = experiment.state_shardings(spec, tx)
    num_params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(spec.init_params_fn(0))))
    metrics_lib.log(f"model: {num_params / 1e6:.2f}M parameters, vocab {len(tok)}")

    # ----------------------------------------------------------------------------------------
    # Step functions: jitted once, explicit shardings, donated state
    # ----------------------------------------------------------------------------------------
    batch_tree_sh = {k: batch_sh for k in loader.FIELDS}
    rep = sharding_lib.replicated(mesh)
    chunk = experiment.loss_chunk_tokens(config)
    train_step = experiment.jit_train_step(spec, tx, schedule, tcfg.grad_accum_steps, state_sh,
                                           batch_sh, chunk, config.seed)
    eval_step = sharding_lib.with_mesh(mesh, jax.jit(
        make_eval_step(spec.graphdef, chunk), in_shardings=(spec.param_shardings, batch_tree_sh),
        out_shardings=rep))

    # ----------------------------------------------------------------------------------------
    # Evaluators, built once: validation loss on the whole split; generation metrics (exact match,
    # ROUGE, chrF) on a fixed seeded sample of it every eval.every_steps (the trainer.eval code)
    # ----------------------------------------------------------------------------------------
    ecfg, ccfg = config.eval, config.get("checkpoint", {})
    best_metric = ccfg.get("best_metric", VAL_METRIC)
    gen_every = ecfg.get("every_steps", 0)
    generation_eval = None
    if gen_every or best_metric != VAL_METRIC:
        sample = sample_rows(rows["validation"], ecfg.get("in_training_examples", 64), config.seed)
        generation_eval = Evaluator.create(config, tok, spec, sample, rows["train"], name="val")
        log_pattern_warning(generation_eval)

    # ----------------------------------------------------------------------------------------
    # Checkpoint: resume or initialise
    # ----------------------------------------------------------------------------------------
    ckpt = Checkpointer.for_run(config, workdir, base=experiment.base_identity(spec, config.seed))
    writer = None
    try:
        abstract = experiment.abstract_state(spec, tx, state_sh)
        params0 = None
        if spec.lora.enabled:  # a resume needs the frozen base too: read it once, here
            params0 = spec.init_params(config.seed)
            abstract = abstract.replace(frozen=spec.split(params0)[1])
            n_train = sum(x.size for x in jax.tree.leaves(abstract.params))
            metrics_lib.log(f"LoRA rank {spec.lora.rank} on {','.join(spec.lora.targets)}: "
                            f"{n_train / 1e6:.3f}M trainable parameters "
                            f"({100 * n_train / num_params:.2f}% of the model); base frozen in "
                            f"{spec.lora.base_quant or spec.lora.base_dtype or spec.cfg.param_dtype}")
        restored = ckpt.restore_latest(abstract)
        if restored is not None:
            start, state, data_state = restored
            if data_state:
                train_iter.set_state(data_state)
            metrics_lib.log(f"resumed from the checkpoint at step {start}")
            if old_num_steps is not None:
                _, old_schedule = make_optimizer(config.optimizer, old_num_steps)
                metrics_lib.log(
                    f"train.num_steps {old_num_steps} -> {tcfg.num_steps} (allow_num_steps_change): the "
                    f"warmup + cosine schedule now spans the new length; at step {start} the learning "
                    f"rate goes from {float(old_schedule(start)):.3g} to {float(schedule(start)):.3g}")
        else:
            state = experiment.init_train_state(spec, tx, config.seed, state_sh, params0)
            start = 0
        if start >= tcfg.num_steps:
            metrics_lib.log(f"already trained to step {start} (train.num_steps={tcfg.num_steps}); "
                            "nothing to do")
            return state

        # ------------------------------------------------------------------------------------
        # Loop
        # ------------------------------------------------------------------------------------
        # Rows past the restored step (or any row, when no checkpoint survived) were logged by an
        # interrupted run whose steps are trained again: dropped, so every step appears once.
        writer = metrics_lib.MetricWriter(workdir, resumed_at=start)
        if writer.dropped:
            metrics_lib.log(f"metrics.jsonl: dropped {writer.dropped} rows logged after step {start} "
                            "by the interrupted run (those steps are trained again)")
        progress = metrics_lib.Progress(tcfg.num_steps, start, tcfg.progress_bar)
        pending, real_tokens, t_last = [], 0, time.perf_counter()
        bad_run = 0  # consecutive steps skipped by the non-finite guard
        max_bad = tcfg.get("max_bad_steps", 20)
        flops_token = flops_per_token(spec.cfg, config.data.max_length)
        peak = peak_flops(jax.devices()[0])
        evaluate = functools.partial(experiment.split_loss, eval_step,
                                     examples=data.examples["validation"], config=config,
                                     pad_id=tok.pad_token_id, batch_sh=batch_sh)
        last_step = min(tcfg.num_steps, stop_at or tcfg.num_steps)
        saved_step = start
        for step in range(start + 1, last_step + 1):
            local = next(train_iter)
            real_tokens += int(np.count_nonzero(local["segment_ids"])) * jax.process_count()
            state, m = train_step(state, experiment.global_batch(local, batch_sh))
            pending.append(m)
            ckpt.check_async_error(saved_step)  # a failed async save stops the run here, in one line
            stop = stops.stop_requested(step)

            is_ckpt = step % tcfg.checkpoint_every == 0 or step == last_step or stop is not None
            if step % tcfg.log_every == 0 or is_ckpt:
                fetched = jax.device_get(pending)  # blocks until these steps are done
                diverged_at = None
                for i, f in enumerate(fetched):
                    bad_run = bad_run + 1 if f["skipped"] else 0
                    if bad_run >= max_bad and diverged_at is None:
                        diverged_at = step - len(fetched) + 1 + i
                summary = metrics_lib.summarize(fetched)
                dt = time.perf_counter() - t_last
                last = fetched[-1]
                row = {"grad_norm": float(last["grad_norm"]), "learning_rate": float(last["learning_rate"]),
                       "tokens_per_s": real_tokens / dt,
                       "supervised_tokens_per_s": summary["tokens"] / dt,
                       "skipped_steps": float(sum(f["skipped"] for f in fetched))}
                if "loss" in summary:
                    row.update(loss=summary["loss"], token_accuracy=summary["token_accuracy"])
                # Model FLOP/s on real (non-padding) tokens, per device, and MFU where the peak is
                # known: the formula of trainer.bench (trainer.models.flops).
                row["model_tflops_per_device"] = real_tokens / dt * flops_token / jax.device_count() / 1e12
                if peak:
                    row["mfu"] = row["model_tflops_per_device"] * 1e12 / peak
                writer.write(step, row, prefix="train/")
                progress.update(len(pending), loss=f"{row.get('loss', float('nan')):.4f}",
                                tok_s=f"{row['tokens_per_s']:.0f}",
                                **({"mfu": f"{100 * row['mfu']:.1f}%"} if peak else {}),
                                **({"skipped": int(row["skipped_steps"])} if row["skipped_steps"] else {}))
                pending, real_tokens, t_last = [], 0, time.perf_counter()
                if diverged_at is not None:
                    raise UserError(
                        f"training diverged: {max_bad} steps in a row up to step {diverged_at} had a "
                        "non-finite loss or gradient norm and were skipped (params unchanged); the "
                        f"last checkpoint is step {saved_step}. Lower optimizer.learning_rate or check "
                        "the data (train.max_bad_steps sets the limit)")

            val: dict[str, float] = {}
            if stop is not None:  # a preemption notice leaves seconds: checkpoint now, evaluate later
                ckpt.save(step, state, train_iter.get_state(), metrics=None)
                saved_step = step
                writer.sync()
            elif step % tcfg.eval_every == 0 or is_ckpt:
                val = evaluate(state.model_params)
                writer.write(step, val, prefix="val/")
                progress.write(f"step {step}: val loss {val.get('loss', float('nan')):.4f}, "
                               f"token accuracy {val.get('token_accuracy', float('nan')):.4f}")
            # Generation eval on its schedule, and at every checkpoint when it ranks the checkpoints.
            if generation_eval is not None and stop is None and (
                    (gen_every and step % gen_every == 0) or (is_ckpt and best_metric != VAL_METRIC)):
                gen = generation_eval(state.model_params)
                writer.write(step, gen, prefix="val/")
                val.update(gen)
                progress.write(f"step {step}: " + ", ".join(
                    f"{k} {100 * gen[k]:.1f}%" for k in ("exact_match", "rougeL", "chrf")) +
                    f" on {len(generation_eval.rows)} validation rows "
                    f"({gen['gen_tokens_per_s']:.0f} generated tokens/s)")
            if val:
                t_last = time.perf_counter()  # evaluation time is not training throughput
            if is_ckpt and stop is None:
                if not np.isfinite(val.get("loss", np.nan)):
                    # The guard keeps params finite, but a checkpoint must never carry a non-finite
                    # validation loss either: skip this one (the previous ones stay).
                    progress.write(f"warning: step {step}: validation loss {val.get('loss')} is not "
                                   "finite; no checkpoint written at this step")
                else:
                    # Only finite metrics are kept: a NaN must never rank as the best checkpoint.
                    finite = {f"val/{k}": float(v) for k, v in val.items() if np.isfinite(v)}
                    try:
                        ckpt.save(step, state, train_iter.get_state(), metrics=finite)
                    except UserError:
                        raise
                    except Exception as e:  # noqa: BLE001 -- the previous async save's error, or this one's
                        raise ckpt.save_error(step, e) from None
                    saved_step = step
                    writer.sync()  # a remote workdir's metrics, up to this checkpoint
            if stop is not None:
                try:
                    ckpt.wait()  # committed on every host before we say so
                except Exception as e:  # noqa: BLE001
                    raise ckpt.save_error(step, e) from None
                progress.close()
                metrics_lib.log(f"{stop}: stopped after step {step}; its checkpoint is saved in "
                                f"{ckpt.directory}/{saved_step}. Rerun the same command to resume.")
                raise Preempted(stop, step)
        progress.close()
        return state
    finally:
        # Whatever ends the loop -- the last step, a preemption, an exception -- the in-flight async
        # save is waited for (never abandoned half-written), then everything is closed.
        try:
            ckpt.wait()
        except Exception as e:  # noqa: BLE001 -- reported; an exception already on its way goes on
            metrics_lib.log(f"warning: {ckpt.save_error(None, e)}")
        ckpt.close()
        if writer is not None:
            writer.close()
