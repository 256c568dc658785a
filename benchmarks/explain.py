"""The plans of trueup's hot queries, captured while trueup itself runs them.

Builds a source and a target table of ROWS orders (0.1 % drift) in scratch databases on the
local Postgres, then runs a whole-table diff, a one-day partition diff and a backfill of the
run's differences, with ``auto_explain`` loaded into every trueup connection (``log_analyze``,
``log_buffers``, plans sent to the client as notices). Prints one plan per hot query, as quoted
in docs/operations.md. The scratch databases are dropped at the end.

    .venv/bin/python benchmarks/explain.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trueup.db
from trueup.backfill import BackfillOptions, WorkerOptions, start_backfill
from trueup.config import load_config
from trueup.diff import diff
from trueup.statuses import BackfillScope

PG_SERVER = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
AUTO_EXPLAIN = ("-c session_preload_libraries=auto_explain -c auto_explain.log_min_duration=0 "
                "-c auto_explain.log_analyze=on -c auto_explain.log_buffers=on "
                "-c auto_explain.log_timing=on -c auto_explain.log_level=notice "
                "-c client_min_messages=notice")

#: (title, a fragment of the query text that picks the statement out)
HOT = [
    ("checksum pass (whole-table diff, each side)", "bit_xor("),
    ("rows of differing segments (key ranges on the key index)", "unnest($1::"),
    ("one day of the source (partition diff, server-side cursor)", "trueup_partition"),
    ("target rows for a batch of source keys (partition diff)", "AS u("),
    ("claim_chunk (backfill workers)", "FOR UPDATE SKIP LOCKED"),
    ("complete_chunk (backfill workers)", "counted AS"),
]


def _db(name: str) -> str:
    return f"{PG_SERVER}/{name}"


@contextlib.contextmanager
def scratch(names: list[str]) -> Iterator[list[str]]:
    with psycopg.connect(_db("postgres"), autocommit=True) as admin:
        for name in names:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield [_db(n) for n in names]
    finally:
        with psycopg.connect(_db("postgres"), autocommit=True) as admin:
            for name in names:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)))


def build(source: str, target: str, rows: int) -> None:
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.orders (id bigint PRIMARY KEY, version bigint NOT NULL,"
                     " status text NOT NULL, amount_cents bigint NOT NULL, currency text NOT NULL,"
                     " updated_at timestamptz NOT NULL)")
        conn.execute("INSERT INTO public.orders SELECT g, 1 + g %% 3, "
                     "(ARRAY['new','paid','shipped'])[1 + g %% 3], g * 7 %% 100000, 'EUR', "
                     "timestamptz '2026-01-01 00:00+00' + (g %% 30) * interval '1 day' "
                     "+ (g %% 86400) * interval '1 second' FROM generate_series(1, %s) g",
                     (rows,))
        conn.execute("CREATE INDEX orders_updated_at ON public.orders (updated_at)")
        conn.execute("VACUUM ANALYZE public.orders")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.copy (order_id bigint PRIMARY KEY, "
                     "order_version bigint NOT NULL, status text, total_cents bigint, "
                     "currency text)")
        conn.execute("INSERT INTO public.copy SELECT g, 1 + g %% 3, "
                     "(ARRAY['new','paid','shipped'])[1 + g %% 3], g * 7 %% 100000, 'EUR' "
                     "FROM generate_series(1, %s) g WHERE g %% 2000 <> 0", (rows,))
        conn.execute("UPDATE public.copy SET total_cents = -1 WHERE order_id % 3001 = 0")
        conn.execute("VACUUM ANALYZE public.copy")


def capture() -> list[tuple[str, str]]:
    """Make every connection trueup opens from now on explain its statements to us."""
    plans: list[tuple[str, str]] = []
    original = psycopg.connect

    def connect(*args: Any, **kw: Any) -> Any:
        conn = original(*args, **kw)
        conn.add_notice_handler(lambda d: plans.append((d.message_primary or "", "")))
        return conn

    trueup.db.SESSION_OPTIONS = f"{trueup.db.SESSION_OPTIONS} {AUTO_EXPLAIN}"
    psycopg.connect = connect  # type: ignore[assignment]
    return plans


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    pid = os.getpid()
    names = [f"trueup_explain_src_{pid}", f"trueup_explain_dst_{pid}",
             f"trueup_explain_state_{pid}"]
    with scratch(names) as (source, target, state), tempfile.TemporaryDirectory() as tmp:
        build(source, target, args.rows)
        path = Path(tmp) / "trueup.yaml"
        path.write_text(yaml.safe_dump({
            "state": state,
            "connections": {"shop": {"postgres": source}, "billing": {"postgres": target}},
            "reconciliations": {"orders": {
                "source": {"connection": "shop", "table": "public.orders", "key": ["id"],
                           "version": "version", "updated_at": "updated_at",
                           "columns": ["status", "amount_cents", "currency"]},
                "target": {"connection": "billing", "table": "public.copy",
                           "key": ["order_id"], "version": "order_version",
                           "columns": {"status": "status", "amount_cents": "total_cents",
                                       "currency": "currency"}},
                "partitions": {"daily": {"start": "2026-01-01"}},
                "repair": "upsert"}}}))
        config = load_config(path)
        diff(config, "orders")  # migrates the state first, so its DDL is not captured
        plans = capture()
        whole = diff(config, "orders")
        diff(config, "orders", partition="2026-01-15")
        start_backfill(config, "orders", BackfillOptions(scope=BackfillScope.RUN,
                                                         run_id=whole.run_id, chunk_size=100),
                       WorkerOptions(workers=1))
        print(f"# {args.rows:,} source rows; whole-table diff found "
              f"{whole.missing} missing, {whole.mismatch} mismatch")
        for title, fragment in HOT:
            found = [p for p, _ in plans if fragment in p]
            print(f"\n## {title}\n")
            print(shorten(found[0]) if found else "(not captured)")


def shorten(plan: str) -> str:
    """Long array literals (segment bounds, key lists) and query texts cut to readable size."""
    plan = re.sub(r"'\{([^,}]*,[^,}]*,[^,}]*),[^}]{40,}\}'", r"'{\1,...}'", plan)
    lines = []
    for line in plan.splitlines():
        if line.startswith("Query Text:") and len(line) > 240:
            line = line[:240] + " ..."
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
