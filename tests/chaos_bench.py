r"""Kill a training run many times at random moments and check it still ends where an uninterrupted run
ends (a benchmark-style script, not a CI test; ``tests/fault_tolerance_test.py`` runs a short version).

    python -m tests.chaos_bench --kills 50 [--steps 2000] [--seed 0]

Each round starts the same ``trainer.train`` command on the same workdir, waits a random number of
logged steps plus a random fraction of a second (so kills land mid-step, mid-save and mid-log), and
SIGKILLs it. Afterwards the command runs to the end; the final params, optimizer state and data
position are compared bitwise with an uninterrupted run, and ``metrics.jsonl`` must hold every step
once. Prints: kills, restores (runs that resumed from a checkpoint), restore failures, and the verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import tempfile
import time

from tests.fault_tolerance_test import final_state, metric_steps, popen, train, tree_equal, wait_for_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    extra = [f"--config.train.num_steps={args.steps}", "--config.train.checkpoint_every=10",
             "--config.train.log_every=1", "--config.train.eval_every=1000", "--config.train.keep_checkpoints=2"]
    root = tempfile.mkdtemp(prefix="chaos_")
    ref, wd = os.path.join(root, "ref"), os.path.join(root, "run")
    t0 = time.time()
    r = train(ref, *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    rng = random.Random(args.seed)
    kills = restores = failures = 0
    for _ in range(args.kills):
        done = max(metric_steps(wd)) if os.path.exists(os.path.join(wd, "metrics.jsonl")) and metric_steps(wd) else 0
        if done >= args.steps - 1:
            break
        p = popen(wd, *extra)
        wait_for_step(wd, done + 1, p)  # past start-up (restore included)
        time.sleep(rng.random() * 0.5)  # then anywhere: mid-step, mid-save, mid-log
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        out, err = p.communicate(timeout=300)
        restores += "resumed from the checkpoint" in out
        failures += "cannot be restored" in out or (p.returncode not in (0, -9) and "error:" in err)
    r = train(wd, *extra)
    restores += "resumed from the checkpoint" in r.stdout
    failures += r.returncode != 0
    steps = metric_steps(wd)
    a, b = final_state(wd), final_state(ref)
    equal = a[0] == b[0] and a[2] == b[2] and tree_equal(a[1], b[1])
    result = {"kills": kills, "restores": restores, "restore_failures": failures,
              "every_step_once": steps == list(range(1, args.steps + 1)), "bitwise_equal": equal,
              "seconds": round(time.time() - t0)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
