"""Python mirrors of every CHECK-constrained status column in sql/schema.sql.

tests/integration/test_state.py reads the constraints back from Postgres and fails when an enum
and its column disagree.
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class DifferenceClass(StrEnum):
    MISSING = "missing"        # in source, not in target
    ORPHAN = "orphan"          # in target, not in source
    STALE = "stale"            # target version < source version
    AHEAD = "ahead"            # target version > source version
    MISMATCH = "mismatch"      # same or no version, different fingerprint
    IN_FLIGHT = "in_flight"    # changed within grace or the consumer's lag (docs/diff.md)
    UNREADABLE = "unreadable"  # a target message that cannot be read


class BackfillScope(StrEnum):
    RUN = "run"
    PARTITION = "partition"
    ALL = "all"
    KEYS = "keys"


class KeyOrder(StrEnum):
    """How a backfill's key ranges compare text keys (trueup.backfills.key_order)."""

    C = "c"             # in the C collation on every side
    NATIVE = "native"   # in the collation every side's key columns share (index-served)


class BackfillStatus(StrEnum):
    PLANNING = "planning"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in (BackfillStatus.PLANNING, BackfillStatus.RUNNING)


class ChunkStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RepairAction(StrEnum):
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    PUBLISH = "publish"
    TOMBSTONE = "tombstone"
    SKIPPED = "skipped"


class ReplayStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ReplayOutcome(StrEnum):
    MOVED = "moved"
    PARKED = "parked"
    SKIPPED = "skipped"
    WOULD_MOVE = "would_move"
    WOULD_PARK = "would_park"


class CheckSeverity(StrEnum):
    WARN = "WARN"
    ERROR = "ERROR"


#: (table, column) -> enum, for the test that keeps them in step with the CHECK constraints.
STATUS_COLUMNS: dict[tuple[str, str], type[StrEnum]] = {
    ("runs", "status"): RunStatus,
    ("differences", "class"): DifferenceClass,
    ("backfills", "scope"): BackfillScope,
    ("backfills", "status"): BackfillStatus,
    ("backfills", "key_order"): KeyOrder,
    ("chunks", "status"): ChunkStatus,
    ("repairs", "action"): RepairAction,
    ("replays", "status"): ReplayStatus,
    ("replay_events", "outcome"): ReplayOutcome,
    ("check_results", "severity"): CheckSeverity,
}
