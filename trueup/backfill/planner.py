"""Planning a backfill: one active backfill per reconciliation, and its chunks.

``--run`` plans batches of the run's difference keys; ``--all`` and ``--partition`` plan key
ranges cut on the source's key index (every ``chunk_size``-th key in key order, stepping
along the index from cut to cut, never an OFFSET from the start). For ``--all`` the target's
keys (the mirror's, for a topic) are cut the same way: those before the source's first key
and after its last become chunks of their own, and so do those of a source range holding
more than ``chunk_size`` of them (a gap in the source's keys), so orphans come in chunks of
fewer than twice ``chunk_size``; the first and last ranges are open. The backfill row and
its chunks commit together.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import psycopg
from psycopg import sql

from trueup.backfill.keyspace import KeyColumns, KeySpace, key_order
from trueup.backfill.model import BackfillOptions, source_side
from trueup.config import Config, RepairMode
from trueup.db import connect
from trueup.diff import parse_partition
from trueup.errors import Conflict, NotFound, UsageError
from trueup.fingerprint import ColumnType, Kind
from trueup.log import get_logger
from trueup.mirror import SCHEMA
from trueup.queries import query
from trueup.sides import (
    column_types,
    day_filter,
    keys_refused,
    refusable_keys,
    require,
    table_side,
)
from trueup.statuses import BackfillScope, KeyOrder

log = get_logger(__name__)


def lock_key(name: str) -> int:
    """pg_advisory_xact_lock key guarding the planning of ``name``'s backfills."""
    digest = hashlib.sha256(f"trueup-backfill:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def active_conflict(name: str, row: dict[str, Any], *, planning: bool = True) -> Conflict:
    """The refusal naming the active backfill; ``planning``: of a new one (which may be
    planned ``--alongside`` it; a resumed one may not)."""
    bid = row["backfill_id"]
    alongside = " (or plan this one --alongside it)" if planning else ""
    return Conflict(f"backfill {name}: backfill {bid} of {name} is already {row['status']}; "
                    f"resume it with `trueup backfill --resume {bid}` or cancel it with "
                    f"`trueup backfill --cancel {bid}`{alongside}")


#: How long a backfill waits for another one of its reconciliation to be planned, to name it.
PLANNING_WAIT_SECONDS = 10.0


def _lock(state: psycopg.Connection[Any], name: str) -> None:
    """Take the reconciliation's planning lock for this transaction. Another backfill being
    planned holds it until its plan commits, unseen till then: waiting for it (a while) lets
    the caller name it, as the active one, rather than say only that one is being planned."""
    with state.transaction():  # a savepoint: a lock not granted in time leaves the rest alone
        before = state.execute("SELECT current_setting('lock_timeout') AS t").fetchone()
        state.execute("SELECT set_config('lock_timeout', %s, true)",
                      (f"{int(PLANNING_WAIT_SECONDS * 1000)}ms",))
        try:
            state.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(name),))
        except psycopg.errors.LockNotAvailable:
            raise Conflict(f"backfill {name}: another backfill of {name} is still being "
                           f"planned after {PLANNING_WAIT_SECONDS:g} s; `trueup status` "
                           f"names it once planned") from None
        state.execute("SELECT set_config('lock_timeout', %s, true)",
                      (before["t"] if before else "0",))


def require_repairable(config: Config, name: str) -> None:
    """Refuse a reconciliation the config does not let backfills repair (``repair: none``)."""
    if config.reconciliation(name).repair is RepairMode.NONE:
        raise UsageError(f"{config.path}: reconciliations.{name}.repair: is none; set upsert "
                         f"(table target) or republish (topic target) to backfill")


def validate(config: Config, name: str, options: BackfillOptions) -> None:
    rec = config.reconciliation(name)
    require_repairable(config, name)
    if options.scope is BackfillScope.PARTITION:
        parse_partition(rec, name, options.partition)
    if options.scope is BackfillScope.KEYS:
        raise UsageError("backfill: scope keys is not supported from here; use --run")


def plan(config: Config, name: str, options: BackfillOptions,
         state: psycopg.Connection[Any]) -> int:
    """Create backfill ``name`` with its chunks (status running); return its id."""
    validate(config, name, options)
    with state.transaction():
        if not options.alongside:  # one alongside others neither waits for nor checks them
            _lock(state, name)
            active = state.execute(query("active_backfill"),
                                   {"reconciliation": name}).fetchone()
            if active is not None:
                raise active_conflict(name, active)
        if options.scope is BackfillScope.RUN:
            _check_run(state, name, options.run_id)
        try:
            row = state.execute(query("insert_backfill"), {
                "reconciliation": name, "scope": options.scope.value,
                "run_id": options.run_id, "partition": options.partition,
                "dry_run": options.dry_run, "chunk_size": options.chunk_size,
                "rate": options.rate, "launched_by": options.launched_by,
                "alongside": options.alongside}).fetchone()
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
        side = source_side(source, rec, dsn)
        order = _key_order(config, name, side.key_types, source, state)
        state.execute(query("set_key_order"), {"backfill_id": backfill_id,
                                               "key_order": order.value})
        space = KeySpace(exprs=side.key, types=side.key_types, order=order)
        # Every chunk_size-th key in key order and the count, in one statement (one snapshot:
        # the last chunk's planned rows never go wrong or negative as rows come and go).
        cuts, last = _cut(source, side.relation, space,
                          sql.SQL("({})").format(day_filter(side, options.partition)),
                          options.chunk_size, filtered=options.partition is not None)
        if options.scope is BackfillScope.ALL:
            # The first and last ranges are open: target keys beyond the source's (orphans)
            # are cut into chunks of their own, or one chunk would hold them all; so are
            # those in a gap inside the source's keys (a tenant purged from the source).
            below, inside, above = _target_cuts(config, name, space, state,
                                                options.chunk_size,
                                                cuts[0][0] if cuts else None, last)
            if len(inside) >= 2 and cuts:  # a source range may hold a gap
                cuts = _with_gaps_cut(source, _ordered_as_columns(
                    source, rec.source.table, rec.source.key, space), cuts, inside)
            cuts = [*below, *cuts, *above]
    if not cuts:
        cuts = [(None, 0)]
    with state.cursor() as cur:  # in one pipeline: 200,000 chunks took 25 s one by one
        cur.executemany(query("insert_range_chunk"), (
            {"backfill_id": backfill_id, "chunk": i,
             "key_from": None if i == 0 else json.dumps(cuts[i][0]),
             "key_to": None if i == len(cuts) - 1 else json.dumps(cuts[i + 1][0]),
             "rows_planned": rows} for i, (_, rows) in enumerate(cuts)))


#: The smallest chunk cut by steps along an index (see :func:`_cut`): a step costs about as
#: much as numbering 35 rows in a window.
STEP_MIN_ROWS = 100


def _cut(conn: psycopg.Connection[Any], relation: sql.Composable, space: KeySpace,
         where: sql.Composable, chunk_size: int, *, filtered: bool = False
         ) -> tuple[list[tuple[Any, int]], Any]:
    """Every ``chunk_size``-th key of ``relation``'s rows ``where`` in key order, each with the
    rows of its chunk; and the last key. One statement, so one snapshot: the last chunk's
    planned rows never go wrong or negative as rows come and go. Keys with a NULL part are
    left out: a bound with one would leave the rows next to it in no chunk (a comparison with
    NULL is never true), and such keys are not repaired anyway.

    Where an index gives the rows in key order, each cut is found from the last by stepping
    ``chunk_size`` entries along it (1M keys: 65 ms, against 460 through a window over every
    row); else one window over the rows in key order numbers them all (one scan and one sort,
    never an OFFSET from the start). Rows ``filtered`` by more than a key range (a day's)
    are numbered in the window: steps along the key index would read every other row of the
    range for each cut."""
    stepping: sql.Composed | None = None
    if not filtered and chunk_size >= STEP_MIN_ROWS and space.indexed(ranges=True):
        stepping = _stepping(relation, space, where, chunk_size)
        if not _steps_on_an_index(conn, stepping):
            stepping = None
    rows = conn.execute(stepping or _windowed(relation, space, where, chunk_size)).fetchall()
    if not rows:
        return [], None
    total = rows[-1]["trueup_n"]
    bounds = [r["key"] for r in rows if (r["trueup_n"] - 1) % chunk_size == 0]
    return [(b, chunk_size if i < len(bounds) - 1 else total - chunk_size * i)
            for i, b in enumerate(bounds)], rows[-1]["key"]


def _cut_parts(relation: sql.Composable, space: KeySpace, where: sql.Composable,
               chunk_size: int) -> dict[str, sql.Composable]:
    names = [sql.Identifier(f"k{i}") for i in range(len(space.exprs))]
    return {"json": KeySpace(exprs=names, types=space.types).as_json,
            "cols": sql.SQL(", ").join(sql.SQL("{} AS {}").format(e, n)
                                       for e, n in zip(space.exprs, names, strict=True)),
            "order": space.ordered, "rel": relation, "size": sql.Literal(chunk_size),
            "filter": sql.SQL("{} AND {}").format(space.complete, where)}


def _windowed(relation: sql.Composable, space: KeySpace, where: sql.Composable,
              chunk_size: int) -> sql.Composed:
    """:func:`_cut`'s rows by a window: each cut key numbered, and the last key numbered the
    count. lead() marks the last row (its number is the count) while the rows stream by; a
    count(*) OVER () would hold every row of the table until the first came out."""
    return sql.SQL(
        "SELECT {json} AS key, trueup_n FROM (SELECT {cols}, row_number() OVER w AS trueup_n, "
        "lead(true) OVER w IS NULL AS trueup_last FROM {rel} WHERE {filter} "
        "WINDOW w AS (ORDER BY {order})) AS s "
        "WHERE (trueup_n - 1) % {size} = 0 OR trueup_last ORDER BY trueup_n"
    ).format(**_cut_parts(relation, space, where, chunk_size))


def _stepping(relation: sql.Composable, space: KeySpace, where: sql.Composable,
              chunk_size: int) -> sql.Composed:
    """:func:`_cut`'s rows by steps along the key's order: the first key, then each cut
    ``chunk_size`` rows past the last (``OFFSET`` from it, not from the start), then the last
    key, numbered by counting the rows from the last cut. For a space compared as its columns
    are (:meth:`KeySpace.indexed`). Each cut is past the last: keys that are not unique (no
    key trueup accepts) stop the steps, and the last chunk holds the rest, never a loop."""
    n = len(space.exprs)

    def row_of(alias: str) -> sql.Composable:
        row = sql.SQL(", ").join(sql.Identifier(alias, f"k{i}") for i in range(n))
        return sql.SQL("({})").format(row) if n > 1 else row

    # ORDER BY names the output columns (k0, ...): a bare name there is an output column's
    # first, and a key column may be named like another output column (trueup_n, k1). The
    # statement's own names start with trueup_ where the user's relation is in scope: a
    # table named cuts with a column k0 would otherwise be its cuts.k0.
    return sql.SQL(
        "WITH RECURSIVE trueup_cuts AS ("
        "(SELECT {cols}, 1::bigint AS trueup_n FROM {rel} WHERE {filter} "
        "ORDER BY {forwards} LIMIT 1) "
        "UNION ALL "
        "SELECT trueup_next.*, trueup_cuts.trueup_n + {size} FROM trueup_cuts, LATERAL ("
        "SELECT {cols} FROM {rel} WHERE {filter} AND {row} >= {cut} "
        "ORDER BY {forwards} OFFSET {size} LIMIT 1) AS trueup_next "
        "WHERE {next} > {cut}), "
        "trueup_last AS (SELECT * FROM trueup_cuts ORDER BY trueup_n DESC LIMIT 1) "
        "SELECT {json} AS key, trueup_n FROM trueup_cuts "
        "UNION "
        "SELECT {end}, trueup_last.trueup_n - 1 + (SELECT count(*) FROM {rel} "
        "WHERE {filter} AND {row} >= {last}) "
        "FROM trueup_last, LATERAL (SELECT {cols} FROM {rel} WHERE {filter} "
        "ORDER BY {backwards} LIMIT 1) AS trueup_end "
        "ORDER BY trueup_n"
    ).format(**_cut_parts(relation, space, where, chunk_size),
             row=space.row, cut=row_of("trueup_cuts"), next=row_of("trueup_next"),
             last=row_of("trueup_last"),
             end=KeySpace(exprs=[sql.Identifier("trueup_end", f"k{i}") for i in range(n)],
                          types=space.types).as_json,
             forwards=sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in range(n)),
             backwards=sql.SQL(", ").join(sql.SQL("{} DESC").format(sql.Identifier(f"k{i}"))
                                          for i in range(n)))


def _steps_on_an_index(conn: psycopg.Connection[Any], statement: sql.Composed) -> bool:
    """Whether the plan of a stepping :func:`_cut` reads each step along an index: no sort in
    its recursive part (without a fitting index every step would sort the rows after the
    last cut, for each cut)."""
    row = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) {}").format(statement)).fetchone()
    assert row is not None
    union = next((node for node in _nodes(row["QUERY PLAN"][0]["Plan"])
                  if node.get("Node Type") == "Recursive Union"), None)
    return union is not None and not any(
        node.get("Node Type") in ("Sort", "Incremental Sort")
        for node in _nodes(union["Plans"][1]))


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A plan node (EXPLAIN's JSON) and every node below it."""
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


#: Cuts of one side's keys: every chunk_size-th key, with the rows from it to the next.
Cuts = list[tuple[Any, int]]


def _target_cuts(config: Config, name: str, source: KeySpace, state: psycopg.Connection[Any],
                 chunk_size: int, first: Any, last: Any) -> tuple[Cuts, Cuts, Cuts]:
    """Cuts of the target's keys (the mirror's, for a topic) before the source's ``first``
    key, from it to its ``last``, and after that (all of them before, when the source is
    empty), read as the source's types in the backfill's order."""
    rec = config.reconciliations[name]
    if rec.target.table is None:
        relation = sql.Identifier(SCHEMA, name)
        exists = state.execute("SELECT to_regclass(%s) IS NOT NULL AS ok",
                               (relation.as_string(state),)).fetchone()
        if not exists or not exists["ok"]:
            return [], [], []  # no mirror yet: nothing is known of the topic's keys
        space = replace(source, exprs=[sql.Identifier(k) for k in rec.source.key])
        return _beyond(state, relation, space, chunk_size, first, last)
    dsn = config.connections[rec.target.connection].postgres
    assert dsn is not None
    with connect(dsn, what="target", autocommit=True,
                 application_name=f"trueup backfill {name}") as target:
        side = table_side(label="target", dsn=dsn, table=rec.target.table, key=rec.target.key,
                          version=None, columns=[], key_as=source.types, conn=target)
        try:
            return _beyond(target, side.relation, replace(source, exprs=side.key), chunk_size,
                           first, last)
        except psycopg.errors.DataError as exc:
            own = require(column_types(target, rec.target.table), rec.target.table,
                          rec.target.key, target)
            refused = keys_refused(rec.target.table, refusable_keys(
                rec.target.key, own, source.types, source.types), exc)
            if refused is None:
                raise
            raise refused from exc


def _beyond(conn: psycopg.Connection[Any], relation: sql.Composable, space: KeySpace,
            chunk_size: int, first: Any, last: Any) -> tuple[Cuts, Cuts, Cuts]:
    if first is None:
        return _cut(conn, relation, space, sql.SQL("true"), chunk_size)[0], [], []
    inside = sql.SQL("{} AND NOT ({})").format(space.in_range(first, None), space.after(last))
    return (_cut(conn, relation, space, space.in_range(None, first), chunk_size)[0],
            _cut(conn, relation, space, inside, chunk_size)[0],
            _cut(conn, relation, space, space.after(last), chunk_size)[0])


def _ordered_as_columns(conn: psycopg.Connection[Any], table: str, columns: Sequence[str],
                        space: KeySpace) -> sql.Composable:
    """``ORDER BY`` of a key read from ``j`` (a JSON array, see :meth:`KeySpace.from_json`)
    in the backfill's order. A text key compared in its columns' own collation (``native``)
    is given the source column's: read from JSON it has none but the database's default,
    which may sort otherwise."""
    names: list[str | None] = []
    for column, ctype in zip(columns, space.types, strict=True):
        row = None
        if space.order is KeyOrder.NATIVE and ctype.kind is Kind.TEXT:
            row = conn.execute(query("column_collation_name"), {
                "table": sql.Identifier(*table.split(".")).as_string(conn),
                "column": column}).fetchone()
        names.append(row["collation"] if row else None)
    return space.from_json().ordered_in(names)


def _with_gaps_cut(conn: psycopg.Connection[Any], order: sql.Composable, cuts: Cuts,
                   inside: Cuts) -> Cuts:
    """The source's ``cuts``, with the target's (``inside`` the source's first and last keys)
    added where one source range holds two or more of them: more than ``chunk_size`` target
    rows, which the source lacks (a gap in its keys). Every chunk then holds fewer than twice
    ``chunk_size`` target rows; where the target follows the source, nothing changes. An added
    range plans the target's rows (for ``--rate``); its source range's count stays with its
    first part."""
    # both sides' cut keys in the backfill's order (``order``), compared as the source's
    # types, the source's first on a tie
    rows = conn.execute(sql.SQL(
        "SELECT j AS key, side, n FROM ("
        "SELECT j, 0 AS side, n FROM jsonb_array_elements(%(source)s::jsonb) "
        "WITH ORDINALITY AS s (j, n) UNION ALL "
        "SELECT j, 1, n FROM jsonb_array_elements(%(target)s::jsonb) "
        "WITH ORDINALITY AS t (j, n)) AS x ORDER BY {}, side").format(order),
        {"source": json.dumps([key for key, _ in cuts]),
         "target": json.dumps([key for key, _ in inside])}).fetchall()
    if [r["n"] for r in rows if r["side"] == 0] != list(range(1, len(cuts) + 1)):
        # the source's cuts came back in another order than their own query's: the order
        # is not the ranges' (never expected); the plan stays the source's
        log.warning("backfill.gap_cuts_skipped", reason="order")
        return cuts
    merged: Cuts = []
    gap: Cuts = []  # target cuts since the last source cut

    def close_gap() -> None:
        if len(gap) >= 2:
            merged.extend(gap)
        gap.clear()

    for row in rows:
        if row["side"] == 0:
            close_gap()
            merged.append(cuts[row["n"] - 1])
        elif merged and row["key"] != merged[-1][0]:  # a target cut before the source's
            gap.append(inside[row["n"] - 1])          # first is no target key inside
    close_gap()
    return merged


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
