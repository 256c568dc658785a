"""Shared helpers of the benchmarks: databases, data generation, measured subprocesses, tables.

Benchmarks are scripts, not tests: they build their data on the local stack (Postgres on
127.0.0.1:5432, Kafka on 127.0.0.1:9092), run each tool as a subprocess whose wall time and peak
resident memory are measured, and print a table with a verdict block.

Run as a script, this module is also the *floor* worker (see :func:`floor_main`): the cheapest
possible whole-table comparison, one ``count(*)`` plus one aggregate-fingerprint scan per table.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psycopg

PG_SERVER = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
KAFKA_BOOTSTRAP = os.environ.get("BENCH_KAFKA", "127.0.0.1:9092")
REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "benchmarks"
TRUEUP = REPO / ".venv" / "bin" / "trueup"
PYTHON = REPO / ".venv" / "bin" / "python"

#: Bumped whenever the generated data changes shape, so old databases are rebuilt.
GENERATOR_VERSION = 1

#: The benchmark table: bigint key and 7 columns (version + 6 compared columns).
TABLE = "public.items"
KEY = "id"
VERSION = "version"
COLUMNS = ["status", "amount", "qty", "price", "note", "updated_at"]
ALL_COLUMNS = [KEY, VERSION, *COLUMNS]

CREATE_ITEMS = """
CREATE TABLE public.items (
    id          bigint NOT NULL,
    version     bigint NOT NULL,
    status      text NOT NULL,
    amount      numeric(12,2),
    qty         integer,
    price       double precision,
    note        text,
    updated_at  timestamptz NOT NULL
)
"""

#: Deterministic pseudo-random values from the id and a seed (hashint8extended), no random().
#: ``{ids}`` is a set-returning expression of ids; rows with even ids are the generated table,
#: odd ids are used for orphans. About 10% of notes are NULL.
ROWS_SELECT = """
SELECT id,
       1 + (h1 & 7)                                                         AS version,
       (ARRAY['new','paid','packed','shipped','delivered','cancelled','refunded'])
           [1 + mod((h1 >> 8) & 65535, 7)]                                    AS status,
       round(((h2 & 16777215)::numeric / 100), 2)                           AS amount,
       ((h2 >> 24) & 4095)::integer                                         AS qty,
       ((h1 >> 24) & 268435455)::double precision / 1000                    AS price,
       CASE WHEN (h3 & 1023) < 102 THEN NULL
            ELSE 'note ' || to_hex((h3 >> 10) & 1099511627775) END          AS note,
       timestamptz '2024-01-01 00:00:00+00'
           + ((h3 >> 16) & 70368744177663) / 1000000 * interval '1 second'
           + mod((h3 >> 16) & 70368744177663, 1000000) * interval '1 microsecond' AS updated_at
FROM (SELECT id, hashint8extended(id, {seed}) AS h1, hashint8extended(id, {seed} + 1) AS h2,
             hashint8extended(id, {seed} + 2) AS h3
      FROM {ids} AS t(id)) s
"""

#: Changes one compared column of a row (which one depends on the id), never the version:
#: a changed row is a ``mismatch``, not ``stale``/``ahead``.
CHANGE_SET = """
status = CASE WHEN mod(id / 2, 6) = 0 THEN status || '-x' ELSE status END,
amount = CASE WHEN mod(id / 2, 6) = 1 THEN amount + 0.01 ELSE amount END,
qty = CASE WHEN mod(id / 2, 6) = 2 THEN qty + 1 ELSE qty END,
price = CASE WHEN mod(id / 2, 6) = 3 THEN price + 1 ELSE price END,
note = CASE WHEN mod(id / 2, 6) = 4 THEN (CASE WHEN note IS NULL THEN 'added' END) ELSE note END,
updated_at = CASE WHEN mod(id / 2, 6) = 5 THEN updated_at + interval '1 second' ELSE updated_at END
"""


def dsn(database: str) -> str:
    return f"{PG_SERVER}/{database}"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Databases


def admin() -> psycopg.Connection[Any]:
    return psycopg.connect(dsn("postgres"), autocommit=True)


def database_exists(name: str) -> bool:
    with admin() as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() \
            is not None


def drop_database(name: str) -> None:
    with admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def create_database(name: str, template: str | None = None) -> None:
    with admin() as conn:
        if template:
            # A file-level copy: the fastest way to clone a generated database.
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
        else:
            conn.execute(f'CREATE DATABASE "{name}"')


def recreate_database(name: str) -> None:
    drop_database(name)
    create_database(name)


def read_marker(database: str) -> dict[str, Any] | None:
    """The ``bench_meta`` marker of a generated database, or None when absent."""
    if not database_exists(database):
        return None
    with psycopg.connect(dsn(database)) as conn:
        found = conn.execute("SELECT to_regclass('public.bench_meta')").fetchone()
        if not found or found[0] is None:
            return None
        row = conn.execute("SELECT spec FROM public.bench_meta").fetchone()
        return None if row is None else dict(row[0])


def write_marker(conn: psycopg.Connection[Any], spec: dict[str, Any]) -> None:
    conn.execute("DROP TABLE IF EXISTS public.bench_meta")
    conn.execute("CREATE TABLE public.bench_meta (spec jsonb NOT NULL)")
    conn.execute("INSERT INTO public.bench_meta (spec) VALUES (%s)", (json.dumps(spec),))


#: The text key of ``--key text``: derived from the id, so drift is still applied by id.
TEXT_KEY = "code"
TEXT_KEY_COLUMN = ("code text GENERATED ALWAYS AS ('item-' || lpad(id::text, 12, '0')) "
                   "STORED")


def generate_items(conn: psycopg.Connection[Any], rows: int, seed: int, *,
                   text_key: bool = False) -> None:
    """Create ``public.items`` with ids 2, 4, ..., 2*rows (even: odd ids are left for orphans);
    with ``text_key`` the primary key is the text column ``code`` derived from the id."""
    conn.execute("DROP TABLE IF EXISTS public.items")
    conn.execute(CREATE_ITEMS)
    if text_key:
        conn.execute(f"ALTER TABLE public.items ADD COLUMN {TEXT_KEY_COLUMN}")
    ids = f"(SELECT g * 2 FROM generate_series(1, {int(rows)}) g)"
    conn.execute("SET work_mem = '256MB'")
    conn.execute(f"INSERT INTO public.items {ROWS_SELECT.format(seed=int(seed), ids=ids)}")
    conn.execute("SET maintenance_work_mem = '512MB'")
    conn.execute(f"ALTER TABLE public.items ADD PRIMARY KEY ({TEXT_KEY if text_key else KEY})")
    if text_key:
        conn.execute("CREATE INDEX ON public.items (id)")  # for applying the drift


def insert_generated(conn: psycopg.Connection[Any], ids: Sequence[int], seed: int) -> None:
    """Insert rows generated (like the table) for ``ids``: the orphans of a target."""
    if ids:
        conn.execute(
            f"INSERT INTO public.items "
            f"{ROWS_SELECT.format(seed=int(seed), ids='unnest(%s::bigint[])')}",
            (list(ids),))


def vacuum_analyze(database: str) -> None:
    with psycopg.connect(dsn(database), autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) public.items")


def table_rows(database: str) -> int:
    with psycopg.connect(dsn(database)) as conn:
        row = conn.execute("SELECT count(*) FROM public.items").fetchone()
        return int(row[0]) if row else 0


# ---------------------------------------------------------------------------------------------
# Measured subprocesses


@dataclasses.dataclass
class Measured:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_mb: float


TIME = "/usr/bin/time"


def measure(argv: Sequence[str], *, env: dict[str, str] | None = None,
            cwd: str | os.PathLike[str] | None = None) -> Measured:
    """Run ``argv``; return its output, wall seconds and peak RSS (MB).

    The peak RSS is the child's own maximum resident set size, reported by ``/usr/bin/time -f
    %M`` (Debian package ``time``), which runs it. Not ``os.wait4`` on the child directly, nor
    RUSAGE_CHILDREN: on Linux a child forked from this process starts with this process's
    high-water mark, so a small child would report the benchmark's own size. Without
    ``/usr/bin/time`` it falls back to ``os.wait4`` and the figure is an upper bound.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(prefix="bench-rss-", suffix=".txt") as rss:
        wrapped = os.access(TIME, os.X_OK)
        full = [TIME, "-f", "%M", "-o", rss.name, *argv] if wrapped else list(argv)
        start = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out, stderr=err, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped by wait4
        peak_kb = float(usage.ru_maxrss)  # Linux: kilobytes
        if wrapped:
            text = Path(rss.name).read_text().strip().splitlines()
            # time prints "Command exited with non-zero status N" before the figure
            peak_kb = float(text[-1]) if text and text[-1].isdigit() else float("nan")
        out.seek(0)
        err.seek(0)
        return Measured(list(argv), proc.returncode, out.read().decode(errors="replace"),
                        err.read().decode(errors="replace"), seconds, peak_kb / 1024)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------
# trueup


def write_config(path: Path, document: dict[str, Any]) -> None:
    import yaml  # the main venv has PyYAML (a trueup dependency)

    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")


def premigrate_state(state_dsn: str) -> str | None:
    """Create trueup's state schema ahead of the measured run; return a problem or None."""
    try:
        from trueup.state import open_state

        open_state(state_dsn).close()
        return None
    except Exception as exc:  # the benchmark reports it and carries on
        return f"{type(exc).__name__}: {exc}"


def run_trueup(config: Path, name: str) -> tuple[Measured, dict[str, Any] | None, str]:
    """``trueup --config CONFIG diff NAME --json``: the measurement, its JSON, a note."""
    m = measure([str(TRUEUP), "--config", str(config), "diff", name, "--json"], cwd=REPO)
    if m.returncode in (0, 1):
        try:
            document = json.loads(last_line(m.stdout))
        except ValueError:
            return m, None, f"exit {m.returncode}, unparsable output: {last_line(m.stdout)[:80]}"
        if isinstance(document, dict):
            return m, document, ""
        return m, None, f"exit {m.returncode}, unexpected JSON: {last_line(m.stdout)[:80]}"
    return m, None, f"exit {m.returncode}: {last_line(m.stderr)[:100] or 'no message'}"


# ---------------------------------------------------------------------------------------------
# The floor worker: python benchmarks/_common.py floor --concurrent DSN_A DSN_B


def floor_queries(table: str, columns: Sequence[str]) -> list[str]:
    cols = ", ".join(columns)
    return [
        f"SELECT count(*) FROM {table}",
        f"SELECT bit_xor(hashtextextended(concat_ws('|', {cols}), 0)) FROM {table}",
    ]


def _floor_side(target: str, queries: list[str], out: dict[str, Any]) -> None:
    start = time.perf_counter()
    with psycopg.connect(target) as conn:
        results = [conn.execute(q).fetchone()[0] for q in queries]  # type: ignore[index]
    out[target] = {"results": results, "seconds": time.perf_counter() - start}


def floor_main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="_common.py floor")
    parser.add_argument("--sequential", action="store_true",
                        help="scan one database after the other (default: both at once)")
    parser.add_argument("--table", default=TABLE)
    parser.add_argument("--columns", default=",".join(ALL_COLUMNS))
    parser.add_argument("dsns", nargs="+")
    args = parser.parse_args(argv)
    queries = floor_queries(args.table, args.columns.split(","))
    out: dict[str, Any] = {}
    start = time.perf_counter()
    if args.sequential:
        for target in args.dsns:
            _floor_side(target, queries, out)
    else:
        threads = [threading.Thread(target=_floor_side, args=(t, queries, out))
                   for t in args.dsns]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "sides": out}))
    return 0


def run_floor(dsns: Sequence[str], *, sequential: bool = False,
              table: str = TABLE) -> tuple[Measured, dict[str, Any] | None]:
    argv = [sys.executable, str(Path(__file__).resolve()), "floor", "--table", table]
    if sequential:
        argv.append("--sequential")
    m = measure([*argv, *dsns])
    if m.returncode != 0:
        return m, None
    return m, json.loads(last_line(m.stdout))


# ---------------------------------------------------------------------------------------------
# Printing


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(header)]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        return "  ".join((v.rjust(w) if n else v.ljust(w))
                         for v, w, n in zip(values, widths, numeric, strict=True)).rstrip()

    out = [line(list(header)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _is_number(text: str) -> bool:
    if text == "-":
        return True
    try:
        float(text)
        return True
    except ValueError:
        return False


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        with admin() as conn:
            row = conn.execute("SHOW server_version").fetchone()
            pg = f"Postgres {row[0]}" if row else "Postgres ?"
    except psycopg.Error:
        pg = "Postgres unreachable"
    return (f"{os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GB RAM, {pg}, "
            f"Python {platform.python_version()}")


def load() -> str:
    """The 1-minute load average: other work on the machine skews every figure."""
    return f"{os.getloadavg()[0]:.2f}"


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "floor":
        sys.exit(floor_main(sys.argv[2:]))
    print("usage: _common.py floor [--sequential] DSN [DSN ...]", file=sys.stderr)
    sys.exit(2)
