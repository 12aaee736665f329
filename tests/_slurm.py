"""Helpers shared by the tests that drive the real local Slurm (``test_slurm_cluster``,
``test_slurm_multinode``): the per-test output folder that cancels whatever a test leaves queued or
running, and a bounded wait. Each test module keeps its own ``cluster`` fixture (single-node or
2-node), which ``out`` requests."""
from __future__ import annotations

import time

import pytest

from slurm.cancel import cancel


@pytest.fixture
def out(cluster, tmp_path):
    """The run's output folder; whatever a test leaves queued or running is cancelled afterwards."""
    d = tmp_path / "run"
    yield d
    if d.is_dir():
        cancel(d)


def wait_until(pred, timeout: float, what: str):
    """Poll ``pred()`` every 0.5 s until it returns something truthy (returned), at most ``timeout``
    seconds (then ``AssertionError`` naming ``what``)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"gave up after {timeout} s waiting for {what}")
