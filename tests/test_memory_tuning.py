"""What ``serve`` sets up before the daemon starts: the collector's thresholds and the frozen
start-up heap (measured in bench/README.md, fifth round)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from ratatoskr.memory import tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_freezes_start_up_and_collects_the_young_less_often():
    gc.unfreeze()
    tune_gc()
    assert gc.get_threshold() == (10_000, 20, 20)
    assert gc.get_freeze_count() > 1000  # the modules and objects start-up made
