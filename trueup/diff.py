"""``trueup diff``: find where a copy disagrees with its source, and record it as a run.

A whole-table run makes one checksum pass over each side, both sides at once, then reads rows
only in the segments whose checksums differ (see :mod:`trueup.segments`). A partition run (one
day of the source's ``updated_at``) reads that day's source rows in key batches and looks their
keys up in the target. Kafka targets are first brought up to date in their mirror table
(:mod:`trueup.mirror`), then compared like a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, closing
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from trueup import metrics, segments, threads, tracing
from trueup.config import Config, ReconciliationConfig
from trueup.db import connect, first_line, same_server, sendable
from trueup.errors import TrueupError, UsageError
from trueup.fingerprint import Kind, storage_type
from trueup.log import get_logger
from trueup.runs import (
    Difference,
    DifferenceWriter,
    RunSummary,
    fail_run,
    finish_run,
    json_value,
    start_run,
)
from trueup.sides import (
    SharedTypes,
    Side,
    day_filter,
    keys_refused,
    reconciled_types,
    require_utf8,
    table_side,
    version_order,
)
from trueup.state import open_state
from trueup.statuses import DifferenceClass

log = get_logger(__name__)

ALL_ROWS = sql.SQL("true")

#: Rows of a partition read per round trip (source keys looked up in the target at once).
PARTITION_BATCH_ROWS = 5_000

Progress = Callable[[str, int, int], None]  # (phase, done, total)


class DiffFailed(TrueupError):
    """A run could not finish; it is recorded as failed with this reason."""


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """Everything a run compares: the two sides and the rows each is restricted to."""

    source: Side
    target: Side
    source_where: sql.Composable
    target_where: sql.Composable
    in_flight_since: dt.datetime | None  # source rows updated after this are in flight

    @property
    def versioned(self) -> bool:
        """Both sides have a version to compare."""
        return self.source.version is not None and self.target.version is not None


_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_partition(rec: ReconciliationConfig, name: str, partition: str | None) -> dt.date | None:
    if partition is None:
        return None
    if rec.partitions is None:
        raise UsageError(f"reconciliation {name!r} has no partitions; drop --partition")
    try:
        # only YYYY-MM-DD: runs store the text as given, and fromisoformat also takes
        # 20260131 and 2026-W05-6, which status and lineage would then show
        if not _DAY.fullmatch(partition):
            raise ValueError(partition)
        day = dt.date.fromisoformat(partition)
    except ValueError:
        raise UsageError(f"--partition: expected a day like 2026-01-31 (got {partition!r})"
                         ) from None
    if day < rec.partitions.daily.start:
        raise UsageError(f"--partition: {partition} is before the first partition "
                         f"{rec.partitions.daily.start.isoformat()}")
    if day == dt.date.max:  # a day ends where the next begins, and Python has no next
        raise UsageError(f"--partition: {partition} is past the last day trueup can cut "
                         f"({(day - dt.timedelta(days=1)).isoformat()})")
    return day


def diff(config: Config, name: str, *, partition: str | None = None,
         on_difference: Callable[[Difference], None] | None = None,
         progress: Progress | None = None) -> RunSummary:
    """Run reconciliation ``name`` (optionally one partition) and record the run."""
    rec = config.reconciliation(name)
    day = parse_partition(rec, name, partition)
    started = time.monotonic()
    with open_state(config.state) as state, tracing.span(
            "diff", reconciliation=name, partition=partition) as span:
        run_id, started_at = start_run(state, name, partition)
        span.set_attribute("run_id", run_id)
        log.info("diff.started", reconciliation=name, run_id=run_id, partition=partition)
        try:
            summary = _run(config, name, rec, run_id, started_at, day, state, started,
                           on_difference or (lambda d: None), progress or (lambda *a: None))
        except BaseException as exc:  # Ctrl-C and a Dagster termination too: never left running
            reason = (str(exc) if isinstance(exc, TrueupError) else
                      first_line(exc) if isinstance(exc, Exception) else
                      f"interrupted ({type(exc).__name__})")
            metrics.DIFF_RUNS.labels(name, "failed").inc()
            _record_failure(config.state, run_id, reason, time.monotonic() - started)
            log.error("diff.failed", reconciliation=name, run_id=run_id, error=reason)
            if not isinstance(exc, Exception):
                raise
            # told with the run it failed (its id leads to `trueup status`), whatever failed
            raise DiffFailed(f"diff {name}: run {run_id} failed: {reason}") from exc
    metrics.record_diff(summary)
    log.info("diff.finished", reconciliation=name, run_id=run_id, seconds=summary.seconds,
             **{c.value: getattr(summary, c.value) for c in DifferenceClass})
    return summary


def cmd_diff(config: Config, args: argparse.Namespace) -> int:
    """``trueup diff NAME [--partition P] [--json] [--show]``."""
    from trueup.cli import EXIT_DIFFERENCES, EXIT_OK, to_json  # not for the Dagster location
    from trueup.progress import ProgressBar

    def show(difference: Any) -> None:
        if args.show:
            print(to_json(difference.to_json()), flush=True)

    bar = ProgressBar()
    try:
        summary = diff(config, args.name, partition=args.partition, on_difference=show,
                       progress=bar)
    finally:
        bar.close()
    if args.json:
        print(to_json(summary.to_json()))
    else:
        # --show's stdout holds its JSON lines only (scripts pipe it to jq): the summary then
        # goes to stderr, for the person watching
        out = sys.stderr if args.show else sys.stdout
        where = f" partition {summary.partition}" if summary.partition else ""
        counts = "  ".join(f"{c.value} {getattr(summary, c.value)}" for c in DifferenceClass)
        verdict = "consistent" if summary.consistent else "differences found"
        print(f"{summary.reconciliation}{where}: run {summary.run_id}, {summary.source_rows} "
              f"source rows, {summary.target_rows} target rows, {summary.seconds:.2f} s",
              file=out)
        print(f"  {counts}", file=out)
        print(f"  {verdict}", file=out)
    return EXIT_OK if summary.consistent else EXIT_DIFFERENCES


def _record_failure(state_dsn: str, run_id: int, reason: str, seconds: float) -> None:
    # A fresh connection: the run's own may be the one that broke.
    with connect(state_dsn, what="state") as conn:
        fail_run(conn, run_id, reason, seconds)


def _run(config: Config, name: str, rec: ReconciliationConfig, run_id: int,
         started_at: dt.datetime, day: dt.date | None, state: psycopg.Connection[Any],
         started: float, on_difference: Callable[[Difference], None],
         progress: Progress) -> RunSummary:
    writer = DifferenceWriter(state, run_id, name)
    with ExitStack() as stack:
        source_dsn = config.connections[rec.source.connection].postgres
        assert source_dsn is not None
        source_conn = stack.enter_context(connect(source_dsn, what="source",
                                                  application_name=f"trueup diff {name}"))
        unreadable: Callable[[], Iterator[Difference]] | None = None  # a mirror's, streamed
        sync_target: Callable[[], None] | None = None
        shared: SharedTypes | None = None  # a target table's types as compared
        if rec.target.topic is not None:
            from trueup import mirror

            source = _source_side(rec, source_dsn, source_conn)
            target_conn = stack.enter_context(connect(config.state, what="state",
                                                      application_name=f"trueup diff {name}"))
            shape = mirror.shape_of(name, rec, source)
            # the state renders the messages' fields as the source renders its columns
            require_utf8(target_conn, "state", [*shape.key_types, *shape.column_types])
            target = mirror.mirror_of(config, shape)

            sync_target = partial(mirror.sync_mirror, config, shape, rec.target.connection,
                                  target_conn, progress)
            unreadable = partial(mirror.unreadable, target_conn, shape)
        else:
            target_dsn = config.connections[rec.target.connection].postgres
            assert target_dsn is not None and rec.target.table is not None
            target_conn = stack.enter_context(connect(target_dsn, what="target",
                                                      application_name=f"trueup diff {name}"))
            source, target, shared = _table_sides(rec, source_conn, source_dsn, target_conn,
                                                  target_dsn)
        comparison = Comparison(
            source=source, target=target,
            source_where=day_filter(source, day),
            target_where=ALL_ROWS,
            in_flight_since=_in_flight_since(config, name, rec, started_at)
            if source.updated_at is not None else None,
        )
        if day is None:
            found = _compare_whole(comparison, source_conn, target_conn, progress,
                                   sync_target=sync_target)
        else:
            if sync_target is not None:
                sync_target()
            found = _compare_partition(comparison, source_conn, target_conn, progress)
        source_rows, target_rows = 0, 0
        try:
            for item in found:
                if isinstance(item, tuple):
                    source_rows, target_rows = item
                    continue
                writer.write([item])
                on_difference(item)
        except psycopg.errors.DataError as exc:
            refused = keys_refused(str(rec.target.table), shared.refusable_keys, exc) \
                if shared is not None else None
            if refused is None or not _keys_unreadable(target_conn, comparison.target):
                raise
            raise refused from exc
        # Unreadable messages belong to no day: every run lists those the mirror holds, so a
        # reconciliation run only by partitions (Dagster's) shows them too.
        for item in unreadable() if unreadable is not None else ():
            writer.write([item])
            on_difference(item)
        writer.flush()
    counts = {c.value: n for c, n in writer.counts.items()}
    summary = RunSummary(reconciliation=name, run_id=run_id,
                         partition=day.isoformat() if day else None, source_rows=source_rows,
                         target_rows=target_rows, seconds=round(time.monotonic() - started, 3),
                         **counts)
    finish_run(state, summary)
    return summary


def _in_flight_since(config: Config, name: str, rec: ReconciliationConfig,
                     started_at: dt.datetime) -> dt.datetime:
    """Source rows updated after this are in flight: within ``grace`` of the run's start, or
    of the first message the target's consumer has not consumed yet."""
    since = started_at - rec.grace
    consumer = rec.target.consumer
    if consumer is None:
        return since
    from trueup.lag import consumer_lag  # Kafka's imports, for these runs only

    lag = consumer_lag(config, consumer, what=f"reconciliations.{name}.target.consumer")
    log.info("diff.consumer_lag", reconciliation=name, topic=consumer.topic,
             group=consumer.group, offsets=lag.offsets,
             oldest=lag.oldest.isoformat() if lag.oldest else None)
    return since if lag.oldest is None else min(since, lag.oldest - rec.grace)


def _keys_unreadable(conn: psycopg.Connection[Any], side: Side) -> bool:
    """Whether reading ``side``'s keys as the types they are compared as fails: a run that
    failed on a value its types refuse blames the keys only then (a version column may have
    refused it). One scan of the keys, on a run that has failed already."""
    conn.rollback()  # the failed statement's transaction, if it was this connection's
    try:
        conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
            side.relation, sql.SQL(" OR ").join(sql.SQL("({}) IS NULL").format(k)
                                                for k in side.key)))
    except psycopg.errors.DataError:
        return True
    finally:
        conn.rollback()
    return False


def _source_side(rec: ReconciliationConfig, dsn: str, conn: psycopg.Connection[Any],
                 shared: SharedTypes | None = None) -> Side:
    """The source, read as its own types or, against a table, as the ``shared`` ones."""
    return table_side(label="source", dsn=dsn, table=rec.source.table, key=rec.source.key,
                      version=rec.source.version, columns=rec.source.columns,
                      updated_at=rec.source.updated_at,
                      as_types=shared.columns if shared else None,
                      key_as=shared.keys if shared else None,
                      version_as=shared.version if shared else None,
                      hashed_version=rec.target.version is not None, conn=conn)


def _table_sides(rec: ReconciliationConfig, source_conn: psycopg.Connection[Any],
                 source_dsn: str, target_conn: psycopg.Connection[Any],
                 target_dsn: str) -> tuple[Side, Side, SharedTypes]:
    """Both sides of a table-to-table run, each column read as the type both share (and
    those types)."""
    assert rec.target.table is not None
    shared, _ = reconciled_types(rec, source_conn, target_conn)
    source = _source_side(rec, source_dsn, source_conn, shared)
    target = table_side(label="target", dsn=target_dsn, table=rec.target.table,
                        key=rec.target.key, version=rec.target.version,
                        columns=[rec.target.columns[c] for c in rec.source.columns],
                        as_types=shared.columns, key_as=shared.keys,
                        version_as=shared.version, conn=target_conn)
    return source, target, shared


# ---------------------------------------------------------------------------------------------
# Whole table


def _compare_whole(c: Comparison, source_conn: psycopg.Connection[Any],
                   target_conn: psycopg.Connection[Any], progress: Progress, *,
                   sync_target: Callable[[], None] | None = None
                   ) -> Iterator[Difference | tuple[int, int]]:
    """Checksums of both sides, then the rows of the segments that differ. ``sync_target``
    (a Kafka mirror's sync) runs while the source's checksum pass does."""
    # a mirror is estimated as it was before this sync (a few new messages change little)
    rows = max(segments.estimate_rows(source_conn, c.source, c.source_where),
               segments.estimate_rows(target_conn, c.target, c.target_where,
                                      count_unknown=sync_target is None))
    plan = segments.plan_segments(source_conn, c.source, c.source_where, rows)
    passes = _Passes(c, source_conn, target_conn, progress,
                     parallel=not same_server(source_conn, target_conn))
    with threads.executor(2, "trueup-diff") as pool:
        source_sums, target_sums = passes.run(pool, plan, sync_target)
        source_total = sum(n for n, _ in source_sums.values())
        target_total = sum(n for n, _ in target_sums.values())
        if segments.too_coarse(plan, max(source_total, target_total)):
            # The estimates were far off (stale statistics, an empty source): cut again by the
            # true count, from the side that holds the rows, so no segment is read whole.
            if source_total >= target_total:
                plan = segments.plan_segments(source_conn, c.source, c.source_where,
                                              source_total)
            else:
                plan = segments.plan_segments(target_conn, c.target, c.target_where,
                                              target_total)
            log.info("diff.replanned", segments=plan.count, source_rows=source_total,
                     target_rows=target_total)
            source_sums, target_sums = passes.run(pool, plan, None)
        if segments.overfull(plan, source_sums, target_sums):
            # Cut where either side's keys lie, so no segment read holds a side's bulk.
            plan = segments.merged(
                segments.plan_segments(source_conn, c.source, c.source_where, source_total),
                segments.plan_segments(target_conn, c.target, c.target_where, target_total))
            log.info("diff.replanned", segments=plan.count, source_rows=source_total,
                     target_rows=target_total, reason="overfull segment")
            source_sums, target_sums = passes.run(pool, plan, None)
        yield source_total, target_total
        todo = segments.differing(source_sums, target_sums)
        log.info("diff.segments", segments=plan.count, differing=len(todo))
        progress("checksums", plan.count, plan.count)
        if todo and not plan.bounds:
            yield from _compare_streamed(c, source_conn, target_conn, pool, plan, todo,
                                         progress)
            return
        done = 0
        extra = _source_extra(c)
        for batch in segments.batches(todo, source_sums, target_sums):
            with tracing.span("diff.segments", segments=len(batch), first=batch[0],
                              last=batch[-1]):
                suspects = (_suspects(c, source_conn, target_conn, pool, plan, batch)
                            if passes.native else None)
                source_rows, target_rows = _both(
                    pool, (source_conn, partial(
                        segments.rows_in_segments, source_conn, c.source, c.source_where,
                        plan, batch, extra, keys=suspects)),
                    (target_conn, partial(
                        segments.rows_in_segments, target_conn, c.target, c.target_where,
                        plan, batch, keys=suspects)))
                found = _settled(c, source_conn, target_conn, list(_classified(
                    source_rows, target_rows, c.in_flight_since, orphans=True,
                    versioned=c.versioned)), orphans=True)
            yield from found
            done += len(batch)
            progress("segments", done, len(todo))


def _compare_streamed(c: Comparison, source_conn: psycopg.Connection[Any],
                      target_conn: psycopg.Connection[Any], pool: ThreadPoolExecutor,
                      plan: segments.Segmentation, todo: list[int],
                      progress: Progress) -> Iterator[Difference]:
    """The rows of the differing segments of a plan without key ranges (hash buckets, one
    segment): one scan of each side, ordered by segment and merged segment by segment. Read
    batch by batch, such plans would scan both tables once per batch: with every segment
    differing, tens of scans."""
    with ExitStack() as stack:
        source = stack.enter_context(closing(segments.segment_rows(
            source_conn, c.source, c.source_where, plan, todo, _source_extra(c))))
        target = stack.enter_context(closing(segments.segment_rows(
            target_conn, c.target, c.target_where, plan, todo)))
        # The first rows of each side come after its whole scan and sort: both at once.
        with tracing.span("diff.segments", segments=len(todo)):
            source_next = pool.submit(next, source, None)
            target_next = pool.submit(next, target, None)
            # both done before either's error goes up: the stack then closes a generator
            # still running on the other thread ("generator already executing"), whose
            # error would replace the first
            _wait_cancelling([(source_next, source_conn), (target_next, target_conn)])
            s, t = source_next.result(), target_next.result()
        done = 0
        # differences (and the rows they were found in) settled a few thousand at a time
        pending: list[tuple[Difference, dict[str, Any]]] = []
        while s is not None or t is not None:
            segment = min(item[0] for item in (s, t) if item is not None)
            source_rows = s[1] if s is not None and s[0] == segment else []
            target_rows = t[1] if t is not None and t[0] == segment else []
            pending.extend(_classified(source_rows, target_rows, c.in_flight_since,
                                       orphans=True, versioned=c.versioned))
            if len(pending) >= PARTITION_BATCH_ROWS:
                yield from _settled(c, source_conn, target_conn, pending, orphans=True)
                pending = []
            if source_rows:
                s = next(source, None)
            if target_rows:
                t = next(target, None)
            done += 1
            if done % 1000 == 0:
                progress("segments", done, len(todo))
        yield from _settled(c, source_conn, target_conn, pending, orphans=True)
        progress("segments", len(todo), len(todo))


@dataclass
class _Passes:
    """One checksum pass over each side, both at once."""

    c: Comparison
    source_conn: psycopg.Connection[Any]
    target_conn: psycopg.Connection[Any]
    progress: Progress
    parallel: bool  # parallel workers: not when both sides share the server's cores

    @property
    def native(self) -> bool:
        return self.c.source.native_hash is not None and self.c.target.native_hash is not None

    def run(self, pool: ThreadPoolExecutor, plan: segments.Segmentation,
            sync_target: Callable[[], None] | None
            ) -> tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]]]:
        """``(source, target)`` checksums; the target's pass follows ``sync_target``, with the
        server's cores to itself when the source's pass is done by then."""
        c = self.c
        with tracing.span("diff.checksums", segments=plan.count) as span:
            source_f = pool.submit(segments.checksums, self.source_conn, c.source,
                                   c.source_where, plan, native=self.native,
                                   parallel=self.parallel)
            running = [(source_f, self.source_conn)]
            try:
                if sync_target is not None:
                    sync_target()
                self.progress("checksums", 0, plan.count)
                target_f = pool.submit(segments.checksums, self.target_conn, c.target,
                                       c.target_where, plan, native=self.native,
                                       parallel=self.parallel or source_f.done())
                running.append((target_f, self.target_conn))
            except BaseException:
                _cancel(running)  # do not wait for a pass nobody will read
                raise
            _wait_cancelling(running)
            source, target = source_f.result(), target_f.result()
            span.set_attribute("differing", len(segments.differing(source, target)))
        return source, target


def _suspects(c: Comparison, source_conn: psycopg.Connection[Any],
              target_conn: psycopg.Connection[Any], pool: ThreadPoolExecutor,
              plan: segments.Segmentation, batch: list[int]) -> list[Any]:
    """The keys of the rows of ``batch`` that differ by their native row hash (or are on one
    side only): rendering and comparing the canonical rows is then done for those alone. In a
    differing segment of 64 rows, typically one or two."""
    source, target = _both(
        pool, (source_conn, partial(segments.row_hashes_in_segments, source_conn, c.source,
                                    c.source_where, plan, batch)),
        (target_conn, partial(segments.row_hashes_in_segments, target_conn, c.target,
                              c.target_where, plan, batch)))
    return [*(key for key, h in source.items() if target.get(key) != h),
            *(key for key in target.keys() - source.keys())]


def _both(pool: ThreadPoolExecutor,
          source: tuple[psycopg.Connection[Any], Callable[[], Any]],
          target: tuple[psycopg.Connection[Any], Callable[[], Any]]) -> tuple[Any, Any]:
    """The results of a query on each side, run at once (each ``(connection, call)``)."""
    running = [(pool.submit(call), conn) for conn, call in (source, target)]
    _wait_cancelling(running)
    return running[0][0].result(), running[1][0].result()


def _wait_cancelling(running: list[tuple[Future[Any], psycopg.Connection[Any]]]) -> None:
    """Wait until every future is done. Interrupted (Ctrl-C, SIGTERM), or one of them failed,
    the queries still running are cancelled first: the pool's shutdown, and the connections'
    close, would otherwise wait for the server to finish them (minutes on a big table), and a
    second Ctrl-C would close a connection another thread is in a transaction on."""
    try:
        done, _ = wait([f for f, _ in running], return_when=FIRST_EXCEPTION)
        if any(f.exception() is not None for f in done):
            _cancel(running)
    except BaseException:
        _cancel(running)
        raise


def _cancel(running: list[tuple[Future[Any], psycopg.Connection[Any]]]) -> None:
    """Cancel the query of each future not done, and wait until all are."""
    for future, conn in running:
        if not future.done():
            try:
                conn.cancel_safe()  # thread-safe: its own connection to the server
            except psycopg.Error as exc:  # the server is gone: its query with it
                log.warning("diff.cancel_failed", error=first_line(exc))
    wait([f for f, _ in running])


def _source_extra(c: Comparison) -> list[sql.Composable]:
    if c.source.updated_at is None:
        return []
    # timestamptz whatever the column is (a timestamp or a date reads as UTC): compared with
    # the run's start, an aware time
    return [sql.SQL("({})::timestamptz AS updated_at").format(c.source.updated_at)]


# ---------------------------------------------------------------------------------------------
# One partition


def _compare_partition(c: Comparison, source_conn: psycopg.Connection[Any],
                       target_conn: psycopg.Connection[Any],
                       progress: Progress) -> Iterator[Difference | tuple[int, int]]:
    columns = _source_columns(c)
    source_rows = target_rows = 0
    # A named (server-side) cursor streams the day in batches: memory stays bounded.
    with source_conn.cursor(name="trueup_partition") as cur:
        cur.itersize = PARTITION_BATCH_ROWS
        cur.execute(sql.SQL("SELECT {} FROM {} WHERE {}").format(
            columns, c.source.relation, c.source_where))
        while batch := cur.fetchmany(PARTITION_BATCH_ROWS):
            with tracing.span("diff.partition_batch", rows=len(batch)):
                found = _target_rows_for(target_conn, c.target, batch)
                differences = _settled(c, source_conn, target_conn, list(_classified(
                    batch, found, c.in_flight_since, orphans=False, versioned=c.versioned)),
                    orphans=False)
            source_rows += len(batch)
            target_rows += len(found)
            yield from differences
            progress("rows", source_rows, 0)
    yield (source_rows, target_rows)


def _compared_columns(side: Side, extra: list[sql.Composable] | None = None) -> sql.Composable:
    """What a row of ``side`` is compared by: its key (canonical text, and values to look it
    up by: an orphan is reported by them), version and fingerprint, then ``extra``."""
    return sql.SQL(", ").join([
        sql.SQL("{} AS key_text").format(side.key_text),
        *[sql.SQL("{} AS {}").format(segments.key_value(k, t), sql.Identifier(f"k{i}"))
          for i, (k, t) in enumerate(zip(side.key, side.key_types, strict=True))],
        sql.SQL("{} AS version").format(side.version or sql.NULL),
        sql.SQL("{} AS fingerprint").format(side.fingerprint),
        *(extra or []),
    ])


def _source_columns(c: Comparison) -> sql.Composable:
    """A source row's :func:`_compared_columns`, with its ``updated_at``."""
    return _compared_columns(c.source, _source_extra(c))


def _settled(c: Comparison, source_conn: psycopg.Connection[Any],
             target_conn: psycopg.Connection[Any],
             found: list[tuple[Difference, dict[str, Any]]], *,
             orphans: bool) -> list[Difference]:
    """The differences ``found`` (each with the row it was found in), those not in flight
    compared again from the rows as they are now. Each side was read at its own moment (a
    partition's cursor reads the day as it was when the run began; a whole-table run reads
    both sides at once, each on its connection): a row updated and copied between the two
    reads paired its old source row, whose ``updated_at`` is not in flight, with its new
    copy, and was ``ahead``.

    Read again, the target first: a copy follows its source, so the source read after it is
    at least as new. A row updated in between is then newer in the source, and in flight
    (updated after the run began); read the other way round, an update copied between the
    two reads pairs the old source row with its new copy again. A partition's row that left
    the day, or the source, is no longer its own (``orphans``: a whole-table run reports
    the target rows left without a source row)."""
    # (a NULL key, which a target's unique index lets in, is looked up by no key: kept)
    again = [(d, row) for d, row in found
             if d.cls is not DifferenceClass.IN_FLIGHT and None not in d.key]
    if not again:
        return [d for d, _ in found]
    suspects = {json.dumps(d.key) for d, _ in again}
    rows = [row for _, row in again]  # one per key: the source's, the target's for an orphan
    target_rows = _target_rows_for(target_conn, c.target, rows)
    source_rows = _rows_by_key(source_conn, c.source, rows, _source_columns(c), c.source_where)
    return [*(d for d, _ in found if json.dumps(d.key) not in suspects),
            *classify(source_rows, target_rows, c.in_flight_since, orphans=orphans,
                      versioned=c.versioned)]


def _target_rows_for(conn: psycopg.Connection[Any], target: Side,
                     batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The target rows whose keys are in ``batch`` (one query, joined on unnested keys)."""
    return _rows_by_key(conn, target, batch, _compared_columns(target))


def _rows_by_key(conn: psycopg.Connection[Any], side: Side, batch: list[dict[str, Any]],
                 select: sql.Composable, where: sql.Composable = ALL_ROWS
                 ) -> list[dict[str, Any]]:
    """``select`` of the rows of ``side`` whose keys are those of ``batch``'s rows (their
    ``k0``, ``k1``...; one query, joined on unnested keys), ``where`` they also meet."""
    # Keys travel as built-in types: a mirror's database has none of the source's enums.
    stored = [storage_type(t) for t in side.key_types]
    wanted = [sql.SQL("%(k{})s::{}[]").format(sql.SQL(str(i)), s) for i, s in enumerate(stored)]
    names = [sql.Identifier(f"k{i}") for i in range(len(side.key))]
    on = sql.SQL(" AND ").join(
        sql.SQL("{} = trueup_keys.{}").format(
            k if s.as_string(None) == sql.Identifier(t.name).as_string(None)
            else sql.SQL("({})::{}").format(k, s), n)
        for k, t, s, n in zip(side.key, side.key_types, stored, names, strict=True))
    # Each key's rows in a subquery over the relation alone, and ``select`` and ``where`` over
    # those rows alone: no name of trueup's shares a scope with the relation's columns (a key
    # named trueup_k0, a table named u). The plan is the join's: an index probe per key.
    query = sql.SQL(
        "SELECT {select} FROM (SELECT trueup_rows.* FROM unnest({arrays}) "
        "AS trueup_keys ({names}) CROSS JOIN LATERAL (SELECT * FROM {rel} WHERE {on}) "
        "AS trueup_rows) AS trueup_rows WHERE {where}"
    ).format(select=select, arrays=sql.SQL(", ").join(wanted),
             names=sql.SQL(", ").join(names), rel=side.relation, on=on, where=where)
    # (a char(n) key comes as its text, unpadded: see segments.key_value)
    # a JSON key is read back as Python's values: sent as jsonb again
    params = {f"k{i}": sendable([Jsonb(row[f"k{i}"]) if t.kind is Kind.JSON
                                 and row[f"k{i}"] is not None else row[f"k{i}"]
                                 for row in batch])
              for i, t in enumerate(side.key_types)}
    with conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall()


# ---------------------------------------------------------------------------------------------
# Classification


def classify(source_rows: list[dict[str, Any]], target_rows: list[dict[str, Any]],
             in_flight_since: dt.datetime | None, *, orphans: bool,
             versioned: bool) -> Iterator[Difference]:
    """The differences between two sets of rows of the same key range. ``versioned``: both
    sides have a version (a side without one reads as NULL versions)."""
    return (d for d, _ in _classified(source_rows, target_rows, in_flight_since,
                                      orphans=orphans, versioned=versioned))


def _classified(source_rows: list[dict[str, Any]], target_rows: list[dict[str, Any]],
                in_flight_since: dt.datetime | None, *, orphans: bool,
                versioned: bool) -> Iterator[tuple[Difference, dict[str, Any]]]:
    """:func:`classify`'s differences, each with the row that gives its key (the source's,
    the target's for an orphan): what :func:`_settled` reads it again by."""
    target_by_key = {r["key_text"]: r for r in target_rows}
    for s in source_rows:
        t = target_by_key.pop(s["key_text"], None)
        cls = _class_of(s, t, versioned)
        if cls is None:
            continue
        changed = s.get("updated_at")
        if in_flight_since is not None and changed is not None and changed > in_flight_since:
            cls = DifferenceClass.IN_FLIGHT
        yield Difference(
            key=_key_of(s), cls=cls, source_version=json_value(s["version"]),
            target_version=json_value(t["version"]) if t else None,
            source_fingerprint=s["fingerprint"], target_fingerprint=t["fingerprint"] if t else None,
        ), s
    if orphans:
        for t in target_by_key.values():
            yield Difference(key=_key_of(t), cls=DifferenceClass.ORPHAN,
                             target_version=json_value(t["version"]),
                             target_fingerprint=t["fingerprint"]), t


def _class_of(s: dict[str, Any], t: dict[str, Any] | None,
              versioned: bool) -> DifferenceClass | None:
    if t is None:
        return DifferenceClass.MISSING
    sv, tv = version_order(s["version"]), version_order(t["version"])
    if versioned and sv != tv:
        # A NULL version is older than any, as the upsert's guard takes it: a target row
        # without one is overwritten, a source row without one overwrites nothing.
        if sv is None:
            return DifferenceClass.AHEAD
        return DifferenceClass.STALE if tv is None or tv < sv else DifferenceClass.AHEAD
    if s["fingerprint"] != t["fingerprint"]:
        return DifferenceClass.MISMATCH
    return None


def _key_of(row: dict[str, Any]) -> list[Any]:
    values = []
    i = 0
    while f"k{i}" in row:
        values.append(json_value(row[f"k{i}"]))
        i += 1
    return values
