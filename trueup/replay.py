"""``trueup replay``: move dead letters back where they came from, losing none.

For each batch of letters the replayer decides (:func:`plan`) to move a letter to its
destination (``replay_to``, else its origin), to park it (already at ``max_attempts``), or to
keep it (filtered out by ``--where``, nowhere to go). It publishes the copies, waits until the
broker confirmed every one, records them in ``trueup.replay_events``, and only then removes the
letters from the dead-letter queue (Kafka commit, RabbitMQ ack). A kill -9 at any point leaves
every letter in its destination or still in the queue; one confirmed but not yet recorded and
removed is sent again by the next replay (at least once). A letter already recorded as moved is
recognised by its id and not sent again.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import psycopg
from opentelemetry.trace import SpanKind

from trueup import metrics, threads, tracing
from trueup.collection import batch_loop
from trueup.config import Config, DeadLetterConfig
from trueup.db import first_line
from trueup.errors import Conflict, ConnectionFailed, NotFound, StateError
from trueup.fates import Plan, plan
from trueup.health import HEALTH
from trueup.letterboxes import Letterbox, LettersRefused, Received, Settle, open_letterbox
from trueup.letters import DeadLetter, Destination, LetterFilter
from trueup.log import get_logger
from trueup.pacing import Pacer
from trueup.queries import query
from trueup.retry import RetryPolicy
from trueup.state import open_state
from trueup.statuses import ReplayOutcome, ReplayStatus

log = get_logger(__name__)

BATCH_SIZE = 1000
#: A paced batch is read at most this many seconds of letters ahead: RabbitMQ closes a channel
#: whose delivery stays unacknowledged past its consumer_timeout (30 min by default).
PACED_BATCH_SECONDS = 300
#: How often a paced batch checks that its session still holds the replay's lock.
HOLD_CHECK_SECONDS = 5.0
RECONNECT_ATTEMPTS = 20            # a broker restart takes seconds; give up after ~1.5 min
RECONNECT_MAX_PAUSE_SECONDS = 5.0

Listing = Callable[[DeadLetter, "Plan"], None]
#: ``progress(letters_done, letters_total)`` after each batch (total: the depth at the start).
Progress = Callable[[int, int], None]


@dataclass(frozen=True, kw_only=True)
class ReplayOptions:
    max_messages: int | None = None
    rate: float | None = None          # letters moved or parked per second
    dry_run: bool = False
    where: str | None = None
    batch_size: int = BATCH_SIZE


@dataclass(frozen=True, kw_only=True)
class ReplaySummary:
    replay_id: int
    name: str
    dry_run: bool
    moved: int
    parked: int
    skipped: int
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {"replay_id": self.replay_id, "name": self.name, "dry_run": self.dry_run,
                "moved": self.moved, "parked": self.parked, "skipped": self.skipped,
                "seconds": round(self.seconds, 3)}


@dataclass(kw_only=True)
class _Counts:
    moved: int = 0
    parked: int = 0
    skipped: int = 0
    sent_or_planned: int = 0
    seen: int = 0             # letters looked at (progress)
    connected: bool = False   # the letterbox was opened once: later failures are outages


def replay(config: Config, name: str, options: ReplayOptions = ReplayOptions(), *,
           listing: Listing | None = None, progress: Progress | None = None) -> ReplaySummary:
    """Replay the dead letters of ``name``; see the module docstring for the guarantees.

    ``progress`` is told after each batch how many letters were looked at, of how many."""
    dlq = config.dead_letter(name)
    selection = LetterFilter.parse(options.where)
    started = time.monotonic()
    with _state(config) as conn:
        _lock(conn, name)
        try:
            with conn.transaction():
                abandoned = conn.execute(query("abandon_replays"), {"name": name}).fetchall()
                row = conn.execute(query("start_replay"), {
                    "name": name, "dry_run": options.dry_run, "filter": selection.text or None,
                    "max_messages": options.max_messages, "rate": options.rate}).fetchone()
            assert row is not None
            replay_id = int(row["replay_id"])
            if abandoned:
                log.warning("replay.abandoned_marked_failed", name=name,
                            replay_ids=[r["replay_id"] for r in abandoned])
            log.info("replay.started", name=name, replay_id=replay_id, dry_run=options.dry_run)
            counts = _Counts()
            pacer = Pacer(options.rate)  # one for the whole replay: a reconnect keeps the pace
            try:
                with batch_loop():
                    _with_reconnects(lambda: _run(config, name, dlq, selection, options, conn,
                                                  replay_id, counts, listing, progress, pacer),
                                     counts)
            except BaseException as exc:
                _finish_failed(config, conn, replay_id, time.monotonic() - started,
                               f"{type(exc).__name__}: {exc}")
                raise
            seconds = time.monotonic() - started
            _finish(conn, replay_id, ReplayStatus.SUCCEEDED, seconds, None)
        finally:
            if not conn.broken:  # a session gone took its lock with it
                conn.execute(query("replay_unlock"), {"name": name})
    summary = ReplaySummary(replay_id=replay_id, name=name, dry_run=options.dry_run,
                            moved=counts.moved, parked=counts.parked, skipped=counts.skipped,
                            seconds=seconds)
    log.info("replay.finished", **summary.as_json())
    return summary


@contextlib.contextmanager
def _state(config: Config) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    conn = open_state(config.state)
    conn.autocommit = True  # each batch is its own transaction; no session idles in one
    try:
        yield conn
    finally:
        conn.close()


def _lock(conn: psycopg.Connection[dict[str, Any]], name: str) -> None:
    row = conn.execute(query("replay_lock"), {"name": name}).fetchone()
    if not row or not row["locked"]:
        raise Conflict(f"dead_letters.{name}: another replay or dry run of this queue is "
                       f"running; wait for it to finish")


def _hold(conn: psycopg.Connection[dict[str, Any]], name: str) -> None:
    """Check, before each batch, that the session holding the replay's lock is still there:
    a session gone (a failover, ``idle_session_timeout``, a network cut) took the lock with
    it, and another replay of the queue may have started. The replay then stops within a
    batch, rather than send every letter the other one sends too."""
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        raise Conflict(f"dead_letters.{name}: the state database's session holding this "
                       f"replay's lock was lost ({first_line(exc)}); another replay of the "
                       f"queue may have started, so this one stops") from exc


def _finish_failed(config: Config, conn: psycopg.Connection[dict[str, Any]], replay_id: int,
                   seconds: float, error: str) -> None:
    """Record the replay failed, on a session of its own when the replay's is gone."""
    if not conn.broken:
        _finish(conn, replay_id, ReplayStatus.FAILED, seconds, error)
        return
    with contextlib.suppress(StateError), _state(config) as fresh:
        # StateError: another replay, started after the lock was lost, marked it abandoned
        _finish(fresh, replay_id, ReplayStatus.FAILED, seconds, error)


def _finish(conn: psycopg.Connection[dict[str, Any]], replay_id: int, status: ReplayStatus,
            seconds: float, error: str | None) -> None:
    row = conn.execute(query("finish_replay"), {
        "replay_id": replay_id, "status": status.value, "seconds": seconds,
        "error": error}).fetchone()
    if row is None:
        raise StateError(f"replay {replay_id} was no longer running when it finished")


def _batch_size(options: ReplayOptions) -> int:
    """Letters read per batch: a paced replay reads no more than it sends within
    ``PACED_BATCH_SECONDS``, so no letter waits unacknowledged for its batch past RabbitMQ's
    consumer timeout."""
    if not options.rate or options.dry_run:
        return options.batch_size
    # in floats first: a rate of 1e306 letters a second is finite, its product is not
    return max(1, int(min(float(options.batch_size), options.rate * PACED_BATCH_SECONDS)))


def _with_reconnects(session: Callable[[], None], counts: _Counts) -> None:
    """Run ``session``; after a lost broker connection, run it again (it resumes: letters
    already moved are recognised, those not yet removed are still in the queue). A broker that
    cannot be reached at the start is an error at once, and so is a copy the broker refused
    (a missing exchange, access refused: ``RabbitFailed``): trying again changes nothing."""
    from trueup.brokers.rabbitmq import CONNECTION_ERRORS

    outages: tuple[type[BaseException], ...] = (ConnectionFailed, *CONNECTION_ERRORS)
    pause = 0.5
    for attempt in range(1, RECONNECT_ATTEMPTS + 1):
        try:
            session()
            return
        except outages as exc:
            if attempt == RECONNECT_ATTEMPTS or not counts.connected:
                raise
            log.warning("replay.reconnecting", attempt=attempt,
                        error=f"{type(exc).__name__}: {exc}", pause_seconds=pause)
            time.sleep(pause)
            pause = min(RECONNECT_MAX_PAUSE_SECONDS, pause * 2)


def _run(config: Config, name: str, dlq: DeadLetterConfig, selection: LetterFilter,
         options: ReplayOptions, conn: psycopg.Connection[dict[str, Any]], replay_id: int,
         counts: _Counts, listing: Listing | None, progress: Progress | None,
         pacer: Pacer) -> None:
    with contextlib.ExitStack() as closing:
        box = open_letterbox(config, name)
        closing.callback(box.close)  # last: after the recorder's, even when that one fails
        counts.connected = True
        # --max counts what is sent: after a reconnect, the letters whose copies were recorded
        # (a letter counted as it was sent, its copy never confirmed, is read and sent again)
        counts.sent_or_planned = counts.moved + counts.parked
        # After a reconnect the letters not yet removed are read again: the total grows by them.
        total = counts.seen + box.depth() if progress is not None else 0
        recorder = _Recorder(config.state)
        closing.callback(recorder.close)
        step = _Step(name=name, box=box, dlq=dlq, selection=selection, options=options, conn=conn,
                     replay_id=replay_id, counts=counts, listing=listing, recorder=recorder,
                     planner=_Planner(dlq, RetryPolicy.from_config(dlq), options.dry_run),
                     pacer=pacer)
        if dlq.replay_to is not None:  # before a letter moves (a dry run tells it too)
            box.require(Destination(name=dlq.replay_to.name, exchange=dlq.replay_to.exchange,
                                    routing_key=dlq.replay_to.routing_key))
        if not options.dry_run and dlq.parking is not None:
            box.prepare(Destination(name=dlq.parking))
        batches = box.letters(batch_size=_batch_size(options), take=not options.dry_run)
        with contextlib.closing(batches):
            try:
                # Kafka: the next batch is read, and its lookup asked, before this one is
                # handled, and the batch before is finished (confirmed) only after that read:
                # the broker confirms and Postgres answers while Python reads. A prefetch
                # window (RabbitMQ) delivers the next batch only after this one is settled.
                ahead = 0 if box.confirms_each_publish else 1
                for batch, lookup in _ahead(batches, ahead, lambda batch: recorder.lookup(
                        box.name, replay_id, batch)):
                    _hold(conn, name)
                    step.finish()
                    reached_max = step.send(batch, lookup)
                    counts.seen += len(batch)
                    if progress is not None:
                        progress(min(counts.seen, total), total)
                    if reached_max:
                        break
                    if box.confirms_each_publish:
                        # Nothing to overlap (each publish waited for its confirm), and the
                        # prefetch window needs the acks before it delivers the next batch.
                        step.finish()
                        step.drain()
                step.finish()
                step.drain()  # the last batch (after --max: before the generator is closed)
            except BaseException:
                # The letters handled before the failure (those of the batch that failed too,
                # up to the letter that failed: see _Step.send) are confirmed, recorded, then
                # removed, each step only if the one before it succeeded (else they are read
                # again and recognised); before the generator is closed, which puts back
                # every RabbitMQ letter not acked.
                with contextlib.suppress(Exception):
                    step.finish()
                with contextlib.suppress(Exception):
                    step.drain()
                raise


def _ahead(batches: Iterator[list[Received]], ahead: int,
           lookup: Callable[[list[Received]], Future[_Lookup]]
           ) -> Iterator[tuple[list[Received], Future[_Lookup]]]:
    """Each batch with its ``lookup``, asked when the batch is read, ``ahead`` batches before
    it is handed out."""
    read: list[tuple[list[Received], Future[_Lookup]]] = []
    for batch in batches:
        read.append((batch, lookup(batch)))
        if len(read) > ahead:
            yield read.pop(0)
    yield from read


@dataclass(frozen=True, kw_only=True)
class _Lookup:
    """What ``trueup.replay_events`` holds of a batch's ids (see :meth:`_Recorder.lookup`)."""

    # id -> the newest replay of the queue that moved or parked it, and when it last was
    replayed: dict[str, tuple[int, dt.datetime]]
    recorded: frozenset[str]   # ids this replay recorded


@dataclass(frozen=True, kw_only=True)
class _Sent:
    """A batch whose copies are published and not yet confirmed."""

    items: list[Received]
    plans: list[Plan]
    events: list[tuple[DeadLetter, Plan]]    # to record: each id once in a replay
    upgrades: list[tuple[DeadLetter, Plan]]  # ids recorded before as not sent, sent now


@dataclass(frozen=True, kw_only=True)
class _Done:
    """What a sent batch did, as far as a lookup may not have seen it yet."""

    sent_ids: frozenset[str]
    event_ids: frozenset[str]


@dataclass(frozen=True, kw_only=True)
class _Pending:
    """A batch whose copies are confirmed and whose events are being recorded; it is settled
    (committed, acked) only once the record is in Postgres."""

    items: list[Received]
    settles: list[Settle]
    recorded: Future[tuple[int, int, int]]


class _Recorder:
    """Writes batches to ``trueup.replay_events``, and looks up which letters earlier replays
    moved, on a connection and thread of its own: Postgres records batch *k* while the broker
    takes and confirms batch *k+1*.

    One thread, so requests run in the order they were made: a lookup asked after batch *k* was
    submitted sees batch *k* recorded (the replay loop relies on it, see :meth:`_Step.send`).
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.executor = threads.executor(1, "trueup-replay")
        self.conn: psycopg.Connection[dict[str, Any]] | None = None

    def submit(self, replay_id: int, events: list[tuple[DeadLetter, Plan]], plans: list[Plan],
               upgrades: list[tuple[DeadLetter, Plan]]) -> Future[tuple[int, int, int]]:
        return self.executor.submit(self._record, replay_id, events, plans, upgrades)

    def lookup(self, name: str, replay_id: int, batch: list[Received]) -> Future[_Lookup]:
        """What replays of queue ``name`` recorded of the letters of ``batch``, replay
        ``replay_id`` (the running one) included, as far as submitted for recording."""
        return self.executor.submit(self._lookup, name, replay_id, batch)

    def _connection(self) -> psycopg.Connection[dict[str, Any]]:
        if self.conn is None:
            self.conn = open_state(self.dsn, migrate_schema=False)
            self.conn.autocommit = True
        return self.conn

    def _record(self, replay_id: int, events: list[tuple[DeadLetter, Plan]], plans: list[Plan],
                upgrades: list[tuple[DeadLetter, Plan]]) -> tuple[int, int, int]:
        return _record(self._connection(), replay_id, events, plans, upgrades)

    def _lookup(self, name: str, replay_id: int, batch: list[Received]) -> _Lookup:
        ids = list({item.letter.message_id for item in batch})
        rows = self._connection().execute(query("last_replayed"), {
            "message_ids": json.dumps(ids), "name": name, "replay_id": replay_id}).fetchall()
        return _Lookup(
            replayed={row["message_id"]: (int(row["replay_id"]), row["moved_at"])
                      for row in rows if row["replay_id"] is not None},
            recorded=frozenset(row["message_id"] for row in rows if row["recorded_here"]))

    def close(self) -> None:
        def close_conn() -> None:
            if self.conn is not None:
                self.conn.close()
        try:
            self.executor.submit(close_conn).result()
        finally:
            self.executor.shutdown(wait=True)


def _moved_copy_of(letter: DeadLetter, replay_id: int, moved_at: dt.datetime) -> int | None:
    """``replay_id`` when that replay's move of this id may have been this very letter (left
    behind by a process stopped before removing it); None when the letter failed after the
    move: another message under a reused id (a Kafka topic created again restarts the offsets
    its ids default to), which must be moved too."""
    if letter.failed_at is not None and letter.failed_at > moved_at:
        return None
    return replay_id


class _Planner:
    """:func:`plan` for every letter, sharing one :class:`Plan` among letters with the same
    fate (most letters of a queue have the same one)."""

    def __init__(self, dlq: DeadLetterConfig, policy: RetryPolicy, dry_run: bool) -> None:
        self.dlq, self.policy, self.dry_run = dlq, policy, dry_run
        self.memo: dict[tuple[bool, int, int, str | None], Plan] = {}

    def __call__(self, letter: DeadLetter, *, selected: bool, replayed_by: int | None) -> Plan:
        already = replayed_by is not None and replayed_by > letter.generation
        exhausted = self.policy.exhausted(letter.attempts)
        key = (selected, replayed_by if already and replayed_by is not None else -1,
               letter.attempts if exhausted else -1, letter.origin)
        found = self.memo.get(key)
        if found is None:
            found = self.memo[key] = plan(letter, self.dlq, selected=selected,
                                          replayed_by=replayed_by if already else None,
                                          dry_run=self.dry_run, policy=self.policy)
        return found


@dataclass(kw_only=True)
class _Step:
    """Moves one batch after another: decide, publish, confirm, then record (in the
    background) and settle the batch before it."""

    name: str
    box: Letterbox
    dlq: DeadLetterConfig
    selection: LetterFilter
    options: ReplayOptions
    conn: psycopg.Connection[dict[str, Any]]
    replay_id: int
    counts: _Counts
    listing: Listing | None
    recorder: _Recorder
    planner: _Planner
    pacer: Pacer
    sent: _Sent | None = None
    pending: _Pending | None = None
    #: The last two batches sent: recorded or not, a lookup may not have seen them.
    recent: deque[_Done] = field(default_factory=lambda: deque(maxlen=2))
    #: When a paced batch (minutes of letters) checks its lock again (time.monotonic())
    next_hold: float = 0.0
    #: The origins a dry run found (see :meth:`_check_origin`).
    checked: set[Destination] = field(default_factory=set)

    def _wait(self, seconds: float) -> None:
        """The pacer's wait; a paced batch lasts minutes, so the lock is checked as it goes
        too (see :func:`_hold`), at most every :data:`HOLD_CHECK_SECONDS`."""
        self.box.wait(seconds)
        if time.monotonic() >= self.next_hold:
            _hold(self.conn, self.name)
            self.next_hold = time.monotonic() + HOLD_CHECK_SECONDS

    def send(self, batch: list[Received], lookup: Future[_Lookup]) -> bool:
        """Decide and publish one batch, after :meth:`finish` of the batch before
        (``lookup``: what replays recorded of its ids, see :meth:`_Recorder.lookup`); True
        when ``--max`` is reached."""
        assert self.sent is None, "finish() the batch before"
        options, counts, replay_id = self.options, self.counts, self.replay_id
        found = lookup.result()
        replayed = found.replayed
        # What this replay did that the lookup may have missed: the two batches before and
        # this one. On Kafka the lookup was asked once the batch three before this one was
        # submitted for recording (the next batch is read before the one before it is
        # finished), and it ran after that record on the recorder's one thread; on RabbitMQ it
        # saw every batch before.
        in_flight: set[str] = set().union(*(d.sent_ids for d in self.recent))
        recorded = set(found.recorded).union(*(d.event_ids for d in self.recent))
        plans: list[Plan] = []
        events: list[tuple[DeadLetter, Plan]] = []
        event_at: dict[str, int] = {}  # id -> its event in this batch
        upgrades: list[tuple[DeadLetter, Plan]] = []
        sent: list[tuple[Received, Plan]] = []
        limit = options.max_messages
        selection = self.selection.matches if self.selection.tests else None
        publish = None if options.dry_run else self.box.publish
        # A dry run asks for each origin a letter would go to, as the publish would: it stops
        # where the replay would (replay_to was asked for before the first batch).
        check = self._check_origin if options.dry_run and self.dlq.replay_to is None else None
        pace = self.pacer if self.pacer.rate else None
        wait = self._wait
        # With tracing off a span would only make the letter's trace current, and its copy
        # carries that trace in its own headers anyway: skip it (a few us a letter).
        traced = tracing.enabled()
        try:
            # Decided and published in one pass: the fate of a letter depends on the lookup
            # above and on the letters before it, never on those after it.
            for item in batch:
                letter = item.letter
                if limit is not None and counts.sent_or_planned >= limit:
                    plans.append(_UNTOUCHED)
                    continue
                message_id = letter.message_id
                if message_id in in_flight:
                    replayed_by: int | None = replay_id
                else:
                    moved = replayed.get(message_id)
                    replayed_by = None if moved is None else _moved_copy_of(letter, *moved)
                chosen = self.planner(
                    letter, selected=selection is None or selection(letter),
                    replayed_by=replayed_by)
                if check is not None and chosen.outcome is ReplayOutcome.WOULD_MOVE:
                    check(letter, chosen)
                if chosen.counts_toward_max:
                    counts.sent_or_planned += 1
                if self.listing is not None and chosen.outcome is not None:
                    self.listing(letter, chosen)
                if chosen.sends:
                    in_flight.add(message_id)
                    if publish is not None:
                        assert chosen.destination is not None
                        if pace is not None:
                            pace(sleep=wait)
                        try:
                            if traced:
                                with tracing.message_span(
                                        "replay.publish", letter.headers,
                                        kind=SpanKind.PRODUCER, dead_letters=self.box.name,
                                        replay_id=replay_id,
                                        destination=chosen.destination_text):
                                    publish(item, chosen.destination, replay_id=replay_id)
                            else:
                                publish(item, chosen.destination, replay_id=replay_id)
                        except NotFound as exc:
                            if self.dlq.replay_to is not None or letter.origin is None:
                                raise
                            raise _origin_gone(exc, letter) from exc
                        sent.append((item, chosen))
                # After its publish: an event is a letter handled, never one whose copy failed.
                if chosen.outcome is None:
                    pass
                elif message_id not in recorded:
                    recorded.add(message_id)  # one event per id in a replay: the first ...
                    event_at[message_id] = len(events)
                    events.append((letter, chosen))
                elif chosen.sends:
                    # ... unless a later copy of the id is the one sent (the first was skipped:
                    # moved by an older replay, or kept): the event must say so, or later copies
                    # are not known as replayed by this one. (A copy this replay made, read
                    # again, is sent too: its event then names that copy's fate.)
                    if message_id in event_at:
                        events[event_at[message_id]] = (letter, chosen)
                    else:
                        upgrades.append((letter, chosen))
                plans.append(chosen)  # last: the letters with a plan are those handled
        except BaseException:
            if plans:
                # The letters handled before the failure are a batch of their own, which the
                # caller finishes before it raises (see _run): confirmed, recorded, then
                # removed, so the next replay neither reads them again nor sends them twice.
                # The letter that failed and those after it stay in the queue.
                self.sent = _Sent(items=batch[:len(plans)], plans=plans, events=events,
                                  upgrades=upgrades)
            raise
        self.sent = _Sent(items=batch, plans=plans, events=events, upgrades=upgrades)
        self.recent.append(_Done(sent_ids=frozenset(i.letter.message_id for i, _ in sent),
                                 event_ids=frozenset(event_at)))
        return limit is not None and counts.sent_or_planned >= limit

    def _check_origin(self, letter: DeadLetter, chosen: Plan) -> None:
        """Refuse, in a dry run, a letter's origin that does not exist (as its publish would),
        asking the broker once for each origin."""
        destination = chosen.destination
        if destination is None or destination in self.checked:
            return
        try:
            self.box.require(destination)
        except NotFound as exc:
            raise _origin_gone(exc, letter) from exc
        self.checked.add(destination)

    def finish(self) -> None:
        """Settle the batch before the sent one, wait until the broker confirmed the sent
        one's copies, and submit it for recording (it is settled once recorded)."""
        sent, self.sent = self.sent, None
        if sent is None:
            return
        self.drain()  # the batch before: recorded, then settled (in order)
        refused: LettersRefused | None = None
        if not self.options.dry_run:
            try:
                self.box.confirm()
            except LettersRefused as exc:
                # every other copy of the batch is confirmed: the batch without the refused
                # letters is recorded and settled (by the caller's drain) before the replay
                # stops; the refused ones stay in their place
                refused, sent = exc, _without(sent, exc.items)
        self.pending = _Pending(
            items=sent.items, settles=[p.settle for p in sent.plans],
            recorded=self.recorder.submit(self.replay_id, sent.events, sent.plans,
                                          sent.upgrades))
        if refused is not None:
            raise refused

    def drain(self) -> None:
        """Wait until the pending batch is recorded, then settle it."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        self._count(pending.recorded.result())
        if not self.options.dry_run:
            self.box.settle(pending.items, pending.settles)

    def _count(self, added: tuple[int, int, int]) -> None:
        """Count a batch recorded, in the summary and (not a dry run's) in the metrics, as it
        happens: a long replay shows its pace, a failed one what it moved before failing."""
        moved, parked, skipped = added
        self.counts.moved += moved
        self.counts.parked += parked
        self.counts.skipped += skipped
        if not self.options.dry_run:
            for outcome, n in (("moved", moved), ("parked", parked), ("skipped", skipped)):
                metrics.REPLAYED.labels(self.name, outcome).inc(n)
        HEALTH.progressed()


def _without(sent: _Sent, refused: list[Received]) -> _Sent:
    """``sent`` with the letters of ``refused`` (their copies refused) left untouched: they
    count nothing, record nothing and stay in the box."""
    out = {id(item.letter) for item in refused}
    return _Sent(items=sent.items,
                 plans=[_UNTOUCHED if id(item.letter) in out else plan
                        for item, plan in zip(sent.items, sent.plans, strict=True)],
                 events=[(letter, p) for letter, p in sent.events if id(letter) not in out],
                 upgrades=[(letter, p) for letter, p in sent.upgrades if id(letter) not in out])


def _origin_gone(exc: NotFound, letter: DeadLetter) -> NotFound:
    """The refusal of a letter's origin, naming the letter and the way past it."""
    return NotFound(f"{exc}: it is where letter {letter.message_id} came from, and every "
                    f"replay stops at that letter. Create it, set replay_to, or leave such "
                    f"letters out with --where 'origin!={letter.origin}'")


_UNTOUCHED = Plan(outcome=None, destination=None, settle=Settle.UNTOUCHED)
_MOVED_OR_WOULD = (ReplayOutcome.MOVED, ReplayOutcome.WOULD_MOVE)
_PARKED_OR_WOULD = (ReplayOutcome.PARKED, ReplayOutcome.WOULD_PARK)


def _record(conn: psycopg.Connection[dict[str, Any]], replay_id: int,
            events: list[tuple[DeadLetter, Plan]], plans: list[Plan],
            upgrades: list[tuple[DeadLetter, Plan]]) -> tuple[int, int, int]:
    """Record ``events``, turn the events of ``upgrades``' ids (recorded by an earlier batch
    of this replay) into theirs, and add the counts of ``plans`` (the batch's: a letter not
    looked at counts nothing, a duplicate of an id counts without a second event), in one
    statement; return the counts (moved, parked, skipped)."""
    moved = sum(1 for p in plans if p.outcome in _MOVED_OR_WOULD)
    parked = sum(1 for p in plans if p.outcome in _PARKED_OR_WOULD)
    skipped = sum(1 for p in plans if p.settle is not Settle.UNTOUCHED) - moved - parked
    row = conn.execute(query("record_replay_batch"), {
        "replay_id": replay_id, "moved": moved, "parked": parked, "skipped": skipped,
        **_event_columns(events), **_event_columns(upgrades, prefix="upgraded_")}).fetchone()
    if row is None:
        raise StateError(f"replay {replay_id} is no longer running (cancelled?)")
    return moved, parked, skipped


def _event_columns(events: list[tuple[DeadLetter, Plan]], *,
                   prefix: str = "") -> dict[str, str]:
    """The columns of ``events`` as JSON arrays, as ``record_replay_batch`` takes them."""
    letters = [letter for letter, _ in events]
    plans = [p for _, p in events]
    return {f"{prefix}{name}": json.dumps(values) for name, values in (
        ("message_ids", [letter.message_id for letter in letters]),
        ("origins", [letter.origin for letter in letters]),
        ("destinations", [p.destination_text for p in plans]),
        ("outcomes", [p.outcome for p in plans]),
        ("error_classes", [letter.error_class for letter in letters]),
        ("attempts", [letter.attempts for letter in letters]))}


# ---------------------------------------------------------------------------------------------
# CLI


def cmd_replay(config: Config, args: argparse.Namespace) -> int:
    """``trueup replay NAME [--max N] [--rate N] [--dry-run] [--where FILTER] [--json]``."""
    from trueup.cli import EXIT_OK, to_json
    from trueup.progress import ProgressBar

    options = ReplayOptions(max_messages=args.max, rate=args.rate, dry_run=args.dry_run,
                            where=args.where)

    def show(letter: DeadLetter, chosen: Plan) -> None:
        target = f" -> {chosen.destination}" if chosen.destination else ""
        why = f" ({chosen.reason})" if chosen.reason else ""
        print(f"{chosen.outcome}  {letter.message_id}  origin={letter.origin or '-'}"
              f"{target}  error={letter.error_class}  attempts={letter.attempts}{why}")

    bar = ProgressBar()
    try:
        summary = replay(config, args.name, options,
                         listing=show if args.dry_run and not args.json else None,
                         progress=lambda done, total: bar("letters", done, total))
    finally:
        bar.close()
    if args.json:
        print(to_json(summary.as_json()))
    else:
        move, park = ("would move", "would park") if summary.dry_run else ("moved", "parked")
        print(f"replay {summary.replay_id} of {summary.name}: {move} {summary.moved}, "
              f"{park} {summary.parked}, skipped {summary.skipped} "
              f"in {summary.seconds:.1f}s{' (dry run)' if summary.dry_run else ''}")
    return EXIT_OK
