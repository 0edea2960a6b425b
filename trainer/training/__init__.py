"""Training: ``modeling`` (the run's model: architecture, mesh and rules, ``ModelSpec`` and its
weights), ``experiment`` (a run's setup: config check, tokenizer, data, sharded state, the jitted
steps), ``step`` (the pure jitted train/eval step and the optimizer), ``loss`` (chunked cross-entropy
that owns the LM head), ``loop`` (the loop), ``preemption`` (stop requests), ``rundir`` (the run
directory: config.json, one run per workdir, resume checks), ``metrics`` (JSONL, TensorBoard,
progress), ``runs`` (``open_run``: reopen a run for eval and export). May import models, io and
settings; never evaluation (the loop is handed its evaluators) or entry-point code.
"""
