"""Threads trueup starts leave SIGINT and SIGTERM to the main thread (see trueup.threads)."""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path

from trueup import threads

STOP = {signal.SIGINT, signal.SIGTERM}
TRUEUP = Path(__file__).resolve().parents[2] / "trueup"


def _blocked_here() -> set[int]:
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_a_thread_and_a_pool_s_threads_block_the_stop_signals_and_the_main_thread_not() -> None:
    assert threading.current_thread() is threading.main_thread()
    assert not STOP & _blocked_here()
    seen: list[set[int]] = []
    started = threads.thread(lambda: seen.append(_blocked_here()), name="test")
    started.start()
    started.join()
    with threads.executor(2, "test") as pool:
        seen += [pool.submit(_blocked_here).result() for _ in range(3)]
    assert len(seen) == 4 and all(s >= STOP for s in seen), seen
    assert not STOP & _blocked_here()


def test_every_thread_trueup_starts_goes_through_trueup_threads() -> None:
    """A thread started otherwise could take a Ctrl-C the main thread then never sees."""
    direct = re.compile(r"\b(threading\.Thread|ThreadPoolExecutor)\(")
    found = [f"{path.relative_to(TRUEUP.parent)}:{n}"
             for path in TRUEUP.rglob("*.py") if path.name != "threads.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if direct.search(line)]
    assert found == [], found
