"""Training: ``experiment`` (a run's setup: config persistence, tokenizer, data, model spec, sharded
state), ``step`` (the pure jitted train/eval step and the optimizer), ``loss`` (chunked cross-entropy
that owns the LM head), ``loop`` (the loop), ``preemption`` (stop requests), ``rundir`` (one run per
workdir, resume checks), ``metrics`` (JSONL, TensorBoard, progress), ``runs`` (``open_run``: reopen
a run for eval and export). May import models, io, settings and evaluation's ``Evaluator``.
"""
