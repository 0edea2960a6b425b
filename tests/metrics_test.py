"""Metric aggregation and the progress bar."""

import io

import numpy as np

from trainer.training import metrics as metrics_lib


def test_summarize_is_token_weighted_and_never_invents_a_zero_loss():
    s = metrics_lib.summarize([{"loss_sum": np.float32(6.0), "tokens": np.float32(2), "correct": np.float32(1)},
                               {"loss_sum": np.float32(2.0), "tokens": np.float32(8), "correct": np.float32(8)}])
    assert s == {"loss": 0.8, "token_accuracy": 0.9, "tokens": 10.0}
    assert metrics_lib.summarize([{"loss_sum": 0.0, "tokens": 0.0, "correct": 0.0}]) == {"tokens": 0.0}


def test_progress_shows_the_interval_it_was_given():
    out = io.StringIO()
    p = metrics_lib.Progress(10, 0, True, file=out, mininterval=0, miniters=1, ascii=True)
    p.update(5, loss="1.2500", tok_s="900")
    p.update(5, loss="0.5000", tok_s="1000")
    frames = out.getvalue().split("\r")
    assert "loss=1.2500" in frames[-2] and "5/10" in frames[-2]  # the redraw at step 5 shows step 5's loss
    assert "loss=0.5000" in frames[-1] and "10/10" in frames[-1]
    p.close()
