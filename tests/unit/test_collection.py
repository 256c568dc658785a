"""trueup.collection: the young generation is collected less often inside batch loops only."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from trueup.collection import YOUNG_THRESHOLD, batch_loop


@pytest.fixture(autouse=True)
def thresholds() -> Iterator[tuple[int, ...]]:
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield gc.get_threshold()
    gc.set_threshold(*saved)


def test_a_batch_loop_raises_the_young_threshold_and_gives_it_back() -> None:
    with batch_loop():
        assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)
    assert gc.get_threshold() == (700, 10, 10)


def test_nested_and_overlapping_loops_restore_only_when_the_last_one_leaves() -> None:
    inside, leave = threading.Event(), threading.Event()

    def other_loop() -> None:
        with batch_loop():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other_loop)
    with batch_loop():
        thread.start()
        assert inside.wait(10)
        with batch_loop():
            assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD, "the other thread's loop still runs"
    leave.set()
    thread.join(10)
    assert gc.get_threshold() == (700, 10, 10)


def test_a_loop_leaves_a_disabled_collector_and_a_larger_threshold_alone() -> None:
    gc.set_threshold(0)
    with batch_loop():
        assert gc.get_threshold()[0] == 0
    gc.set_threshold(50_000, 10, 10)
    with batch_loop():
        assert gc.get_threshold() == (50_000, 10, 10)
    assert gc.get_threshold() == (50_000, 10, 10)
