"""ketch.bench: the load loops set up their thread for timing and put it back after."""

from __future__ import annotations

import gc
import sys

import pytest
from ketch import bench


def test_measuring_pauses_the_collector_and_puts_it_back():
    assert gc.isenabled()
    with bench._measuring():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), bench._measuring():
        raise RuntimeError("a load that fails")
    assert gc.isenabled()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timer slack is a Linux setting")
def test_measuring_sets_a_fine_timer_slack_and_restores_it():
    original = bench._set_timer_slack(50_000)
    assert original is not None
    bench._set_timer_slack(original)
    with bench._measuring():
        assert bench._set_timer_slack(1) == 1
    assert bench._set_timer_slack(original) == original
