"""The run directory: its config (``save_or_check_config``, ``load_config``), one run at a time (a
lock), logs that hold every step once after a resume, and the settings a resume must not change.

    workdir/
      config.json        the run spec (RunSpec.to_json), written once, checked on every later run
      run.lock           {pid, host, started, command} of the process-0 holder while a run is live
      metrics.jsonl      one row per logged step; cut back to the restored step on resume
      tensorboard/       events; a resumed writer purges the steps after the restored one
      checkpoints/<step> Orbax (trainer.io.checkpoint)
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
from typing import Any

import jax

from trainer.errors import UserError
from trainer.io import paths
from trainer.io.checkpoint import checkpoint_dir
from trainer.settings.spec import RunSpec, SpecError

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
# Sections that define *what* is trained. A workdir may be resumed with other values elsewhere (more
# steps, other logging), but never with a different model, data or seed: that would silently mix runs.
IDENTITY_KEYS = ("seed", "data", "tokenizer", "model", "lora")

# What a resumed run must share with the run that wrote the checkpoint: the saved data position,
# the optimizer state and the schedule mean nothing under other values. (Model, data and tokenizer
# identity are checked for every run of a workdir: ``IDENTITY_KEYS``.)
RESUME_KEYS = ("train.batch_size", "train.grad_accum_steps", "data.max_length", "data.packing",
               "optimizer")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """``workdir/run.lock``, taken by process 0 for the life of a run.

    A second run on the same workdir is refused, naming the holder. A lock left by a process that is
    no longer alive on this host (a SIGKILL, a crash) is taken over with a warning; a lock from
    another host cannot be checked from here, so it is refused with the path to delete.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = paths.join(workdir, LOCK_FILE)
        self.enabled = enabled
        self.held = False

    def _info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join(sys.argv)}

    def acquire(self) -> str | None:
        """Takes the lock; returns a warning line when a stale lock was taken over."""
        if not self.enabled:
            return None
        info = self._info()
        try:
            if paths.is_remote(self.path):
                # A bucket has no O_EXCL through gcsfs: check, then write (a race of two runs
                # started within the same second can both pass; the local lock is exact).
                if paths.exists(self.path):
                    raise FileExistsError(self.path)
                paths.write_text(self.path, json.dumps(info))
                self.held = True
                return None
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self.holder()
            alive = holder.get("host") != info["host"] or _pid_alive(int(holder.get("pid", -1)))
            if holder and alive:
                started = datetime.datetime.fromtimestamp(holder.get("started", 0)).isoformat(" ", "seconds")
                raise UserError(
                    f"workdir {os.path.dirname(self.path)!r} is in use by pid {holder.get('pid')} on "
                    f"{holder.get('host')} since {started} ({holder.get('command', '?')}); wait for it or "
                    f"stop it (if it is not running, delete {self.path})") from None
            paths.write_text(self.path, json.dumps(info))
            self.held = True
            return (f"warning: took over the lock of pid {holder.get('pid')} on {holder.get('host')}, which "
                    "is no longer running (a crash or kill)" if holder else
                    f"warning: replaced an unreadable lock file {self.path}")
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        self.held = True
        return None

    def holder(self) -> dict[str, Any]:
        try:
            return json.loads(paths.read_text(self.path))
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        me = self._info()
        holder = self.holder()
        if self.held and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
            try:
                paths.remove(self.path)
            except OSError:
                pass
        self.held = False


def truncate_metrics(workdir: str, step: int) -> int:
    """Drops ``metrics.jsonl`` rows after ``step`` (the restored checkpoint), so the steps a crashed or
    preempted run logged past its last checkpoint -- and which the resumed run trains again -- appear
    once. Returns the number of rows dropped. Atomic: a temp file, then a rename. ``workdir``: a
    local directory (a remote workdir's metrics are kept in a local mirror, ``MetricWriter``)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a kill
                dropped += 1
                continue
            if rec.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def resume_differences(saved: dict[str, Any], live: dict[str, Any]) -> list[str]:
    """``key: saved vs now`` for every RESUME_KEYS setting that differs (nested keys flattened)."""
    out = []
    for key in RESUME_KEYS:
        a, b = _get(saved, key), _get(live, key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}: {a.get(k)!r} in the checkpoint's run vs {b.get(k)!r} now"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b and a is not None:
            out.append(f"{key}: {a!r} in the checkpoint's run vs {b!r} now")
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def has_checkpoints(workdir: str) -> bool:
    return any(name.isdigit() for name in paths.listdir(checkpoint_dir(workdir)))


def save_or_check_config(config: RunSpec, workdir: str) -> int | None:
    """Writes ``workdir/config.json`` on the first run; on later runs refuses a different identity,
    and, when there is a checkpoint to resume, different batch/accumulation/optimizer settings
    (``rundir.RESUME_KEYS``) or a different ``train.num_steps`` unless
    ``train.allow_num_steps_change``. Returns the previous ``num_steps`` when it was changed."""
    path = paths.join(workdir, CONFIG_FILE)
    old_steps = None
    if paths.exists(path):
        saved = load_config(workdir).to_dict()  # keys added since it was written: their defaults
        live = config.to_dict()
        old, new = _flatten({k: saved.get(k) for k in IDENTITY_KEYS}), _flatten(
            {k: live.get(k) for k in IDENTITY_KEYS})
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} in the workdir vs {new.get(k)!r} now" for k in diff[:8])
            raise UserError(
                f"workdir {workdir!r} was created with a different config ({shown}). "
                "Use a new --workdir, or pass the config the workdir was made with.")
        if has_checkpoints(workdir):
            if diffs := resume_differences(saved, live):
                raise UserError(
                    f"resuming {workdir!r} with other settings than the run that wrote its checkpoints: "
                    + "; ".join(diffs) + ". The saved data position and optimizer state only mean "
                    "something under the same values: pass them, or use a new --workdir.")
            saved_steps = saved["train"]["num_steps"]
            if saved_steps != config.train.num_steps:
                if not config.train.allow_num_steps_change:
                    raise UserError(
                        f"train.num_steps: {saved_steps} in the checkpoint's run vs "
                        f"{config.train.num_steps} now. The learning-rate schedule (warmup + cosine) "
                        "spans num_steps, so this bends the schedule of a run in progress; to do it "
                        "anyway pass --config.train.allow_num_steps_change=True")
                old_steps = saved_steps
    if jax.process_index() == 0:  # atomically: other processes never read a half-written file
        paths.write_text(path, config.to_json())
    return old_steps


def load_config(workdir: str) -> RunSpec:
    """The config a workdir was trained with (for ``trainer.eval``): keys added since it was written
    take their defaults; a key this version does not know is refused in one line."""
    path = paths.join(workdir, CONFIG_FILE)
    if not paths.exists(path):
        raise UserError(f"{path} not found: {workdir!r} is not a trainer.train workdir "
                        "(run `python -m trainer.train --config ... --workdir DIR` first)")
    try:
        return RunSpec.from_dict(json.loads(paths.read_text(path)), where=path)
    except SpecError as e:
        raise UserError(f"{path} was written by another version of flax-ift: "
                        + "; ".join(str(e).splitlines())) from e
