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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from trueup.config import Config, DeadLetterConfig
from trueup.errors import Conflict, ConnectionFailed, StateError
from trueup.letterboxes import Letterbox, Received, Settle, open_letterbox
from trueup.letters import DeadLetter, Destination, LetterFilter
from trueup.log import get_logger
from trueup.queries import query
from trueup.retry import RetryPolicy
from trueup.state import open_state
from trueup.statuses import ReplayOutcome, ReplayStatus

log = get_logger(__name__)

BATCH_SIZE = 1000
RECONNECT_ATTEMPTS = 20            # a broker restart takes seconds; give up after ~1.5 min
RECONNECT_MAX_PAUSE_SECONDS = 5.0

Listing = Callable[[DeadLetter, "Plan"], None]


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


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What happens to one letter. ``outcome`` None: filtered out (counted as skipped, not
    recorded as an event)."""

    outcome: ReplayOutcome | None
    destination: Destination | None
    settle: Settle
    reason: str = ""

    @property
    def sends(self) -> bool:
        return self.outcome in (ReplayOutcome.MOVED, ReplayOutcome.PARKED)

    @property
    def counts_toward_max(self) -> bool:
        return self.outcome in (ReplayOutcome.MOVED, ReplayOutcome.PARKED,
                                ReplayOutcome.WOULD_MOVE, ReplayOutcome.WOULD_PARK)


def plan(letter: DeadLetter, dlq: DeadLetterConfig, *, selected: bool,
         replayed_by: int | None, dry_run: bool, policy: RetryPolicy | None = None) -> Plan:
    """The fate of one letter; ``replayed_by`` is the newest replay that moved its id.

    ``policy`` is the queue's retry policy (built from ``dlq`` when not given).
    """
    if not selected:
        return Plan(outcome=None, destination=None, settle=Settle.KEEP, reason="filtered out")
    if replayed_by is not None and replayed_by > letter.generation:
        # This copy was moved already (the process stopped before removing it): drop it.
        return Plan(outcome=ReplayOutcome.SKIPPED, destination=None, settle=Settle.DONE,
                    reason=f"already replayed by replay {replayed_by}")
    if (policy or RetryPolicy.from_config(dlq)).exhausted(letter.attempts):
        if dlq.parking is None:
            return Plan(outcome=ReplayOutcome.SKIPPED, destination=None, settle=Settle.KEEP,
                        reason=f"{letter.attempts} attempts and no parking configured")
        return Plan(outcome=ReplayOutcome.WOULD_PARK if dry_run else ReplayOutcome.PARKED,
                    destination=Destination(name=dlq.parking), settle=Settle.DONE,
                    reason=f"{letter.attempts} attempts (max_attempts {dlq.max_attempts})")
    if dlq.replay_to is not None:
        destination = Destination(name=dlq.replay_to.name, exchange=dlq.replay_to.exchange,
                                  routing_key=dlq.replay_to.routing_key)
    elif letter.origin is not None:
        destination = Destination(name=letter.origin)
    else:
        return Plan(outcome=ReplayOutcome.SKIPPED, destination=None, settle=Settle.KEEP,
                    reason="no origin header and no replay_to")
    return Plan(outcome=ReplayOutcome.WOULD_MOVE if dry_run else ReplayOutcome.MOVED,
                destination=destination, settle=Settle.DONE)


class Pacer:
    """At most ``rate`` sends per second (None: no limit)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.count = 0

    def wait(self) -> None:
        if not self.rate:
            return
        self.count += 1
        pause = self.start + self.count / self.rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)


@dataclass(kw_only=True)
class _Counts:
    moved: int = 0
    parked: int = 0
    skipped: int = 0
    sent_or_planned: int = 0
    connected: bool = False   # the letterbox was opened once: later failures are outages


def replay(config: Config, name: str, options: ReplayOptions = ReplayOptions(), *,
           listing: Listing | None = None) -> ReplaySummary:
    """Replay the dead letters of ``name``; see the module docstring for the guarantees."""
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
            try:
                _with_reconnects(lambda: _run(config, name, dlq, selection, options, conn,
                                              replay_id, counts, listing), counts)
            except BaseException as exc:
                _finish(conn, replay_id, ReplayStatus.FAILED, time.monotonic() - started,
                        f"{type(exc).__name__}: {exc}")
                raise
            seconds = time.monotonic() - started
            _finish(conn, replay_id, ReplayStatus.SUCCEEDED, seconds, None)
        finally:
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


def _finish(conn: psycopg.Connection[dict[str, Any]], replay_id: int, status: ReplayStatus,
            seconds: float, error: str | None) -> None:
    row = conn.execute(query("finish_replay"), {
        "replay_id": replay_id, "status": status.value, "seconds": seconds,
        "error": error}).fetchone()
    if row is None:
        raise StateError(f"replay {replay_id} was no longer running when it finished")


def _with_reconnects(session: Callable[[], None], counts: _Counts) -> None:
    """Run ``session``; after a lost broker connection, run it again (it resumes: letters
    already moved are recognised, those not yet removed are still in the queue). A broker that
    cannot be reached at the start is an error at once."""
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
         counts: _Counts, listing: Listing | None) -> None:
    box = open_letterbox(config, name)
    counts.connected = True
    try:
        if not options.dry_run and dlq.parking is not None:
            box.prepare(Destination(name=dlq.parking))
        pacer = Pacer(options.rate)
        policy = RetryPolicy.from_config(dlq)
        batches = box.letters(batch_size=options.batch_size, take=not options.dry_run)
        with contextlib.closing(batches):
            for batch in batches:
                full = _batch(box, dlq, policy, selection, options, conn, replay_id, counts,
                              pacer, batch, listing)
                if full:
                    break
    finally:
        box.close()


def _batch(box: Letterbox, dlq: DeadLetterConfig, policy: RetryPolicy,
           selection: LetterFilter,
           options: ReplayOptions, conn: psycopg.Connection[dict[str, Any]], replay_id: int,
           counts: _Counts, pacer: Pacer, batch: list[Received],
           listing: Listing | None) -> bool:
    """Handle one batch; True when ``--max`` is reached."""
    ids = list({item.letter.message_id for item in batch})
    replayed = {row["message_id"]: int(row["replay_id"]) for row in conn.execute(
        query("last_replayed"), {"message_ids": ids, "name": box.name}).fetchall()}
    plans: list[Plan] = []
    in_batch: set[str] = set()
    limit = options.max_messages
    for item in batch:
        letter = item.letter
        if limit is not None and counts.sent_or_planned >= limit:
            plans.append(Plan(outcome=None, destination=None, settle=Settle.UNTOUCHED))
            continue
        replayed_by = replay_id if letter.message_id in in_batch else (
            replayed.get(letter.message_id))
        chosen = plan(letter, dlq, selected=selection.matches(letter),
                      replayed_by=replayed_by, dry_run=options.dry_run, policy=policy)
        if chosen.counts_toward_max:
            counts.sent_or_planned += 1
        if chosen.sends:
            in_batch.add(letter.message_id)
        plans.append(chosen)
        if listing is not None and chosen.outcome is not None:
            listing(letter, chosen)

    sent: list[tuple[Received, Plan]] = []
    try:
        if not options.dry_run:
            for item, chosen in zip(batch, plans, strict=True):
                if chosen.sends:
                    assert chosen.destination is not None
                    pacer.wait()
                    box.publish(item, chosen.destination, replay_id=replay_id)
                    sent.append((item, chosen))
            box.confirm()
    except BaseException:
        if box.confirms_each_publish and sent:
            # Confirmed one by one: record them, so the next attempt does not send them again.
            _record(conn, replay_id, counts, [i for i, _ in sent], [p for _, p in sent])
        raise
    recorded = [(i, p) for i, p in zip(batch, plans, strict=True)
                if p.outcome is not None or p.settle is Settle.KEEP]
    _record(conn, replay_id, counts, [i for i, _ in recorded], [p for _, p in recorded])
    if not options.dry_run:
        box.settle(batch, [p.settle for p in plans])
    return limit is not None and counts.sent_or_planned >= limit


def _record(conn: psycopg.Connection[dict[str, Any]], replay_id: int, counts: _Counts,
            items: list[Received], plans: list[Plan]) -> None:
    """Record the events of a batch and add its counts, in one transaction."""
    events = [(item.letter, p) for item, p in zip(items, plans, strict=True)
              if p.outcome is not None]
    moved = sum(1 for _, p in events if p.outcome in (ReplayOutcome.MOVED,
                                                      ReplayOutcome.WOULD_MOVE))
    parked = sum(1 for _, p in events if p.outcome in (ReplayOutcome.PARKED,
                                                       ReplayOutcome.WOULD_PARK))
    skipped = len(plans) - moved - parked
    with conn.transaction():
        if events:
            conn.execute(query("record_replay_events"), {
                "replay_id": replay_id,
                "message_ids": [letter.message_id for letter, _ in events],
                "origins": [letter.origin for letter, _ in events],
                "destinations": [str(p.destination) if p.destination else None
                                 for _, p in events],
                "outcomes": [str(p.outcome) for _, p in events],
                "error_classes": [letter.error_class for letter, _ in events],
                "attempts": [letter.attempts for letter, _ in events]})
        row = conn.execute(query("count_replay"), {
            "replay_id": replay_id, "moved": moved, "parked": parked,
            "skipped": skipped}).fetchone()
        if row is None:
            raise StateError(f"replay {replay_id} is no longer running (cancelled?)")
    counts.moved += moved
    counts.parked += parked
    counts.skipped += skipped


# ---------------------------------------------------------------------------------------------
# CLI


def cmd_replay(config: Config, args: argparse.Namespace) -> int:
    """``trueup replay NAME [--max N] [--rate N] [--dry-run] [--where FILTER] [--json]``."""
    from trueup.cli import EXIT_OK, to_json

    options = ReplayOptions(max_messages=args.max, rate=args.rate, dry_run=args.dry_run,
                            where=args.where)

    def show(letter: DeadLetter, chosen: Plan) -> None:
        target = f" -> {chosen.destination}" if chosen.destination else ""
        why = f" ({chosen.reason})" if chosen.reason else ""
        print(f"{chosen.outcome}  {letter.message_id}  origin={letter.origin or '-'}"
              f"{target}  error={letter.error_class}  attempts={letter.attempts}{why}")

    summary = replay(config, args.name, options,
                     listing=show if args.dry_run and not args.json else None)
    if args.json:
        print(to_json(summary.as_json()))
    else:
        verb = "would move" if summary.dry_run else "moved"
        print(f"replay {summary.replay_id} of {summary.name}: {verb} {summary.moved}, "
              f"parked {summary.parked}, skipped {summary.skipped} "
              f"in {summary.seconds:.1f}s{' (dry run)' if summary.dry_run else ''}")
    return EXIT_OK
