"""Planning a backfill: one active backfill per reconciliation, and its chunks.

``--run`` plans batches of the run's difference keys; ``--all`` and ``--partition`` plan key
ranges cut on the source's key index (every ``chunk_size``-th key in key order, one pass, no
OFFSET). The first and last ranges are open, so target rows beyond the source's keys (orphans)
belong to a chunk too. The backfill row and its chunks commit together.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import psycopg
from psycopg import sql

from trueup.backfill.keyspace import KeyColumns, KeySpace, key_order
from trueup.backfill.model import BackfillOptions, day_filter, source_side
from trueup.config import Config, RepairMode
from trueup.db import connect
from trueup.diff import parse_partition
from trueup.errors import Conflict, NotFound, UsageError
from trueup.fingerprint import ColumnType
from trueup.log import get_logger
from trueup.queries import query
from trueup.sides import column_types, require
from trueup.statuses import BackfillScope, KeyOrder

log = get_logger(__name__)


def lock_key(name: str) -> int:
    """pg_advisory_xact_lock key guarding the planning of ``name``'s backfills."""
    digest = hashlib.sha256(f"trueup-backfill:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def active_conflict(name: str, row: dict[str, Any]) -> Conflict:
    bid = row["backfill_id"]
    return Conflict(f"backfill {name}: backfill {bid} of {name} is already {row['status']}; "
                    f"resume it with `trueup backfill --resume {bid}` or cancel it with "
                    f"`trueup backfill --cancel {bid}`")


def validate(config: Config, name: str, options: BackfillOptions) -> None:
    rec = config.reconciliation(name)
    if rec.repair is RepairMode.NONE:
        raise UsageError(f"{config.path}: reconciliations.{name}.repair: is none; set upsert "
                         f"(table target) or republish (topic target) to backfill")
    if options.scope is BackfillScope.PARTITION:
        parse_partition(rec, name, options.partition)
    if options.scope is BackfillScope.KEYS:
        raise UsageError("backfill: scope keys is not supported from here; use --run")


def plan(config: Config, name: str, options: BackfillOptions,
         state: psycopg.Connection[Any]) -> int:
    """Create backfill ``name`` with its chunks (status running); return its id."""
    validate(config, name, options)
    with state.transaction():
        locked = state.execute("SELECT pg_try_advisory_xact_lock(%s) AS ok",
                               (lock_key(name),)).fetchone()
        active = state.execute(query("active_backfill"), {"reconciliation": name}).fetchone()
        if active is not None:
            raise active_conflict(name, active)
        if not (locked and locked["ok"]):
            raise Conflict(f"backfill {name}: another backfill of {name} is being planned")
        if options.scope is BackfillScope.RUN:
            _check_run(state, name, options.run_id)
        try:
            row = state.execute(query("insert_backfill"), {
                "reconciliation": name, "scope": options.scope.value,
                "run_id": options.run_id, "partition": options.partition,
                "dry_run": options.dry_run, "chunk_size": options.chunk_size,
                "rate": options.rate}).fetchone()
        except psycopg.errors.UniqueViolation as exc:
            raise Conflict(f"backfill {name}: another backfill of {name} became active") \
                from exc
        assert row is not None
        backfill_id = int(row["backfill_id"])
        if options.scope is BackfillScope.RUN:
            state.execute(query("plan_run_chunks"), {"backfill_id": backfill_id,
                                                     "run_id": options.run_id,
                                                     "chunk_size": options.chunk_size})
        else:
            _plan_ranges(config, name, options, state, backfill_id)
        state.execute(query("start_backfill"), {"backfill_id": backfill_id})
    log.info("backfill.planned", reconciliation=name, backfill_id=backfill_id,
             scope=options.scope.value, run_id=options.run_id, partition=options.partition,
             dry_run=options.dry_run)
    return backfill_id


def _check_run(state: psycopg.Connection[Any], name: str, run_id: int | None) -> None:
    row = state.execute("SELECT reconciliation, status FROM trueup.runs WHERE run_id = %s",
                        (run_id,)).fetchone()
    if row is None:
        raise NotFound(f"backfill {name}: no run {run_id}")
    if row["reconciliation"] != name:
        raise UsageError(f"backfill {name}: run {run_id} is a run of {row['reconciliation']}, "
                         f"not {name}")
    if row["status"] != "succeeded":
        raise UsageError(f"backfill {name}: run {run_id} is {row['status']}; only a succeeded "
                         f"run's differences can be repaired")


def _plan_ranges(config: Config, name: str, options: BackfillOptions,
                 state: psycopg.Connection[Any], backfill_id: int) -> None:
    rec = config.reconciliations[name]
    dsn = config.connections[rec.source.connection].postgres
    assert dsn is not None
    with connect(dsn, what="source", autocommit=True,
                 application_name=f"trueup backfill {name}") as source:
        side, _ = source_side(source, rec, dsn)
        order = _key_order(config, name, side.key_types, source, state)
        state.execute(query("set_key_order"), {"backfill_id": backfill_id,
                                               "key_order": order.value})
        space = KeySpace(exprs=side.key, types=side.key_types, order=order)
        # A bound with a NULL part would leave the rows next to it in no chunk (a comparison
        # with NULL is never true); such keys are not repaired anyway.
        where = sql.SQL("({}) AND {}").format(day_filter(side, options.partition),
                                              space.complete)
        names = [sql.Identifier(f"k{i}") for i in range(len(side.key))]
        outer = KeySpace(exprs=names, types=side.key_types)
        # The bounds and the count from one snapshot: the last chunk's planned rows (the
        # count less the other chunks') never go wrong or negative as rows come and go.
        source.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with source.transaction():
            # Every chunk_size-th key in key order: one scan of the key, never OFFSET.
            bounds = [r["key"] for r in source.execute(sql.SQL(
                "SELECT {json} AS key FROM (SELECT {cols}, row_number() OVER (ORDER BY "
                "{order}) AS trueup_n FROM {rel} WHERE {where}) AS s "
                "WHERE (trueup_n - 1) % {size} = 0 ORDER BY trueup_n"
            ).format(json=outer.as_json,
                     cols=sql.SQL(", ").join(sql.SQL("{} AS {}").format(e, n)
                                             for e, n in zip(space.exprs, names, strict=True)),
                     order=space.ordered, rel=side.relation, where=where,
                     size=sql.Literal(options.chunk_size)))]
            counted = source.execute(sql.SQL("SELECT count(*) AS n FROM {} WHERE {}").format(
                side.relation, where)).fetchone()
            total = int(counted["n"]) if counted else 0
    if not bounds:
        bounds = [None]
    for i in range(len(bounds)):
        last = i == len(bounds) - 1
        state.execute(query("insert_range_chunk"), {
            "backfill_id": backfill_id, "chunk": i,
            "key_from": None if i == 0 else json.dumps(bounds[i]),
            "key_to": None if last else json.dumps(bounds[i + 1]),
            "rows_planned": (total - options.chunk_size * i) if last else options.chunk_size})


def _key_order(config: Config, name: str, types: list[ColumnType],
               source: psycopg.Connection[Any], state: psycopg.Connection[Any]) -> KeyOrder:
    """The order the ranges are cut in: see :mod:`trueup.backfill.keyspace`. The other side is
    the target table (upsert), or the mirror in the state database (republish)."""
    rec = config.reconciliations[name]
    mine = KeyColumns(conn=source, table=rec.source.table, columns=rec.source.key)
    if rec.target.table is None:
        return key_order(types, [mine, KeyColumns(conn=state, table=None,
                                                  columns=rec.source.key)])
    dsn = config.connections[rec.target.connection].postgres
    assert dsn is not None
    with connect(dsn, what="target", autocommit=True,
                 application_name=f"trueup backfill {name}") as target:
        # A missing table or key column is one clear line, before anything is planned.
        require(column_types(target, rec.target.table), rec.target.table, rec.target.key,
                target)
        return key_order(types, [mine, KeyColumns(conn=target, table=rec.target.table,
                                                  columns=rec.target.key)])
