"""What the exit watcher says of a native abort (``trainer.exit_watch.diagnosis``), from the lines
JAX's runtime wrote in runs of tests/multiprocess_test.py."""

from trainer.exit_watch import diagnosis

# Process 0 of 2 after process 1 was SIGKILLed: the coordination service (in process 0) saw process 1
# go quiet. It says UNAVAILABLE too, and it used to be read as "process 0 is gone" -- by process 0.
HEARTBEAT = """\
E1203 18:10:06.595127    4425 coordination_service.cc:1549] [2981722173301566602] Use error polling to \
propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped \
sending heartbeats):
F1203 18:10:06.595797    4436 client.h:80] Terminating process because the JAX distributed service \
detected fatal errors. This most likely indicates that another task died; see the other task logs for \
more details.
E1203 18:10:06.596033    4732 preemption_sync_manager.cc:251] Preemption sync barrier failed: INTERNAL: \
Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 1 heartbeat timeout.
"""
# Process 1 after process 0 (and the service with it) was SIGKILLed.
SERVICE_GONE = """\
E1203 17:05:01.000000    4436 coordination_service_agent.cc:289] Polled an error from coordination \
service (this can be an error from this or another task).
F1203 17:05:01.000100    4436 client.h:80] Terminating process because the JAX distributed service \
detected fatal errors. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Socket closed
"""


def test_a_peer_gone_quiet_is_not_read_as_process_0_gone(tmp_path):
    (tmp_path / "a.log").write_text(HEARTBEAT)
    (tmp_path / "b.log").write_text(SERVICE_GONE)
    assert "stopped hearing from another process" in diagnosis(str(tmp_path / "a.log"))
    assert "process 0, which hosts JAX's coordination service, is gone" in diagnosis(str(tmp_path / "b.log"))
    (tmp_path / "c.log").write_text("I1203 nothing fatal\n")
    assert diagnosis(str(tmp_path / "c.log")) is None


def _watch(tmp_path, lines: list[str], native: str = HEARTBEAT, named: bool = False) -> str:
    """What the watcher prints when the trainer writes ``lines`` through its ``sys.stderr``
    (``SaysWhy``) and ends, its diagnostics file holding ``native`` (default: a peer's death);
    ``named``: the file is the user's own ``$IFT_NATIVE_LOG``."""
    import io  # noqa: PLC0415
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from trainer.exit_watch import SaysWhy  # noqa: PLC0415
    log = tmp_path / "native.log"
    log.write_text(native)
    r, w = os.pipe()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "IFT_NATIVE_LOG"}
    if named:
        env["IFT_NATIVE_LOG"] = str(log)
    watcher = subprocess.Popen([sys.executable, "-m", "trainer.exit_watch", str(r), str(log), "0"],
                               pass_fds=(r,), stderr=subprocess.PIPE, text=True, cwd=root, env=env)
    os.close(r)
    os.write(w, b"0 2\n")
    terminal = SaysWhy(io.StringIO(), w)
    for line in lines:
        print(line, file=terminal)
    os.close(w)  # the trainer ends
    return watcher.communicate(timeout=60)[1]


def test_the_watcher_adds_no_line_to_the_trainers_own(tmp_path):
    """A survivor whose grace timer printed its error line, with the dead peer in its diagnostics too,
    showed two error lines (tests/multiprocess_test.py, now and then); the watcher now stays quiet."""
    assert _watch(tmp_path, ["progress 3/10", "warning: slow"]).count("error: process 0 of 2: JAX's") == 1
    assert _watch(tmp_path, ["error: the other processes did not reach an agreed stop"]) == ""


def test_a_run_that_ended_well_leaves_no_diagnostics_file(tmp_path):
    """Every process of every multi-process run left ``<tmp>/flax_ift_native_<pid>.log`` behind, named
    by no line (here, 474 after a day of tests). Kept where it says why a run ended, or where the
    trainer printed its own error, or where the user named it."""
    preemption = "W1206 01:34:38.004791   11170 preemption_notifier.cc:90] SIGTERM caught\n"
    log = tmp_path / "native.log"
    assert _watch(tmp_path, ["progress 3/10"], native=preemption) == ""
    assert not log.exists()
    assert _watch(tmp_path, ["progress 3/10"], native=preemption, named=True) == "" and log.exists()
    assert _watch(tmp_path, ["error: the other processes did not reach an agreed stop"], native=preemption) == ""
    assert log.exists()
    assert "error: process 0 of 2" in _watch(tmp_path, ["progress 3/10"]) and log.exists()
