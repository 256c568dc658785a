"""Benchmark: `trueup diff` of two Postgres tables against reladiff hashdiff and the floor.

    .venv/bin/python benchmarks/diff_postgres.py [--rows N] [--tools floor,trueup,reladiff]
                                                 [--key bigint|text]

Data (kept between runs; a ``bench_meta`` marker table in each database says what it holds):
  (for another --rows N than the default, the databases are named bench_src_N and so on)
  bench_src    public.items, N rows (default 5,000,000), ids 2, 4, ..., 2N, bigint key and 7
               columns (version, status text, amount numeric(12,2), qty integer, price double
               precision, note text with ~10% NULL, updated_at timestamptz), values derived
               deterministically from the id with hashint8extended.
  bench_dst    a copy with 0.15% drift spread over the whole table: N/2000 missing (deleted),
               N/5000 orphans (odd ids, only here), N/1000 changed (one compared column changed,
               version untouched, so they are `mismatch`): 2,500 / 1,000 / 5,000 at 5M rows.
  bench_dst50  a copy with 50 differences: 20 missing, 10 orphans, 20 changed.
  bench_state  trueup's state database, recreated on every run.
  With --key text the same data is keyed by a text column, code = 'item-' || lpad(id, 12, '0')
  (the databases get a _text suffix): the key trueup cuts into hash buckets.

Rows printed per scenario: the expected findings; the floor (count(*) plus a bit_xor of
hashtextextended(concat_ws(...)) over each table, on 2 connections at once, and the same one
table after the other); trueup (`trueup diff NAME --json` as a subprocess); reladiff 0.6
hashdiff (from benchmarks/.venv, as a subprocess). Then a verdict against the targets of
issue 3: the same findings as reladiff, >= 10x faster than reladiff hashdiff, within 3x of the
floor, peak memory < 500 MB.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

DEFAULT_ROWS = 5_000_000
SOURCE_DB = "bench_src"  # bench_src_<rows> for other sizes, bench_src_text for --key text
KEY = c.KEY  # or c.TEXT_KEY (--key text)
STATE_DB = "bench_state"
RELADIFF = c.BENCH_DIR / ".venv" / "bin" / "reladiff"
MEMORY_LIMIT_MB = 500
TARGET_SPEEDUP = 10.0
TARGET_FLOOR_RATIO = 3.0


@dataclass
class Scenario:
    name: str
    database: str
    missing: int
    orphan: int
    changed: int

    @property
    def label(self) -> str:
        return self.name

    def expected(self) -> tuple[int, int, int]:
        return (self.missing, self.orphan, self.changed)


@dataclass
class Row:
    tool: str
    scenario: str
    seconds: float | None = None
    peak_mb: float | None = None
    findings: tuple[int, int, int] | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def scenarios(rows: int, suffix: str = "") -> list[Scenario]:
    def scaled(per_5m: int) -> int:
        return max(1, round(rows * per_5m / 5_000_000))

    small = (20, 10, 20) if rows >= 1000 else (2, 1, 2)
    return [
        Scenario("drift 0.15%", "bench_dst" + suffix, scaled(2500), scaled(1000),
                 scaled(5000)),
        Scenario("50 differences", "bench_dst50" + suffix, *small),
    ]


# ---------------------------------------------------------------------------------------------
# Data


def ensure_source(rows: int, seed: int, regenerate: bool) -> str:
    """Make bench_src hold the wanted table; return its generation token."""
    want = {"gen": c.GENERATOR_VERSION, "role": "source", "rows": rows, "seed": seed,
            "key": KEY}
    marker = c.read_marker(SOURCE_DB)
    if not regenerate and marker and {k: marker.get(k) for k in want} == want:
        c.log(f"{SOURCE_DB}: reusing {rows:,} rows (marker token {marker['token']})")
        return str(marker["token"])
    c.log(f"{SOURCE_DB}: generating {rows:,} rows")
    c.recreate_database(SOURCE_DB)
    token = uuid.uuid4().hex[:12]
    with psycopg.connect(c.dsn(SOURCE_DB)) as conn:
        c.generate_items(conn, rows, seed, text_key=KEY == c.TEXT_KEY)
        c.write_marker(conn, {**want, "token": token})
    c.vacuum_analyze(SOURCE_DB)
    c.log(f"{SOURCE_DB}: done")
    return token


def ensure_target(sc: Scenario, rows: int, seed: int, token: str, regenerate: bool) -> None:
    want = {"gen": c.GENERATOR_VERSION, "role": "target", "rows": rows, "seed": seed,
            "source_token": token, "missing": sc.missing, "orphan": sc.orphan,
            "changed": sc.changed, "key": KEY}
    marker = c.read_marker(sc.database)
    if not regenerate and marker and {k: marker.get(k) for k in want} == want:
        c.log(f"{sc.database}: reusing ({sc.name})")
        return
    c.log(f"{sc.database}: copying {SOURCE_DB} and applying drift ({sc.name})")
    c.drop_database(sc.database)
    c.create_database(sc.database, template=SOURCE_DB)
    rng = random.Random(f"{seed}/{sc.name}")
    picked = rng.sample(range(1, rows + 1), sc.missing + sc.changed)
    missing = [2 * g for g in picked[:sc.missing]]
    changed = [2 * g for g in picked[sc.missing:]]
    orphans = [2 * g + 1 for g in rng.sample(range(0, rows + 1), sc.orphan)]
    with psycopg.connect(c.dsn(sc.database)) as conn:
        deleted = conn.execute("DELETE FROM public.items WHERE id = ANY(%s)", (missing,)).rowcount
        updated = conn.execute(f"UPDATE public.items SET {c.CHANGE_SET} WHERE id = ANY(%s)",
                               (changed,)).rowcount
        c.insert_generated(conn, orphans, seed)
        if (deleted, updated) != (sc.missing, sc.changed):
            raise SystemExit(f"{sc.database}: drift went wrong: deleted {deleted}, "
                             f"updated {updated}")
        c.write_marker(conn, {**want, "token": uuid.uuid4().hex[:12]})
    c.vacuum_analyze(sc.database)
    c.log(f"{sc.database}: done")


# ---------------------------------------------------------------------------------------------
# Tools


def run_floor(sc: Scenario, sequential: bool) -> Row:
    how = "sequential" if sequential else "2 conns at once"
    m, doc = c.run_floor([c.dsn(SOURCE_DB), c.dsn(sc.database)], sequential=sequential)
    row = Row(f"floor ({how})", sc.label, peak_mb=m.peak_mb)
    if doc is None:
        row.note = f"failed: {c.last_line(m.stderr)[:100]}"
        return row
    row.seconds = doc["seconds"]
    sides = [doc["sides"][c.dsn(SOURCE_DB)], doc["sides"][c.dsn(sc.database)]]
    counts = [s["results"][0] for s in sides]
    same = sides[0]["results"][1] == sides[1]["results"][1]
    row.note = (f"count {counts[0]:,} vs {counts[1]:,}; fingerprints "
                f"{'equal' if same else 'differ'}; per side "
                + " / ".join(f"{s['seconds']:.2f}s" for s in sides))
    return row


def recname(sc: Scenario) -> str:
    return "items_" + sc.database.removeprefix("bench_")


def write_trueup_config(path: Path, scs: list[Scenario]) -> None:
    document: dict[str, Any] = {
        "state": c.dsn(STATE_DB),
        "connections": {"src": {"postgres": c.dsn(SOURCE_DB)}},
        "reconciliations": {},
    }
    for sc in scs:
        conn_name = sc.database.removeprefix("bench_")
        document["connections"][conn_name] = {"postgres": c.dsn(sc.database)}
        document["reconciliations"][recname(sc)] = {
            "source": {"connection": "src", "table": c.TABLE, "key": [KEY],
                       "version": c.VERSION, "columns": list(c.COLUMNS)},
            "target": {"connection": conn_name, "table": c.TABLE, "key": [KEY],
                       "version": c.VERSION, "columns": list(c.COLUMNS)},
        }
    c.write_config(path, document)


def run_trueup(sc: Scenario, config: Path) -> Row:
    m, doc, note = c.run_trueup(config, recname(sc))
    row = Row("trueup", sc.label, seconds=m.seconds, peak_mb=m.peak_mb, note=note)
    if doc is None:
        row.seconds = None if m.returncode == 2 else m.seconds
        return row
    get = lambda k: int(doc.get(k) or 0)  # noqa: E731
    row.findings = (get("missing"), get("orphan"),
                    get("mismatch") + get("stale") + get("ahead"))
    parts = [f"own seconds {float(doc.get('seconds') or 0):.2f}", f"run {doc.get('run_id')}",
             f"mismatch {get('mismatch')}"]
    parts += [f"{k} {get(k)}" for k in ("stale", "ahead", "in_flight", "unreadable") if get(k)]
    row.note = ", ".join(parts)
    row.extra = doc
    return row


def run_reladiff(sc: Scenario, threads: int) -> Row:
    if not RELADIFF.exists():
        return Row("reladiff hashdiff", sc.label,
                   note=f"{RELADIFF} missing: see benchmarks/README.md")
    argv = [str(RELADIFF), c.dsn(SOURCE_DB), "items", c.dsn(sc.database), "items",
            "-k", KEY, *[a for col in [c.VERSION, *c.COLUMNS] for a in ("-c", col)],
            "-a", "hashdiff", "-j", str(threads), "--json",
            # reladiff 0.6.0 sorts its results by whole row and dies on NULL vs text
            # (erezsh/reladiff#81, fixed after 0.6.0), printing "ERROR" and exiting 0 with a
            # partial list: skip the sort.
            "--skip-sort-results"]
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "100000", "NO_COLOR": "1", "TERM": "dumb",
           "HOME": str(Path.home())}
    m = c.measure(argv, env=env)
    row = Row(f"reladiff hashdiff -j {threads}", sc.label, seconds=m.seconds, peak_mb=m.peak_mb)
    errors = [line for line in m.stderr.splitlines() if " ERROR " in line]
    if m.returncode != 0 or errors:
        row.note = f"exit {m.returncode}: {(errors or [c.last_line(m.stderr)])[-1][:100]}"
        return row
    minus: set[str] = set()
    plus: set[str] = set()
    for line in m.stdout.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            op, values = json.loads(line)
        except ValueError:
            row.note = f"unparsable output line: {line[:80]}"
            return row
        (minus if op == "-" else plus).add(str(values[0]))
    changed = minus & plus
    row.findings = (len(minus - changed), len(plus - changed), len(changed))
    row.note = f"{len(minus) + len(plus)} +/- lines"
    return row


# ---------------------------------------------------------------------------------------------
# Verdict


def verdict(sc: Scenario, rows: list[Row]) -> list[str]:
    by_tool = {r.tool: r for r in rows}
    floor = by_tool.get("floor (2 conns at once)")
    trueup = by_tool.get("trueup")
    reladiff = next((r for r in rows if r.tool.startswith("reladiff")), None)
    out = [f"{sc.label}:"]

    def line(target: str, ok: bool | None, detail: str) -> None:
        mark = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        out.append(f"  {mark}  {target:<37} {detail}")

    if trueup is None or trueup.findings is None:
        why = trueup.note if trueup else "not run"
        line("all targets", None, f"trueup: {why}")
        return out
    fmt = lambda f: "-" if f is None else "/".join(str(x) for x in f)  # noqa: E731
    if reladiff is not None and reladiff.findings is not None:
        line("same findings as reladiff", trueup.findings == reladiff.findings,
             f"trueup {fmt(trueup.findings)} vs reladiff {fmt(reladiff.findings)} "
             f"(expected {fmt(sc.expected())}; missing/orphan/changed)")
        speedup = c.ratio(reladiff.seconds, trueup.seconds)
        line(">= 10x faster than reladiff hashdiff",
             None if speedup is None else speedup >= TARGET_SPEEDUP,
             f"{speedup:.1f}x ({reladiff.seconds:.2f}s / {trueup.seconds:.2f}s)"
             if speedup else "-")
    else:
        line("same findings as reladiff", None, f"reladiff not run; trueup {fmt(trueup.findings)}"
             f", expected {fmt(sc.expected())}")
        line(">= 10x faster than reladiff hashdiff", None, "reladiff not run")
    if floor is not None and floor.seconds:
        r = c.ratio(trueup.seconds, floor.seconds)
        line("within 3x of the floor", None if r is None else r <= TARGET_FLOOR_RATIO,
             f"{r:.2f}x ({trueup.seconds:.2f}s / {floor.seconds:.2f}s)" if r else "-")
    else:
        line("within 3x of the floor", None, "floor not run")
    line(f"peak memory < {MEMORY_LIMIT_MB} MB",
         None if trueup.peak_mb is None else trueup.peak_mb < MEMORY_LIMIT_MB,
         f"{trueup.peak_mb:.0f} MB" if trueup.peak_mb is not None else "-")
    return out


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--tools", default="floor,trueup,reladiff",
                        help="comma-separated subset of floor,trueup,reladiff")
    parser.add_argument("--scenarios", default="all", help="all, drift or small")
    parser.add_argument("--reladiff-threads", type=int, default=2)
    parser.add_argument("--regenerate", action="store_true", help="rebuild the databases")
    parser.add_argument("--key", choices=["bigint", "text"], default="bigint",
                        help="key the tables by their bigint id or by a text code")
    args = parser.parse_args(argv)
    tools = set(args.tools.split(","))
    # Other sizes and keys get databases of their own, so the full data stays around.
    global SOURCE_DB, KEY
    KEY = c.TEXT_KEY if args.key == "text" else c.KEY
    suffix = ("" if args.rows == DEFAULT_ROWS else f"_{args.rows}") + (
        "_text" if args.key == "text" else "")
    SOURCE_DB = SOURCE_DB.removesuffix(suffix) + suffix
    scs = scenarios(args.rows, suffix)
    if args.scenarios == "drift":
        scs = scs[:1]
    elif args.scenarios == "small":
        scs = scs[1:]

    load_start = c.load()
    token = ensure_source(args.rows, args.seed, args.regenerate)
    for sc in scs:
        ensure_target(sc, args.rows, args.seed, token, args.regenerate)

    results: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="trueup-bench-") as tmp:
        config = Path(tmp) / "trueup.yaml"
        write_trueup_config(config, scs)
        if "trueup" in tools:
            c.recreate_database(STATE_DB)
            problem = c.premigrate_state(c.dsn(STATE_DB))
            if problem:
                c.log(f"state pre-migration failed (trueup will try itself): {problem}")
        for sc in scs:
            c.log(f"{sc.name}: warming the cache (an unmeasured floor pass)")
            c.run_floor([c.dsn(SOURCE_DB), c.dsn(sc.database)])
            results.append(Row("expected (generated)", sc.label, findings=sc.expected()))
            if "floor" in tools:
                c.log(f"{sc.name}: floor")
                results.append(run_floor(sc, sequential=False))
                results.append(run_floor(sc, sequential=True))
            if "trueup" in tools:
                c.log(f"{sc.name}: trueup diff {recname(sc)}")
                results.append(run_trueup(sc, config))
            if "reladiff" in tools:
                c.log(f"{sc.name}: reladiff hashdiff")
                results.append(run_reladiff(sc, args.reladiff_threads))

    print(f"diff_postgres: {args.rows:,} rows per table, 2 databases, {args.key} key; "
          f"{c.now()}")
    print(f"machine: {c.machine()}; load average {load_start} at start, {c.load()} at end")
    print()
    print(c.format_table(
        ["tool", "scenario", "seconds", "peak MB", "missing", "orphan", "changed", "note"],
        [[r.tool, r.scenario, r.seconds, r.peak_mb,
          *(r.findings if r.findings else (None, None, None)), r.note] for r in results]))
    print()
    print("seconds: wall time of the subprocess (trueup, reladiff: process start to exit); the")
    print("floor's is its queries' time on open connections. peak MB: the client process's max")
    print("RSS (/usr/bin/time %M), not the server's. changed = mismatch + stale + ahead.")
    print()
    print("verdict (targets of issue 3):")
    for sc in scs:
        for text in verdict(sc, [r for r in results if r.scenario == sc.label]):
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
