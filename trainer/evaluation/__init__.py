"""Evaluation: ``generate`` (jitted KV-cache decoding), ``evaluator`` (the Evaluator: prompts,
exemplars, generation, scores, teacher-forced loss), ``scoring`` (exact match, ROUGE, chrF,
bootstrap intervals), ``in_training`` (the evaluators the training loop runs, and when),
``reports`` (Markdown, JSON, plots) and ``compare`` (what ``trainer.eval`` compares: base
zero-/few-shot against the fine-tuned checkpoint). May import models, io, settings and
``trainer.training`` for the run's setup.
"""
