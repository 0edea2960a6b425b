"""Data for instruction tuning: sources, splits, tokenizer, templating with the loss mask, loading.

Plain Python/NumPy: nothing here imports model code, so the pipeline can be inspected and tested alone.
"""
