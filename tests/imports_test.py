"""A run's metric writer and scorer are built without importing torch, scipy.stats or GCS' client
(``trainer.imports``), and a later ``import torch`` in the same process still works."""

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
print(sorted(m for m in ("torch", "scipy.stats", "google.cloud.storage") if m in sys.modules))
import torch, scipy.stats, google.cloud.storage
print(torch.zeros(2).sum().item(), scipy.stats.norm.cdf(0.0), round(float(s["rouge1"][0]), 4),
      google.cloud.storage.Client.__name__)
"""


def test_the_writer_and_scorer_import_neither_torch_nor_scipy_stats_nor_gcs(tmp_path):
    reference("torch")  # installed, so tensorboardX would import it
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    loaded, imported_after = r.stdout.splitlines()[-2:]
    assert loaded == "[]", loaded
    assert imported_after == "0.0 0.5 0.6667 Client", imported_after
    assert list((tmp_path / "tensorboard").iterdir())  # the events file was written


# The layering each package's docstring states, read from every import in its source (function-level
# ones too): package -> the modules it must never import. Entry points and presets sit above all.
DATA_ENTRY_POINTS = ("data_pipeline/bench.py", "data_pipeline/inspect.py", "data_pipeline/cli.py")
ENTRY_POINTS = ("trainer.train", "trainer.eval", "trainer.export", "trainer.convert", "trainer.bench",
                "trainer.bench_generate", "trainer.cli", "configs")
LAYERS = {
    "data_pipeline": ("trainer",) + ENTRY_POINTS,   # its own entry points may start from a preset
    "trainer/settings": ("trainer.models", "trainer.io", "trainer.training", "trainer.evaluation",
                         "trainer.benchmarks") + ENTRY_POINTS,
    "trainer/models": ("trainer.io", "trainer.training", "trainer.evaluation",
                       "trainer.benchmarks") + ENTRY_POINTS,
    "trainer/io": ("trainer.training", "trainer.evaluation", "trainer.benchmarks") + ENTRY_POINTS,
    "trainer/training": ("trainer.evaluation", "trainer.benchmarks") + ENTRY_POINTS,
    "trainer/evaluation": ("trainer.benchmarks",) + ENTRY_POINTS,
    "trainer/benchmarks": ENTRY_POINTS,
}


def _imports(path):
    """Every module ``path`` imports, ``from a import b`` giving both ``a`` and ``a.b``."""
    import ast  # noqa: PLC0415
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_each_package_imports_only_the_layers_below_it():
    import glob  # noqa: PLC0415
    found = []
    for package, forbidden in LAYERS.items():
        files = sorted(glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True))
        assert files, package
        for path in files:
            rel = os.path.relpath(path, ROOT)
            for module in _imports(path):
                if rel in DATA_ENTRY_POINTS and module.split(".")[0] == "configs":
                    continue
                if any(module == f or module.startswith(f + ".") for f in forbidden):
                    found.append(f"{rel} imports {module}")
    assert not found, "\n".join(sorted(set(found)))
