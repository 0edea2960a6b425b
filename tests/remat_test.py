"""The remat modes' policies (``trainer/models/remat.py``). What each keeps is counted in the compiled
or traced step elsewhere: tests/step_test.py (XLA attention), tests/attention_test.py (the GPU
kernels), tests/topology_test.py (splash on a TPU), tests/lora_test.py (LoRA's named projections)."""

import pytest

from trainer.models import remat
from trainer.settings import options


def test_every_mode_has_a_policy_and_an_unknown_one_is_named():
    assert remat.policy("full") is None and remat.remat(len, "none") is len
    for mode in set(options.REMAT) - {"none", "full"}:
        assert callable(remat.policy(mode)) and callable(remat.policy(mode, lora=True))
    with pytest.raises(ValueError, match="model.remat must be one of none, full, dots, dots_with_context"):
        remat.policy("dot")
