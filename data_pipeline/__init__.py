"""Data for instruction tuning: sources, splits, tokenizer, templating with the loss mask, loading.

Plain Python/NumPy: nothing here imports model code, so the pipeline can be inspected and tested alone.
"""

import os as _os

# transformers prints "PyTorch was not found..." on import when torch is absent. Torch is never needed
# here (it is a test-time reference only), so that advisory line is noise a user cannot act on; only
# transformers' *advisory* warnings are silenced, nothing else.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
