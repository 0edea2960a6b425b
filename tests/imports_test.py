"""A run's metric writer and scorer are built without importing torch or scipy.stats (``trainer.imports``),
and a later ``import torch`` in the same process still works."""

import os
import subprocess
import sys

from tests.cli_test import ROOT
from tests.conftest import reference

# Built the way a training run builds them, then the hidden modules imported as any other code would.
SCRIPT = """
import sys
from trainer.training.metrics import MetricWriter
from trainer.evaluation.scoring import Scorer
w = MetricWriter(sys.argv[1])
w.write(1, {"loss": 1.5})
w.close()
s = Scorer().score(["a b c"], ["a b d"])
print(sorted(m for m in ("torch", "scipy.stats") if m in sys.modules))
import torch, scipy.stats
print(torch.zeros(2).sum().item(), scipy.stats.norm.cdf(0.0), round(float(s["rouge1"][0]), 4))
"""


def test_the_writer_and_scorer_import_neither_torch_nor_scipy_stats(tmp_path):
    reference("torch")  # installed, so tensorboardX would import it
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    loaded, imported_after = r.stdout.splitlines()[-2:]
    assert loaded == "[]", loaded
    assert imported_after == "0.0 0.5 0.6667", imported_after
    assert list((tmp_path / "tensorboard").iterdir())  # the events file was written
