"""The training loop: ``train(config, workdir)`` (the CLI is ``trainer.train``).

Resumes from the latest checkpoint when ``workdir`` already has one.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np

from data_pipeline import loader
from trainer import experiment, metrics as metrics_lib, sharding as sharding_lib
from trainer.checkpoint import VAL_METRIC, Checkpointer
from trainer.cli import UserError
from trainer.evaluator import Evaluator, log_pattern_warning, sample_rows
from trainer.flops import flops_per_token, peak_flops
from trainer.step import TrainState, make_eval_step, make_optimizer


def train(config, workdir: str, stop_at: int | None = None) -> TrainState:
    """Trains (or resumes) the run in ``workdir``; returns the final state.

    Args:
      config: the resolved config (see ``configs/demo.py``).
      workdir: run directory; resumed from its latest checkpoint if it has one.
      stop_at: stop after this step, checkpointing it, as a preempted job would; the LR schedule
        still spans ``train.num_steps``, so a later call resumes the same run.
    """
    experiment.validate_config(config)
    experiment.save_or_check_config(config, workdir)
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
    chunk = tcfg.get("loss_chunk_tokens", 1024)
    train_step = experiment.jit_train_step(spec, tx, schedule, tcfg.grad_accum_steps, state_sh,
                                           batch_sh, chunk)
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
    ckpt = Checkpointer(workdir, keep=tcfg.keep_checkpoints, best_metric=best_metric,
                        best_mode=ccfg.get("best_mode", "auto"))
    start = ckpt.latest_step()
    if start is not None:
        abstract = experiment.abstract_state(spec, tx, state_sh)
        state, data_state = ckpt.restore(start, abstract)
        if data_state:
            train_iter.set_state(data_state)
        metrics_lib.log(f"resumed from the checkpoint at step {start}")
    else:
        state = experiment.init_train_state(spec, tx, config.seed, state_sh)
        start = 0
    if start >= tcfg.num_steps:
        metrics_lib.log(f"already trained to step {start} (train.num_steps={tcfg.num_steps}); nothing to do")
        ckpt.close()
        return state

    # ----------------------------------------------------------------------------------------
    # Loop
    # ----------------------------------------------------------------------------------------
    writer = metrics_lib.MetricWriter(workdir)
    progress = metrics_lib.Progress(tcfg.num_steps, start, tcfg.progress_bar)
    pending, real_tokens, t_last = [], 0, time.perf_counter()
    flops_token = flops_per_token(spec.cfg, config.data.max_length)
    peak = peak_flops(jax.devices()[0])
    evaluate = functools.partial(experiment.split_loss, eval_step, examples=data.examples["validation"],
                                 config=config, pad_id=tok.pad_token_id, batch_sh=batch_sh)
    last_step = min(tcfg.num_steps, stop_at or tcfg.num_steps)
    for step in range(start + 1, last_step + 1):
        local = next(train_iter)
        real_tokens += int(np.count_nonzero(local["segment_ids"])) * jax.process_count()
        state, m = train_step(state, experiment.global_batch(local, batch_sh))
        pending.append(m)

        if step % tcfg.log_every == 0 or step == last_step:
            summary = metrics_lib.summarize(pending)  # blocks until these steps are done
            dt = time.perf_counter() - t_last
            last = jax.device_get(pending[-1])
            row = {"loss": summary["loss"], "token_accuracy": summary["token_accuracy"],
                   "grad_norm": float(last["grad_norm"]), "learning_rate": float(last["learning_rate"]),
                   "tokens_per_s": real_tokens / dt,
                   "supervised_tokens_per_s": summary["tokens"] / dt}
            # Model FLOP/s on real (non-padding) tokens, per device, and MFU where the peak is known:
            # the formula of trainer.bench (trainer.flops).
            row["model_tflops_per_device"] = real_tokens / dt * flops_token / jax.device_count() / 1e12
            if peak:
                row["mfu"] = row["model_tflops_per_device"] * 1e12 / peak
            if not np.isfinite(row["loss"]):
                raise FloatingPointError(f"non-finite training loss at step {step}: {row}")
            writer.write(step, row, prefix="train/")
            progress.update(len(pending), loss=f"{row['loss']:.4f}",
                            tok_s=f"{row['tokens_per_s']:.0f}",
                            **({"mfu": f"{100 * row['mfu']:.1f}%"} if peak else {}))
            pending, real_tokens, t_last = [], 0, time.perf_counter()

        is_ckpt = step % tcfg.checkpoint_every == 0 or step == last_step
        val: dict[str, float] = {}
        if step % tcfg.eval_every == 0 or is_ckpt:
            val = evaluate(state.params)
            writer.write(step, val, prefix="val/")
            progress.write(f"step {step}: val loss {val['loss']:.4f}, "
                           f"token accuracy {val['token_accuracy']:.4f}")
        # Generation eval on its schedule, and at every checkpoint when it ranks the checkpoints.
        if generation_eval is not None and ((gen_every and step % gen_every == 0)
                                            or (is_ckpt and best_metric != VAL_METRIC)):
            gen = generation_eval(state.params)
            writer.write(step, gen, prefix="val/")
            val.update(gen)
            progress.write(f"step {step}: " + ", ".join(
                f"{k} {100 * gen[k]:.1f}%" for k in ("exact_match", "rougeL", "chrf")) +
                f" on {len(generation_eval.rows)} validation rows "
                f"({gen['gen_tokens_per_s']:.0f} generated tokens/s)")
        if val:
            t_last = time.perf_counter()  # evaluation time is not training throughput
        if is_ckpt:
            # Only finite metrics are kept: a NaN must never rank as the best checkpoint.
            finite = {f"val/{k}": float(v) for k, v in val.items() if np.isfinite(v)}
            ckpt.save(step, state, train_iter.get_state(), metrics=finite or None)

    progress.close()
    writer.close()
    ckpt.wait()
    ckpt.close()
    return state
