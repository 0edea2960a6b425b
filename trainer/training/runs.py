"""Reopening a run that ``trainer.train`` wrote: ``open_run(workdir)``.

Everything that reads a finished (or running) run -- ``trainer.eval``, ``trainer.export``, the tests --
opens it here, so the run's config, tokenizer, mesh, model and checkpoint policy (which step is
``best``) come out the same way every time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jax.sharding import Mesh

from trainer.io.checkpoint import Checkpointer
from trainer.settings.spec import RunSpec
from trainer.training import experiment, modeling, rundir


@dataclasses.dataclass
class Run:
    """An existing run: its config (as saved in ``config.json``, plus any overrides the caller
    applied), tokenizer, mesh over this process's devices, model spec and read-only checkpointer."""

    workdir: str
    config: RunSpec
    tok: Any
    mesh: Mesh
    spec: modeling.ModelSpec
    checkpoints: Checkpointer

    def restore(self, which: str = "best") -> tuple[int, Any]:
        """``(step, trainable params)`` of checkpoint ``which`` (best | latest | STEP), refused in
        one line when a LoRA run's base is not the one it was trained on."""
        step = self.checkpoints.resolve(which)
        self.checkpoints.check_base(step)
        return step, self.checkpoints.restore_params(step, self.spec.abstract_trainable())

    def close(self) -> None:
        self.checkpoints.close()


def open_run(workdir: str, config: RunSpec | None = None) -> Run:
    """Opens ``workdir``; ``config`` (default: its ``config.json``) is for callers that override
    parts of it first (``trainer.eval --data``)."""
    config = config if config is not None else rundir.load_config(workdir)
    tok = experiment.build_or_load_tokenizer(config, workdir, train_rows=None)
    mesh = modeling.make_mesh(config)
    spec = modeling.model_spec(config, len(tok), mesh)
    checkpoints = Checkpointer.for_run(config, workdir, read_only=True,
                                       base=modeling.base_identity(spec, config.seed))
    return Run(workdir, config, tok, mesh, spec, checkpoints)
