"""What `pico.cli.runtime` sets up before a command's event loop runs."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from pico.cli.runtime import GC_THRESHOLD, tune_collector


@pytest.fixture
def collector() -> Iterator[None]:
    """Puts the collector back as it was (other tests run in this process)."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_tune_collector_freezes_the_start_up_objects_and_collects_less_often(
    collector: None,
) -> None:
    gc.unfreeze()
    tune_collector()
    assert gc.get_freeze_count() > 1000  # the modules' objects, out of every collection
    assert gc.get_threshold()[0] == GC_THRESHOLD
