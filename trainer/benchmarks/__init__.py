"""Measuring, never training: ``train_step`` (``trainer.bench``: our step against the PyTorch
reference), ``generation`` (``trainer.bench_generate``: against ``transformers.generate``),
``dry_run`` (``trainer.train --dry_run``: compile from abstract shapes, report memory and FLOPs),
``memory`` (the bytes a state or a compiled step takes per device), ``timing`` (the median of a
stateless jitted call, for ``loss`` and ``attention_kernels``).
"""
