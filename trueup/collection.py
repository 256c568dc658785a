"""Garbage collection for batch loops: let a batch die in the generation it was born in.

CPython collects its young generation every 700 net allocations of container objects. A loop
that holds a batch of a thousand messages (each a few objects, dicts and tuples) outlives dozens
of those collections, so every batch is promoted to the old generation, which then fills up and
triggers full collections. A full collection traverses every object of the process: the
imported libraries' (millions in a Dagster code location), 10-25 ms each, a dozen of them in a
100,000-letter replay (a seventh of its time, measured on the replay benchmark).

Inside :func:`batch_loop` the young generation is collected every :data:`YOUNG_THRESHOLD` net
allocations instead. A batch is freed before that many objects are alive, so it never reaches
the old generation; nothing goes uncollected (collections still run, only less often), and the
previous thresholds are back when the last loop in the process leaves.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

#: Net allocations of container objects between collections of the young generation inside a
#: batch loop: above what the few batches a loop holds at once allocate in tracked objects (a
#: 100,000-letter replay ran one young collection instead of 1,550, and no full one instead of
#: 13), and small enough that a collection stays around a millisecond.
YOUNG_THRESHOLD = 20_000

_lock = threading.Lock()
_loops = 0
_saved: tuple[int, ...] = ()


@contextlib.contextmanager
def batch_loop() -> Iterator[None]:
    """Collect the young generation less often while the body runs (nestable, thread-safe:
    thresholds are per process, so the first loop in raises them and the last one out restores
    them)."""
    global _loops, _saved
    with _lock:
        if _loops == 0:
            _saved = gc.get_threshold()
            if _saved[0] > 0:  # 0: collection is disabled; leave it so
                gc.set_threshold(max(_saved[0], YOUNG_THRESHOLD), *_saved[1:])
        _loops += 1
    try:
        yield
    finally:
        with _lock:
            _loops -= 1
            if _loops == 0:
                gc.set_threshold(*_saved)
