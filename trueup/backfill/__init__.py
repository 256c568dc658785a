"""Backfills: repair a scope (a run's differences, a partition, a whole table) in resumable,
leased chunks, recording every repaired key (row-level lineage).

``trueup backfill NAME (--run ID | --partition P | --all)`` plans and serves one;
``--resume ID`` continues (or joins) one, ``--cancel ID`` stops one. See docs/backfills.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import psycopg

from trueup.backfill.chunks import LEASE_SECONDS, Chunk, taken_over
from trueup.backfill.model import (
    BackfillOptions,
    BackfillSummary,
    WorkerOptions,
)
from trueup.backfill.planner import plan
from trueup.backfill.runner import Progress, load, require_servable, serve, summary_of
from trueup.config import Config
from trueup.errors import Conflict, UsageError
from trueup.log import get_logger
from trueup.queries import query
from trueup.state import open_state
from trueup.statuses import BackfillScope, BackfillStatus

__all__ = ["BackfillOptions", "BackfillSummary", "Chunk", "WorkerOptions", "cancel_backfill",
           "cmd_backfill", "resume_backfill", "start_backfill"]

#: Environment override of the lease, for operators (and tests) who want faster takeover.
LEASE_ENV = "TRUEUP_BACKFILL_LEASE_SECONDS"
#: The shortest lease taken: renewed every third of it, a chunk's statements time out with it.
MIN_LEASE_SECONDS = 1.0
#: The longest lease taken (a day): a dead worker's chunk waits that long to be taken over, and
#: the lease's end (a timestamptz) and its renewals' statement_timeout (an int of ms, at most
#: about 24 days) must hold it. Config durations may be longer (config.MAX_DURATION, a year).
MAX_LEASE_SECONDS = 86_400.0

log = get_logger(__name__)


def start_backfill(config: Config, name: str, options: BackfillOptions,
                   worker: WorkerOptions | None = None,
                   progress: Progress | None = None) -> BackfillSummary:
    """Plan a backfill of reconciliation ``name`` and serve it to the end."""
    started = time.monotonic()
    with open_state(config.state) as state:
        state.autocommit = True
        backfill_id = plan(config, name, options, state)
    worker = worker or WorkerOptions(workers=options.workers)
    summary = serve(config, backfill_id, worker, progress)
    return BackfillSummary(**{**summary.__dict__, "seconds": round(time.monotonic() - started,
                                                                   3)})


def resume_backfill(config: Config, backfill_id: int, worker: WorkerOptions | None = None,
                    progress: Progress | None = None) -> BackfillSummary:
    """Continue backfill ``backfill_id`` from its unfinished chunks (or join its workers).

    A failed or cancelled backfill is reopened: its failed and cancelled chunks run again.
    """
    started = time.monotonic()
    with open_state(config.state) as state:
        state.autocommit = True
        row = load(state, backfill_id)
        status = BackfillStatus(row["status"])
        if status is BackfillStatus.SUCCEEDED:
            return summary_of(row, time.monotonic() - started)
        # before reopening: a backfill reopened that no worker can serve would block new ones
        require_servable(config, row)
        if status in (BackfillStatus.FAILED, BackfillStatus.CANCELLED):
            _reopen(state, backfill_id, row["reconciliation"])
        elif status is BackfillStatus.PLANNING:
            raise Conflict(f"backfill {backfill_id} is still being planned")
    log.info("backfill.resumed", backfill_id=backfill_id, was=status.value)
    return serve(config, backfill_id, worker or WorkerOptions(), progress)


def _reopen(state: psycopg.Connection[Any], backfill_id: int, reconciliation: str) -> None:
    """Make a failed or cancelled backfill running again, unless another one is active."""
    from trueup.backfill.planner import active_conflict

    try:
        with state.transaction():
            state.execute(query("reopen_backfill"), {"backfill_id": backfill_id})
            reopened = state.execute(query("reopen_chunks"),
                                     {"backfill_id": backfill_id}).fetchall()
    except psycopg.errors.UniqueViolation:  # backfills_one_active_idx: one active at a time
        active = state.execute(query("active_backfill"),
                               {"reconciliation": reconciliation}).fetchone()
        if active is None:
            raise Conflict(f"backfill {backfill_id}: another backfill of {reconciliation} was "
                           f"active a moment ago; run --resume again") from None
        raise active_conflict(reconciliation, active, planning=False) from None
    for row in reopened:  # their next claim finds them pending: counted here
        if row["taken_over"]:
            taken_over(backfill_id, row["chunk"], row["attempts"], owner="resume")


def cancel_backfill(config: Config, backfill_id: int) -> BackfillSummary:
    """Stop backfill ``backfill_id``: pending chunks are cancelled, running ones finish."""
    with open_state(config.state) as state:
        state.autocommit = True
        row = load(state, backfill_id)
        if BackfillStatus(row["status"]).active:
            with state.transaction():
                state.execute(query("cancel_backfill"), {"backfill_id": backfill_id})
            log.info("backfill.cancelled", backfill_id=backfill_id)
        return summary_of(load(state, backfill_id), 0.0)


def lease_seconds() -> float:
    """The lease of a backfill's chunks: ``$TRUEUP_BACKFILL_LEASE_SECONDS``, else the default."""
    value = os.environ.get(LEASE_ENV)
    if not value:
        return LEASE_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < MIN_LEASE_SECONDS:
        raise UsageError(f"{LEASE_ENV}: expected a number of seconds, at least "
                         f"{MIN_LEASE_SECONDS:g} (got {value!r})")
    if seconds > MAX_LEASE_SECONDS:  # refused here, before a backfill or a chunk is written
        raise UsageError(f"{LEASE_ENV}: expected a number of seconds from "
                         f"{MIN_LEASE_SECONDS:g} to {MAX_LEASE_SECONDS:g} (got {value!r})")
    return seconds


def exit_status(summary: BackfillSummary) -> int:
    """0 all repaired; 1 something could not be repaired (newer target rows, cancelled);
    2 failed."""
    if summary.status is BackfillStatus.FAILED:
        return 2
    if summary.status is BackfillStatus.CANCELLED or summary.rows_skipped:
        return 1
    return 0


def cmd_backfill(config: Config, args: argparse.Namespace) -> int:
    from trueup.backfill.model import DEFAULT_CHUNK_ROWS
    from trueup.cli import to_json
    from trueup.progress import ProgressBar

    worker = WorkerOptions(workers=args.workers, lease_seconds=lease_seconds())
    bar = ProgressBar()

    def progress(chunks_done: int, chunks: int, rows_repaired: int, rows_per_s: float) -> None:
        bar("chunks", chunks_done, chunks, repaired=rows_repaired, rows_per_s=rows_per_s)

    try:
        if args.cancel:
            summary = cancel_backfill(config, args.cancel)
        elif args.resume:
            summary = resume_backfill(config, args.resume, worker, progress)
        else:
            scope = (BackfillScope.RUN if args.run else
                     BackfillScope.PARTITION if args.partition else BackfillScope.ALL)
            options = BackfillOptions(scope=scope, run_id=args.run, partition=args.partition,
                                      dry_run=args.dry_run,
                                      chunk_size=args.chunk_size or DEFAULT_CHUNK_ROWS,
                                      rate=args.rate, workers=args.workers,
                                      alongside=args.alongside)
            summary = start_backfill(config, args.name, options, worker, progress)
    finally:
        bar.close()
    if args.json:
        out = summary.to_json()
        print(to_json({k: out[k] for k in ("backfill_id", "reconciliation", "status", "chunks",
                                           "rows_planned", "rows_repaired", "rows_skipped",
                                           "seconds")}))
    else:
        dry = " (dry run: nothing written)" if summary.dry_run else ""
        print(f"backfill {summary.backfill_id} of {summary.reconciliation}: "
              f"{summary.status.value}{dry}, {summary.chunks_done}/{summary.chunks} chunks, "
              f"{summary.rows_planned} rows planned, {summary.rows_repaired} repaired, "
              f"{summary.rows_skipped} skipped, {summary.seconds:.2f} s")
    if summary.error:
        print(f"backfill {summary.backfill_id}: {summary.error}", file=sys.stderr)
    return exit_status(summary)


