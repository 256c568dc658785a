"""``trueup validate``: reach every connection and check the config against what is there.

Reflection of tables goes through SQLAlchemy's inspector; topics through Kafka metadata; queues
and exchanges through passive declares (which never create anything).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import pika
import psycopg
import psycopg.sql
import sqlalchemy as sa
from confluent_kafka.admin import AdminClient
from sqlalchemy.dialects.postgresql.base import PGInspector
from sqlalchemy.engine import Inspector

from trueup.brokers import kafka, rabbitmq
from trueup.config import Config, ConnectionKind, ReconciliationConfig, RepairMode
from trueup.db import first_line, redact, sqlalchemy_url
from trueup.errors import ConfigError, TrueupError
from trueup.log import get_logger
from trueup.quality import Suite
from trueup.sides import column_types
from trueup.state import open_state

log = get_logger(__name__)

#: How long validate may read a source table for NULL keys (one scan of its nullable key
#: columns); past it the check is skipped, with a warning.
NULL_KEY_SECONDS = 10.0
#: Column types a version can be compared with (greater means newer).
ORDERABLE_VERSION_TYPES = (sa.Integer, sa.Numeric, sa.Float, sa.DateTime, sa.Date)


@dataclass(frozen=True, kw_only=True)
class Finding:
    path: str
    ok: bool
    message: str


@dataclass(frozen=True, kw_only=True)
class TableShape:
    columns: dict[str, Any]  # name -> SQLAlchemy type
    unique_keys: list[tuple[str, ...]]  # primary key first, then unique constraints and indexes
    nullable: frozenset[str] = frozenset()  # columns that may hold NULL
    #: "view" or "foreign table": a relation that holds no index, so no catalog shows that a
    #: key of it is unique; "table" for the others (a partitioned table, a materialized view)
    kind: str = "table"


@dataclass
class _Reach:
    """Live handles per connection name; None when reaching it failed (already reported)."""

    engines: dict[str, sa.Engine | None] = field(default_factory=dict)
    admins: dict[str, AdminClient | None] = field(default_factory=dict)
    rabbits: dict[str, pika.BlockingConnection | None] = field(default_factory=dict)
    tables: dict[tuple[str, str], TableShape | None] = field(default_factory=dict)


def reflect_table(inspector: Inspector, table: str) -> TableShape | None:
    schema, _, name = table.partition(".")
    if not inspector.has_table(name, schema=schema):
        return None
    found = inspector.get_columns(name, schema=schema)
    columns = {c["name"]: c["type"] for c in found}
    keys: list[tuple[str, ...]] = []
    pk = inspector.get_pk_constraint(name, schema=schema).get("constrained_columns") or []
    if pk:
        keys.append(tuple(pk))
    keys += [tuple(u["column_names"]) for u in inspector.get_unique_constraints(name, schema)]
    keys += [  # an expression's column name is None: such an index is unique over more
        tuple(c for c in i["column_names"] if c is not None)
        for i in inspector.get_indexes(name, schema=schema)
        if i.get("unique") and not i.get("dialect_options", {}).get("postgresql_where")
        and None not in i["column_names"]
    ]
    kind = ("view" if name in inspector.get_view_names(schema=schema) else
            "foreign table" if name in _foreign_table_names(inspector, schema) else "table")
    return TableShape(columns=columns, unique_keys=keys,
                      nullable=frozenset(c["name"] for c in found if c.get("nullable", True)),
                      kind=kind)


def _foreign_table_names(inspector: Inspector, schema: str) -> list[str]:
    assert isinstance(inspector, PGInspector)  # trueup's databases are Postgres
    return inspector.get_foreign_table_names(schema=schema)


class Validator:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.reach = _Reach()
        self._stack = ExitStack()

    def run(self) -> list[Finding]:
        with self._stack:
            return list(self._check_all())

    # -- connections ---------------------------------------------------------------------------

    def _check_all(self) -> Iterator[Finding]:
        yield self._check_state()
        for name, conn in self.config.connections.items():
            yield self._check_connection(name, conn.kind)
        for name, rec in self.config.reconciliations.items():
            yield from self._check_reconciliation(name, rec)
        for name in self.config.dead_letters:
            yield from self._check_dead_letter(name)
        yield from self._check_dagster()

    def _check_dagster(self) -> Iterator[Finding]:
        """What the Dagster code location refuses to load besides: two things of the config
        one asset key would name, and the Great Expectations suites of its tables; then the
        columns those suites read, which would fail their checks on every run."""
        from assets.keys import check_distinct  # Dagster's imports, for this check only
        from checks.gx import quality_definitions

        try:
            check_distinct(self.config)
            suites = quality_definitions(self.config).suites
        except ConfigError as exc:
            where = exc.path if exc.file == self.config.path else ": ".join(
                p for p in (exc.file, exc.path) if p)
            yield Finding(path=where or "dagster", ok=False, message=exc.message)
            return
        yield Finding(path="dagster", ok=True, message=f"asset keys distinct, {len(suites)} "
                      f"GX suite{'' if len(suites) == 1 else 's'} of its tables")
        for suite in suites:
            yield from self._check_suite_columns(suite)

    def _check_suite_columns(self, suite: Suite) -> Iterator[Finding]:
        if self.reach.engines.get(suite.connection) is None:
            return  # unreachable: reported with the connection
        shape = self._table(suite.connection, suite.table)
        if shape is None:
            yield Finding(path=f"{suite.file}: table", ok=False,
                          message=f"table {suite.table} does not exist (connection "
                                  f"{suite.connection})")
            return
        for i, expectation in enumerate(suite.expectations):
            for where, column in expectation.columns:
                if column not in shape.columns:
                    yield Finding(path=f"{suite.file}: expectations[{i}].kwargs.{where}",
                                  ok=False, message=f"column {column!r} does not exist in "
                                  f"{suite.table} (connection {suite.connection})")

    def _check_state(self) -> Finding:
        try:
            conn = open_state(self.config.state)
        except TrueupError as exc:
            return Finding(path="state", ok=False, message=str(exc).removeprefix("state: "))
        with conn:
            version = conn.execute("SELECT max(version) AS v FROM trueup.schema_migrations")
            row = version.fetchone()
        return Finding(path="state", ok=True, message=f"{redact(self.config.state)} "
                       f"(schema trueup at migration {row['v'] if row else 0})")

    def _check_connection(self, name: str, kind: ConnectionKind) -> Finding:
        path = f"connections.{name}"
        conn = self.config.connections[name]
        try:
            if kind is ConnectionKind.POSTGRES:
                assert conn.postgres is not None
                engine = sa.create_engine(sqlalchemy_url(conn.postgres),
                                          connect_args={"connect_timeout": 10})
                self._stack.callback(engine.dispose)
                self.reach.engines[name] = None
                with engine.connect() as c:
                    server = c.execute(sa.text("SHOW server_version")).scalar()
                self.reach.engines[name] = engine
                return Finding(path=path, ok=True,
                               message=f"postgres {redact(conn.postgres)} (server {server})")
            if kind is ConnectionKind.KAFKA:
                assert conn.kafka is not None
                self.reach.admins[name] = None
                admin = kafka.connect_admin(conn.kafka, what=path)
                self.reach.admins[name] = admin
                return Finding(path=path, ok=True,
                               message=f"kafka {conn.kafka['bootstrap.servers']}")
            assert conn.rabbitmq is not None
            self.reach.rabbits[name] = None
            rabbit = rabbitmq.connect(conn.rabbitmq, what=path)
            self._stack.callback(_close_quietly, rabbit)
            self.reach.rabbits[name] = rabbit
            return Finding(path=path, ok=True, message=f"rabbitmq {redact(conn.rabbitmq)}")
        except TrueupError as exc:
            return Finding(path=path, ok=False, message=str(exc).removeprefix(f"{path}: "))
        except (sa.exc.SQLAlchemyError, ValueError) as exc:  # ValueError: a malformed DSN
            return Finding(path=path, ok=False, message=f"cannot connect: {first_line(exc)}")

    # -- reconciliations -----------------------------------------------------------------------

    def _table(self, connection: str, table: str) -> TableShape | None:
        if (connection, table) not in self.reach.tables:
            engine = self.reach.engines.get(connection)
            shape = reflect_table(sa.inspect(engine), table) if engine is not None else None
            self.reach.tables[(connection, table)] = shape
        return self.reach.tables[(connection, table)]

    def _check_reconciliation(self, name: str, rec: ReconciliationConfig) -> Iterator[Finding]:
        base = f"reconciliations.{name}"
        source = rec.source
        if self.reach.engines.get(source.connection) is not None:
            yield from self._check_table(
                f"{base}.source", source.connection, source.table, source.key,
                [(f"columns[{i}]", c) for i, c in enumerate(source.columns)],
                source.version, source.updated_at,
            )
        target = rec.target
        if target.table is not None and self.reach.engines.get(target.connection) is not None:
            yield from self._check_table(
                f"{base}.target", target.connection, target.table, target.key,
                [(f"columns.{s}", t) for s, t in target.columns.items()],
                target.version, None, upserted=rec.repair is RepairMode.UPSERT,
            )
            yield from self._check_key_pairs(base, rec)
        elif target.topic is not None and self.reach.admins.get(target.connection) is not None:
            yield self._check_topic(f"{base}.target.topic", target.connection, target.topic)
        consumer = target.consumer
        if consumer is not None and self.reach.admins.get(consumer.connection) is not None:
            yield self._check_topic(f"{base}.target.consumer.topic", consumer.connection,
                                    consumer.topic)

    def _check_key_pairs(self, base: str, rec: ReconciliationConfig) -> Iterator[Finding]:
        """Key columns a diff refuses to compare (trueup.sides: a target key read as its
        source's type must not cut it): a timestamp under a date, a number under a bool."""
        if self.reach.engines.get(rec.source.connection) is None or rec.target.table is None:
            return
        source = self._table(rec.source.connection, rec.source.table)
        target = self._table(rec.target.connection, rec.target.table)
        if source is None or target is None:
            return  # reported with the table
        for i, (s, t) in enumerate(zip(rec.source.key, rec.target.key, strict=True)):
            own, wanted = target.columns.get(t), source.columns.get(s)
            cut = (isinstance(wanted, sa.Date) and not isinstance(wanted, sa.DateTime)
                   and isinstance(own, sa.DateTime)) or (
                isinstance(wanted, sa.Boolean) and isinstance(own, sa.Integer | sa.Numeric))
            if cut:
                yield Finding(path=f"{base}.target.key[{i}]", ok=False, message=(
                    f"key {t} ({own}) cannot be compared exactly with the source's {s} "
                    f"({wanted}): read as {wanted}, distinct keys would be one. Give the "
                    f"target's key the source's type, or reconcile against a view of the "
                    f"target whose key is {wanted}"))

    def _check_table(self, path: str, connection: str, table: str, key: list[str],
                     columns: list[tuple[str, str]], version: str | None,
                     updated_at: str | None, *, upserted: bool = False) -> Iterator[Finding]:
        """Check one table; ``columns`` pairs each compared column with its field path.
        ``upserted``: backfills write it with ``INSERT ... ON CONFLICT`` on the key."""
        shape = self._table(connection, table)
        if shape is None:
            yield Finding(path=f"{path}.table", ok=False,
                          message=f"table {table} does not exist in connection {connection!r}")
            return
        problems = []
        named = [(f"key[{i}]", c) for i, c in enumerate(key)] + columns
        named += [("version", version)] if version else []
        named += [("updated_at", updated_at)] if updated_at else []
        for field_path, column in named:
            if column not in shape.columns:
                problems.append(Finding(
                    path=f"{path}.{field_path}", ok=False,
                    message=f"column {column!r} does not exist in {table} "
                            f"(columns: {', '.join(shape.columns)})"))
        if problems:
            yield from problems
            return
        # every problem of the table's columns at once: one fix, one more run of validate
        # (a view or foreign table has no index to prove its key unique: diff and backfill
        # read one as they read a table, so it is valid, and its ok line says what is unchecked)
        indexed = shape.kind == "table"
        if upserted and not indexed:
            problems.append(Finding(
                path=f"{path}.table", ok=False,
                message=f"{table} is a {shape.kind}: repair upsert writes it with INSERT ... "
                        f"ON CONFLICT on its key, which needs a table with a unique index of "
                        f"the key; upsert into the table itself, or set repair: none"))
        elif indexed and not any(set(k) == set(key) for k in shape.unique_keys):
            problems.append(Finding(
                path=f"{path}.key", ok=False,
                message=f"no primary key or unique index of {table} is exactly "
                        f"({', '.join(key)}); a key must identify one row"))
        elif path.endswith(".source"):
            problems += self._null_keys(path, connection, table, key, shape)
        # a target's version is read as its source's (a text version holding numbers is
        # compared as those numbers): text is a version there too
        orderable = ORDERABLE_VERSION_TYPES + ((sa.String,) if path.endswith(".target") else ())
        if version and not isinstance(shape.columns[version], orderable):
            problems.append(Finding(
                path=f"{path}.version", ok=False,
                message=f"column {version!r} is {shape.columns[version]}, which cannot be "
                        f"ordered as a version (expected an integer, numeric, timestamp or "
                        f"date column)"))
        if updated_at and not isinstance(shape.columns[updated_at], sa.DateTime | sa.Date):
            problems.append(Finding(
                path=f"{path}.updated_at", ok=False,
                message=f"column {updated_at!r} is {shape.columns[updated_at]} (expected a "
                        f"timestamp or date column)"))
        problems += self._without_canonical_form(path, connection, table, named)
        if problems:
            yield from problems
            return
        yield Finding(path=path, ok=True,
                      message=f"{table}: key ({', '.join(key)}), "
                              f"{len(columns)} compared column{'s' * (len(columns) != 1)}"
                              + (f", version {version}" if version else "")
                              + ("" if indexed else f"; a {shape.kind} holds no index: that "
                                 f"({', '.join(key)}) identifies one row is not checked"))

    def _null_keys(self, path: str, connection: str, table: str, key: list[str],
                   shape: TableShape) -> list[Finding]:
        """The source's key columns that hold NULL: such rows cannot be told apart, nor
        repaired (a unique index takes NULL more than once). Columns declared NOT NULL (a
        primary key's) are not read; the others in one statement, given
        :data:`NULL_KEY_SECONDS` (a scan of a big table that outlasts it is skipped)."""
        nullable = [(i, column) for i, column in enumerate(key) if column in shape.nullable]
        if not nullable:
            return []
        engine = self.reach.engines[connection]
        assert engine is not None
        quote = engine.dialect.identifier_preparer.quote
        relation = ".".join(quote(part) for part in table.split("."))
        # EXISTS stops at the first NULL, and a key column's index finds one at once
        probes = ", ".join(f"EXISTS (SELECT 1 FROM {relation} WHERE {quote(column)} IS NULL)"
                           for _, column in nullable)
        try:
            with engine.connect() as conn, conn.begin():
                conn.execute(sa.text(f"SET LOCAL statement_timeout = "
                                     f"{int(NULL_KEY_SECONDS * 1000)}"))
                row = conn.execute(sa.text(f"SELECT {probes}")).one()
        except sa.exc.OperationalError as exc:
            if isinstance(exc.orig, psycopg.errors.QueryCanceled):
                log.warning("validate.null_keys_unchecked", table=table,
                            seconds=NULL_KEY_SECONDS)
                return []
            raise
        except sa.exc.DBAPIError as exc:  # no SELECT on the table, say: a diff fails too
            reason = first_line(exc.orig or exc)
            return [Finding(path=f"{path}.key", ok=False,
                            message=f"cannot read the key of {table}: {reason}")]
        return [Finding(path=f"{path}.key[{i}]", ok=False,
                        message=f"column {column!r} of {table} holds NULL: a key must identify "
                                f"one row (rows with a NULL key part can be neither compared "
                                f"nor repaired); declare it NOT NULL or key on other columns")
                for (i, column), held in zip(nullable, row, strict=True) if held]

    def _without_canonical_form(self, path: str, connection: str, table: str,
                                named: list[tuple[str, str]]) -> list[Finding]:
        """The columns (``(field path, column)`` under ``path``) whose type trueup cannot
        compare (an array, bytea): a diff would refuse them."""
        engine = self.reach.engines[connection]
        assert engine is not None
        raw = engine.raw_connection()
        try:
            conn = raw.driver_connection
            assert isinstance(conn, psycopg.Connection)
            types = column_types(conn, table)
            return [Finding(path=f"{path}.{field_path}", ok=False,
                            message=f"column {column!r} of {table} is {typname}, which has no "
                                    f"canonical form to compare (see docs/fingerprint.md)")
                    for field_path, column in named if column not in types
                    for typname in [_type_name(conn, table, column)]]
        finally:
            raw.close()

    def _check_topic(self, path: str, connection: str, topic: str, *,
                     parking: bool = False) -> Finding:
        """Whether ``topic`` exists; a ``parking`` lot need not yet (see :func:`_not_yet`)."""
        admin = self.reach.admins[connection]
        assert admin is not None
        try:
            partitions = kafka.topic_partitions(admin, topic, what=path)
        except TrueupError as exc:
            return Finding(path=path, ok=False, message=str(exc).removeprefix(f"{path}: "))
        if partitions is None:
            return _not_yet(path, "topic", topic) if parking else Finding(
                path=path, ok=False,
                message=f"topic {topic!r} does not exist in connection {connection!r}")
        return Finding(path=path, ok=True, message=f"topic {topic} ({partitions} partitions)")

    # -- dead letters --------------------------------------------------------------------------

    def _check_dead_letter(self, name: str) -> Iterator[Finding]:
        dlq = self.config.dead_letters[name]
        base = f"dead_letters.{name}"
        if dlq.topic is not None:
            if self.reach.admins.get(dlq.connection) is None:
                return
            yield self._check_topic(f"{base}.topic", dlq.connection, dlq.topic)
            if dlq.replay_to is not None and dlq.replay_to.name is not None:
                yield self._check_topic(f"{base}.replay_to", dlq.connection, dlq.replay_to.name)
            if dlq.parking is not None:
                yield self._check_topic(f"{base}.parking", dlq.connection, dlq.parking,
                                        parking=True)
            return
        rabbit = self.reach.rabbits.get(dlq.connection)
        if rabbit is None or dlq.queue is None:
            return
        yield self._check_queue(rabbit, f"{base}.queue", dlq.queue)
        if dlq.replay_to is not None:
            if dlq.replay_to.exchange is not None:
                exists = exchange_or_error(rabbit, dlq.replay_to.exchange)
                yield Finding(path=f"{base}.replay_to.exchange", ok=exists,
                              message=f"exchange {dlq.replay_to.exchange}" if exists else
                              f"exchange {dlq.replay_to.exchange!r} does not exist")
            elif dlq.replay_to.name is not None:
                yield self._check_queue(rabbit, f"{base}.replay_to", dlq.replay_to.name)
        if dlq.parking is not None:
            yield self._check_queue(rabbit, f"{base}.parking", dlq.parking, parking=True)

    def _check_queue(self, rabbit: pika.BlockingConnection, path: str, queue: str, *,
                     parking: bool = False) -> Finding:
        """Whether ``queue`` exists; a ``parking`` lot need not yet (see :func:`_not_yet`)."""
        depth = rabbitmq.queue_depth(rabbit, queue)
        if depth is None:
            return _not_yet(path, "queue", queue) if parking else Finding(
                path=path, ok=False, message=f"queue {queue!r} does not exist")
        return Finding(path=path, ok=True, message=f"queue {queue} ({depth} ready)")


def _not_yet(path: str, kind: str, name: str) -> Finding:
    """A parking lot that does not exist yet is fine: the first replay that parks a letter
    creates it."""
    return Finding(path=path, ok=True, message=f"{kind} {name} does not exist yet (the first "
                   f"replay that parks a letter creates it)")


def _type_name(conn: psycopg.Connection[Any], table: str, column: str) -> str:
    row = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                       "WHERE attrelid = %s::regclass AND attname = %s",
                       (psycopg.sql.Identifier(*table.split(".")).as_string(conn),
                        column)).fetchone()
    return str(row[0]) if row else "unknown"


def exchange_or_error(rabbit: pika.BlockingConnection, exchange: str) -> bool:
    return rabbitmq.exchange_exists(rabbit, exchange)


def validate(config: Config) -> list[Finding]:
    """Every check of ``trueup validate``, in config order."""
    return Validator(config).run()


def _close_quietly(connection: pika.BlockingConnection) -> None:
    # The broker may already have dropped the connection; closing is best effort.
    with contextlib.suppress(Exception):
        connection.close()
