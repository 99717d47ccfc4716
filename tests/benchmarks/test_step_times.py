"""benchmarks/step_times.py: a run's steps grouped by token bucket."""

import numpy as np
import pytest

from benchmarks.step_times import bucket_table


def test_steps_are_grouped_by_bucket_with_their_periods_waits_and_model_seconds():
    shapes = np.array([[16, 1, 100], [9, 1, 101], [300, 2, 50]], np.float64)
    done = np.array([1.00, 1.01, 1.05])  # outputs on the host; the run started at 0.99
    waits = np.array([0.001, 0.0, 0.03])  # the second step's outputs were there already
    rows = bucket_table(shapes, done, waits, 0.99, np.array([0.005, 0.005, 0.02]), 8192)
    assert [(r["bucket"], r["steps"], r["host_paced"]) for r in rows] == [(16, 2, 1), (320, 1, 0)]
    assert rows[0]["period_s"] == pytest.approx(0.02) and rows[1]["period_s"] == pytest.approx(0.04)
    assert rows[0]["wait_s"] == pytest.approx(0.001) and rows[1]["model_s"] == pytest.approx(0.02)
