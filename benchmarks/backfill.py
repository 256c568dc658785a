"""Backfill speed: repair 1,000,000 rows by upsert and by republish, next to their floors.

Floors, measured in the same run on the same data:

* upsert floor: a plain ``COPY`` of the source rows into the (emptied) target table, piped
  from ``COPY ... TO STDOUT`` on the source server, no comparison and no bookkeeping;
* upsert stale floor: the same COPY into a stage on the target, then one ``UPDATE ... FROM``
  it of a target holding every key one version behind (what repairing a populated target
  cannot do with less: each row updated once), no comparison, no guard, no bookkeeping;
* republish floor: the same JSON messages (rendered as trueup renders them, ``row_to_json``)
  read from the source in one query and produced with confluent-kafka (idempotent,
  ``acks=all``), one flush at the end, no bookkeeping.

trueup's runs do everything a real backfill does: plan chunks on the key index, lease and
heartbeat each chunk, write, record one repairs row per key, complete the chunk. Into the
empty target each upsert chunk goes in by one COPY (the target holds no row of it); the
``upsert stale`` row repairs a target holding every key one version behind, so each chunk is
compared with it and written under the version guard; it is measured against the stale floor
(issue 4's target is the upsert floor's; the stale pair shows what updating costs). Target:
at least 50% of each floor's rows per second.

    .venv/bin/python benchmarks/backfill.py [--rows 1000000] [--chunk-size 10000] [--repeat 3]

Every row runs ``--repeat`` times, in rounds (the floors and trueup's runs interleaved, so the
machine's changing load falls on all of them); the table shows each row's median and its runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import yaml
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trueup.backfill import BackfillOptions, WorkerOptions, start_backfill  # noqa: E402
from trueup.config import load_config  # noqa: E402
from trueup.statuses import BackfillScope  # noqa: E402

#: Each trueup row's target: this share of its floor's rows per second (issue 4).
TARGET_SHARE = 0.5

PG = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
KAFKA = os.environ.get("BENCH_KAFKA", "127.0.0.1:9092")
SOURCE_DB, TARGET_DB, STATE_DB = "bench_backfill_source", "bench_backfill_target", \
    "bench_backfill_state"
DDL = ("CREATE TABLE {} (id bigint PRIMARY KEY, version bigint NOT NULL, status text, "
       "amount numeric(12,2), qty integer, note text)")


def dsn(db: str) -> str:
    return f"{PG}/{db}"


def recreate(db: str) -> None:
    with psycopg.connect(dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(db)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))


def prepare(rows: int) -> None:
    recreate(SOURCE_DB)
    recreate(TARGET_DB)
    with psycopg.connect(dsn(SOURCE_DB), autocommit=True) as conn:
        conn.execute(sql.SQL(DDL).format(sql.Identifier("items")))
        conn.execute("INSERT INTO items SELECT g, 1 + g %% 7, 's' || (g %% 11), "
                     "(g %% 10000) / 100.0, g %% 97, md5(g::text) "
                     "FROM generate_series(1, %s) g", (rows,))
        conn.execute("VACUUM ANALYZE items")
    with psycopg.connect(dsn(TARGET_DB), autocommit=True) as conn:
        conn.execute(sql.SQL(DDL).format(sql.Identifier("items")))


def empty_target() -> None:
    with psycopg.connect(dsn(TARGET_DB), autocommit=True) as conn:
        conn.execute("TRUNCATE items")
        conn.execute("CHECKPOINT")


def stale_target() -> None:
    """The target holding every source row one version behind."""
    empty_target()
    with psycopg.connect(dsn(SOURCE_DB)) as src, psycopg.connect(dsn(TARGET_DB)) as dst:
        with src.cursor() as s, dst.cursor() as d, s.copy(
                "COPY (SELECT id, version - 1, status, amount, qty, note FROM items) "
                "TO STDOUT") as out, d.copy("COPY items FROM STDIN") as into:
            for block in out:
                into.write(block)
        dst.commit()
    with psycopg.connect(dsn(TARGET_DB), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE items")
        conn.execute("CHECKPOINT")


def floor_copy() -> float:
    started = time.perf_counter()
    with psycopg.connect(dsn(SOURCE_DB)) as src, psycopg.connect(dsn(TARGET_DB)) as dst:
        with src.cursor() as s, dst.cursor() as d, \
                s.copy("COPY (SELECT * FROM items) TO STDOUT") as out, \
                d.copy("COPY items FROM STDIN") as into:
            for block in out:
                into.write(block)
        dst.commit()
    return time.perf_counter() - started


def floor_update() -> float:
    """The floor of repairing a stale target: the source rows piped by COPY into a stage on
    the target, then one UPDATE of the target's rows from it (no comparison, no version
    guard, no bookkeeping)."""
    started = time.perf_counter()
    with psycopg.connect(dsn(SOURCE_DB)) as src, psycopg.connect(dsn(TARGET_DB)) as dst:
        dst.execute("CREATE TEMP TABLE stage (LIKE items) ON COMMIT DROP")
        with src.cursor() as s, dst.cursor() as d, \
                s.copy("COPY (SELECT * FROM items) TO STDOUT") as out, \
                d.copy("COPY stage FROM STDIN") as into:
            for block in out:
                into.write(block)
        dst.execute("UPDATE items AS t SET version = s.version, status = s.status, "
                    "amount = s.amount, qty = s.qty, note = s.note FROM stage AS s "
                    "WHERE t.id = s.id")
        dst.commit()
    return time.perf_counter() - started


def new_topic() -> str:
    name = f"bench.backfill.{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": KAFKA})
    for future in admin.create_topics([NewTopic(name, num_partitions=3,
                                                replication_factor=1)]).values():
        future.result()
    return name


def drop_topic(name: str) -> None:
    admin = AdminClient({"bootstrap.servers": KAFKA})
    for future in admin.delete_topics([name]).values():
        future.result()


def floor_produce(topic: str) -> float:
    started = time.perf_counter()
    # trueup's producer settings, failure reports only included
    producer = Producer({"bootstrap.servers": KAFKA, "acks": "all", "enable.idempotence": True,
                         "linger.ms": 5, "delivery.report.only.error": True})
    failed: list[Any] = []

    def report(error: Any, message: Any) -> None:
        if error is not None:
            failed.append(error)

    with psycopg.connect(dsn(SOURCE_DB)) as conn, conn.cursor(name="floor") as cur:
        cur.itersize = 10_000
        # the same messages as trueup's, byte for byte (row_to_json; trueup takes a scalar
        # subquery, a little dearer than this LATERAL join), produced as trueup produces them:
        # one positional call per message, no poll() but when the local queue is full
        cur.execute("SELECT i.id::text, row_to_json(m)::text FROM items AS i CROSS JOIN "
                    "LATERAL (SELECT i.id, i.version, i.status, i.amount, i.qty, i.note) AS m "
                    "ORDER BY i.id")
        send = producer.produce
        for key, value in cur:
            while True:
                try:
                    send(topic, value, key, on_delivery=report)
                    break
                except BufferError:
                    producer.poll(0.05)
    assert producer.flush(120) == 0 and not failed
    return time.perf_counter() - started


def config_file(directory: str, topic: str | None) -> Path:
    target: dict[str, Any]
    if topic:
        target = {"connection": "bus", "topic": topic, "format": "json", "key": ["id"],
                  "version": "version", "columns": ["status", "amount", "qty", "note"]}
    else:
        target = {"connection": "target", "table": "public.items", "key": ["id"],
                  "version": "version", "columns": ["status", "amount", "qty", "note"]}
    raw = {"state": dsn(STATE_DB),
           "connections": {"source": {"postgres": dsn(SOURCE_DB)},
                           "target": {"postgres": dsn(TARGET_DB)},
                           "bus": {"kafka": {"bootstrap.servers": KAFKA}}},
           "reconciliations": {"items": {
               "source": {"connection": "source", "table": "public.items", "key": ["id"],
                          "version": "version", "columns": ["status", "amount", "qty", "note"]},
               "target": target, "repair": "republish" if topic else "upsert"}}}
    path = Path(directory) / "trueup.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def trueup_backfill(path: Path, chunk_size: int, workers: int) -> tuple[float, int]:
    recreate(STATE_DB)
    config = load_config(path)
    started = time.perf_counter()
    summary = start_backfill(config, "items", BackfillOptions(
        scope=BackfillScope.ALL, chunk_size=chunk_size, workers=workers),
        WorkerOptions(workers=workers))
    seconds = time.perf_counter() - started
    assert summary.status.value == "succeeded", summary
    return seconds, summary.rows_repaired


def one_round(rows: int, chunk_size: int) -> list[tuple[str, float, int]]:
    """Every row of the table once: (what, seconds, rows repaired or moved)."""
    measured: list[tuple[str, float, int]] = []
    empty_target()
    measured.append(("upsert floor: COPY source -> target", floor_copy(), rows))
    for workers in (1, 2):
        empty_target()
        with tempfile.TemporaryDirectory() as tmp:
            seconds, repaired = trueup_backfill(config_file(tmp, None), chunk_size, workers)
        assert repaired == rows, repaired
        measured.append((f"trueup backfill --all, upsert, {workers} worker(s)", seconds,
                         repaired))
    stale_target()
    measured.append(("upsert stale floor: COPY to a stage, one UPDATE", floor_update(), rows))
    stale_target()
    with tempfile.TemporaryDirectory() as tmp:
        seconds, repaired = trueup_backfill(config_file(tmp, None), chunk_size, 2)
    assert repaired == rows, repaired
    measured.append(("trueup backfill --all, upsert stale, 2 worker(s)", seconds, repaired))
    topic = new_topic()
    try:
        floor = floor_produce(topic)
    finally:
        drop_topic(topic)
    measured.append(("republish floor: produce (acks=all)", floor, rows))
    for workers in (1, 2):
        topic = new_topic()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                seconds, repaired = trueup_backfill(config_file(tmp, topic), chunk_size,
                                                    workers)
        finally:
            drop_topic(topic)
        assert repaired == rows, repaired
        measured.append((f"trueup backfill --all, republish, {workers} worker(s)", seconds,
                         repaired))
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of every row, floors included; the table shows medians")
    args = parser.parse_args()
    rows = args.rows
    print(f"preparing {rows:,} source rows ...", file=sys.stderr)
    prepare(rows)
    rounds = []
    for n in range(args.repeat):
        print(f"round {n + 1} of {args.repeat} ...", file=sys.stderr)
        rounds.append(one_round(rows, args.chunk_size))
    # medians per row; each trueup row is compared with the floor row above it
    results: list[tuple[str, float, int, float | None, list[float]]] = []
    floor: float | None = None
    for i, (what, _, n) in enumerate(rounds[0]):
        times = sorted(r[i][1] for r in rounds)
        median = statistics.median(times)
        is_floor = "floor" in what
        results.append((what, median, n, None if is_floor else floor, times))
        if is_floor:
            floor = median

    header = (f"| {'what':<48} | {'rows':>9} | {'seconds':>7} | {'rows/s':>9} | "
              f"{'of floor (target 50%)':>21} | {'runs (s)':<20} |")
    print(f"{rows:,} rows, chunk size {args.chunk_size:,}, {os.cpu_count()} cores, "
          f"median of {args.repeat} rounds")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for what, seconds, n, floor_seconds, times in results:
        share = "-"
        if floor_seconds:
            met = "met" if floor_seconds / seconds >= TARGET_SHARE else "not met"
            share = f"{floor_seconds / seconds:.1%} {met}"
        runs = " ".join(f"{t:.2f}" for t in times)
        print(f"| {what:<48} | {n:>9,} | {seconds:>7.2f} | {n / seconds:>9,.0f} | {share:>21} | "
              f"{runs:<20} |")
    print(json.dumps({"rows": rows, "results": [
        {"what": w, "seconds": round(s, 3), "rows": n, "runs": [round(t, 3) for t in times]}
        for w, s, n, _, times in results]}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
