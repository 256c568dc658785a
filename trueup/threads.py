"""Threads trueup starts leave SIGINT and SIGTERM to the main thread.

Linux hands a signal sent to a process to any one of its threads that does not block it:
usually the main thread, not always. Python runs its handlers in the main thread only, and a
main thread waiting on a lock (joining a backfill's workers, waiting for a diff's future)
wakes for a signal only when the signal came to it: a Ctrl-C that landed on a worker thread
waited for the whole backfill. Every thread trueup starts blocks both, so they always reach
the main thread (threads started from such a thread inherit the mask)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

#: The signals that stop trueup's commands: Ctrl-C, and a supervisor's stop.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def leave_signals_to_main() -> None:
    """Block :data:`STOP_SIGNALS` in the calling thread (never call it in the main one)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def executor(max_workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads leave the stop signals to the main thread."""
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name,
                              initializer=leave_signals_to_main)


def thread(target: Callable[..., Any], *, name: str, args: tuple[Any, ...] = (),
           daemon: bool = True) -> threading.Thread:
    """A thread (not started) that leaves the stop signals to the main thread."""
    def run(*given: Any) -> None:
        leave_signals_to_main()
        target(*given)
    return threading.Thread(target=run, args=args, name=name, daemon=daemon)
