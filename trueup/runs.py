"""Runs and their differences in trueup's state database.

Each transition is one guarded statement (``WHERE status = 'running'``); a run that is not
where the caller expects raises instead of being overwritten.

While a run is running, the state session of its process holds the run's advisory lock (as a
replay holds its queue's): a process killed (kill -9, an OOM kill) releases it with its
session, and the next run of the reconciliation, or ``trueup status``, marks the run failed
(:func:`abandon_runs`). A live run's lock is held, so a run going on alongside is untouched.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from trueup.db import Endless
from trueup.errors import StateError
from trueup.log import get_logger
from trueup.queries import query
from trueup.statuses import DifferenceClass

#: Classes that make a run "inconsistent" (exit status 1, failing checks); in_flight does not.
FAILING_CLASSES = (DifferenceClass.MISSING, DifferenceClass.ORPHAN, DifferenceClass.STALE,
                   DifferenceClass.AHEAD, DifferenceClass.MISMATCH, DifferenceClass.UNREADABLE)

#: The error of a run whose process died without marking it (see :func:`abandon_runs`).
PROCESS_DIED = "process died (no longer running)"

log = get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class Difference:
    """One key on which source and target disagree."""

    key: list[Any]
    cls: DifferenceClass
    source_version: Any = None
    target_version: Any = None
    source_fingerprint: int | None = None
    target_fingerprint: int | None = None
    detail: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"key": self.key, "class": self.cls.value,
               "source_version": self.source_version, "target_version": self.target_version}
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """What ``trueup diff --json`` prints."""

    reconciliation: str
    run_id: int
    partition: str | None
    source_rows: int
    target_rows: int
    missing: int = 0
    orphan: int = 0
    stale: int = 0
    ahead: int = 0
    mismatch: int = 0
    in_flight: int = 0
    unreadable: int = 0
    seconds: float = 0.0

    @property
    def consistent(self) -> bool:
        return not any(getattr(self, c.value) for c in FAILING_CLASSES)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def start_run(conn: psycopg.Connection[Any], reconciliation: str,
              partition: str | None) -> tuple[int, dt.datetime]:
    """Record a new run, held by ``conn``'s session until it closes: keep ``conn`` open for the
    whole run. Runs of the reconciliation whose process died are marked failed first."""
    abandon_runs(conn, reconciliation)
    with conn.transaction():  # held before the run commits: none sees it running unheld
        row = conn.execute(query("start_run"), {"reconciliation": reconciliation,
                                                "partition": partition}).fetchone()
        assert row is not None
        conn.execute(query("hold_run"), {"run_id": row["run_id"]})
    return int(row["run_id"]), row["started_at"]


def abandon_runs(conn: psycopg.Connection[Any], reconciliation: str | None) -> list[int]:
    """Mark failed the runs still ``running`` whose process died (of ``reconciliation``, or of
    all when None), committed; return their ids."""
    rows = conn.execute(query("abandon_runs"), {"reconciliation": reconciliation,
                                                "error": PROCESS_DIED}).fetchall()
    conn.commit()  # also releases the locks tried
    ids = [int(r["run_id"]) for r in rows]
    if ids:
        log.warning("diff.abandoned_marked_failed", run_ids=ids,
                    reconciliations=sorted({r["reconciliation"] for r in rows}))
    return ids


def finish_run(conn: psycopg.Connection[Any], summary: RunSummary) -> None:
    row = conn.execute(query("finish_run"), summary.to_json()).fetchone()
    conn.commit()
    if row is None:
        raise StateError(f"run {summary.run_id} is no longer running; not overwriting it")


def fail_run(conn: psycopg.Connection[Any], run_id: int, error: str, seconds: float) -> None:
    # to the millisecond, as a finished run's (status --json printed 0.037412806996144354)
    conn.execute(query("fail_run"), {"run_id": run_id, "error": error,
                                     "seconds": round(seconds, 3)})
    conn.commit()


class DifferenceWriter:
    """Streams a run's differences into trueup.differences with COPY, in order.

    Differences are buffered and copied :data:`WRITE_BATCH` at a time (one COPY and commit per
    difference cost 2 ms each: 17 s for 8,500 differences); :meth:`flush` writes the rest.
    """

    WRITE_BATCH = 5_000

    def __init__(self, conn: psycopg.Connection[Any], run_id: int, reconciliation: str) -> None:
        self.conn = conn
        self.run_id = run_id
        self.reconciliation = reconciliation
        self.counts = {c: 0 for c in DifferenceClass}
        self._seq = 0
        self._rows: list[tuple[Any, ...]] = []

    def write(self, differences: Iterable[Difference]) -> None:
        for d in differences:
            self._seq += 1
            self.counts[d.cls] += 1
            self._rows.append((self.run_id, self._seq, self.reconciliation, _jsonb(d.key),
                               d.cls.value, _jsonb(d.source_version), _jsonb(d.target_version),
                               d.source_fingerprint, d.target_fingerprint, _jsonb(d.detail)))
        if len(self._rows) >= self.WRITE_BATCH:
            self.flush()

    def flush(self) -> None:
        rows, self._rows = self._rows, []
        if not rows:
            return
        with self.conn.cursor() as cur, cur.copy(
            "COPY trueup.differences (run_id, seq, reconciliation, key, class, source_version, "
            "target_version, source_fingerprint, target_fingerprint, detail) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)
        self.conn.commit()


def differences_of(conn: psycopg.Connection[Any], run_id: int) -> list[Difference]:
    return [Difference(key=r["key"], cls=DifferenceClass(r["class"]),
                       source_version=r["source_version"], target_version=r["target_version"],
                       source_fingerprint=r["source_fingerprint"],
                       target_fingerprint=r["target_fingerprint"], detail=r["detail"])
            for r in conn.execute(query("run_differences"), {"run_id": run_id})]


def json_value(value: Any) -> Any:
    """A database value as plain JSON (keys and versions in --show and the state tables); a
    time as Postgres's JSON writes it (:func:`time_text`)."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return time_text(value)
    if isinstance(value, Endless):
        return str(value)  # 'infinity', '-infinity'
    if isinstance(value, float) and not math.isfinite(value):
        return _non_finite(value)  # JSON has no NaN or Infinity: jsonb would refuse the run
    if isinstance(value, int | str | bool | float) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: json_value(v) for k, v in value.items()}
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return _non_finite(value)
        return int(value) if value == value.to_integral_value() else str(value)
    return str(value)  # UUID and other scalars print as their text


def time_text(value: dt.date | dt.time) -> str:
    """A date, timestamp or time of day as Postgres's JSON writes it (``to_jsonb``,
    ``json_build_array``) in trueup's sessions (TimeZone UTC): ISO with a ``T``, the fraction
    of a second without its trailing zeros (``10:30:00.5``, where ``isoformat`` writes
    ``10:30:00.500000``), a time of day's offset without zero minutes (``+02``). Repairs rows
    hold keys as Postgres renders them: a run's differences must hold the same text for a
    backfill's repairs rows to name the run that found the key (earlier runs stored
    ``isoformat``'s text, which lineage looks up too)."""
    if not isinstance(value, dt.datetime | dt.time):
        return value.isoformat()  # a date: no fraction
    whole = value.replace(microsecond=0).isoformat()
    seconds = 19 if isinstance(value, dt.datetime) else 8  # YYYY-MM-DDTHH:MM:SS, HH:MM:SS
    fraction = f".{value.microsecond:06d}".rstrip("0") if value.microsecond else ""
    zone = whole[seconds:]
    if isinstance(value, dt.time):
        zone = re.sub(r"^([+-]\d\d):00$", r"\1", zone)  # timetz: +02, +05:30, +02:00:15
    return whole[:seconds] + fraction + zone


def _non_finite(value: float | decimal.Decimal) -> str:
    """NaN and the infinities as Postgres spells them."""
    if value != value:  # NaN
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _jsonb(value: Any) -> str | None:
    return None if value is None else json.dumps(json_value(value))
