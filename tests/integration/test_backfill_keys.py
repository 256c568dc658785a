"""Chunk key ranges on composite and text keys, and the partition scope."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import sql
from psycopg.rows import dict_row

from tests.integration.test_backfill_support import make_sales, write_sales_config
from trueup.backfill import BackfillOptions, start_backfill
from trueup.backfill.keyspace import KeySpace, repairs_text
from trueup.cli import main
from trueup.config import load_config
from trueup.diff import diff
from trueup.fingerprint import ColumnType
from trueup.lineage import lineage, parse_key
from trueup.statuses import BackfillScope, BackfillStatus, KeyOrder

pytestmark = pytest.mark.postgres


def test_composite_text_keys_are_cut_into_ranges_that_cover_every_row_once(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    source, target = new_db(), new_db()
    regions = ["eu", "EU", "us", "ap", "é", "zz z"]
    make_sales(source, target, regions, 50)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("INSERT INTO sales_copy SELECT r, g, 1, r || g "
                     "FROM unnest(%s::text[]) r, generate_series(1, 50) g WHERE g %% 7 <> 0",
                     (regions,))
        conn.execute("INSERT INTO sales_copy VALUES ('a', 1, 1, 'x'), ('zzzz', 9, 1, 'y')")
        conn.execute("UPDATE sales_copy SET note = 'bad' WHERE id = 11")
    config = write_sales_config(tmp_path, state_db, source, target)
    before = diff(config, "sales")
    summary = start_backfill(config, "sales", BackfillOptions(scope=BackfillScope.ALL,
                                                              chunk_size=17))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert summary.chunks == 18 and summary.rows_planned == 300
    assert summary.rows_repaired == before.missing + before.mismatch + before.orphan == 50
    assert diff(config, "sales").consistent


#: An ICU collation (Debian's PostgreSQL is built with ICU): it sorts a < B < b, C sorts B < a.
ICU = "en-x-icu"
CODES = [f"{stem}{n}" for stem in ("a", "A", "b", "B", "_x", "Z", "é", "e", "10", "9", "a-b",
                                    "ab", "Ab") for n in range(20)]


def _codes_config(tmp_path: Path, state: str, source: str, target: str) -> Path:
    """A config repairing table codes of ``source`` into codes_copy of ``target``; its path."""
    raw = {"state": state,
           "connections": {"a": {"postgres": source}, "b": {"postgres": target}},
           "reconciliations": {"codes": {
               "source": {"connection": "a", "table": "codes", "key": ["code"],
                          "version": "v", "columns": ["note"]},
               "target": {"connection": "b", "table": "codes_copy", "key": ["code"],
                          "version": "v", "columns": ["note"]},
               "repair": "upsert"}}}
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(("target_collation", "order"),
                         [(ICU, KeyOrder.NATIVE), ("C", KeyOrder.C)])
def test_text_key_ranges_compare_in_the_shared_collation_else_in_c(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, target_collation: str,
        order: KeyOrder) -> None:
    source, target = new_db(), new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE codes (code text COLLATE "{ICU}" PRIMARY KEY, v int, '
                     f'note text)')
        conn.execute("INSERT INTO codes SELECT c, 1, 'n-' || c FROM unnest(%s::text[]) c",
                     (CODES,))
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE codes_copy (code text COLLATE "{target_collation}" '
                     f'PRIMARY KEY, v int, note text)')
        conn.execute("INSERT INTO codes_copy SELECT c, 1, 'n-' || c "
                     "FROM unnest(%s::text[]) WITH ORDINALITY AS u(c, i) WHERE i %% 5 <> 0",
                     (CODES,))
        conn.execute("INSERT INTO codes_copy VALUES ('zzz', 1, 'orphan'), ('AAA', 1, 'orphan'),"
                     " ('_', 1, 'orphan')")
        conn.execute("UPDATE codes_copy SET note = 'bad' WHERE code LIKE '%7'")
    config = load_config(_codes_config(tmp_path, state_db, source, target))
    before = diff(config, "codes")
    assert (before.missing, before.orphan) == (len(CODES) // 5, 3) and before.mismatch > 10
    summary = start_backfill(config, "codes", BackfillOptions(scope=BackfillScope.ALL,
                                                              chunk_size=9))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert summary.rows_repaired == before.missing + before.orphan + before.mismatch
    with psycopg.connect(state_db) as conn:
        stored = conn.execute("SELECT key_order FROM trueup.backfills WHERE backfill_id = %s",
                              (summary.backfill_id,)).fetchone()
    assert stored is not None and stored[0] == order.value
    rows = 'SELECT code, v, note FROM {} ORDER BY code COLLATE "C"'
    with psycopg.connect(source) as a, psycopg.connect(target) as b:
        assert a.execute(rows.format("codes")).fetchall() == \
            b.execute(rows.format("codes_copy")).fetchall()
    assert diff(config, "codes").consistent


def test_a_missing_target_table_is_one_line_and_plans_nothing(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    source, target = new_db(), new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE codes (code text PRIMARY KEY, v int, note text)")
        conn.execute("INSERT INTO codes VALUES ('a', 1, 'x')")
    path = _codes_config(tmp_path, state_db, source, target)
    assert main(["--config", str(path), "backfill", "codes", "--all"]) == 2
    err = capsys.readouterr().err
    assert "table public.codes_copy does not exist" in err and "Traceback" not in err
    with psycopg.connect(state_db) as conn:
        assert conn.execute("SELECT count(*) FROM trueup.backfills").fetchone() == (0,)


def test_ranges_in_the_columns_own_collation_are_served_by_the_key_index(
        new_db: Callable[[], str]) -> None:
    with psycopg.connect(new_db(), autocommit=True) as conn:
        conn.execute(f'CREATE TABLE codes (code text COLLATE "{ICU}" PRIMARY KEY, note text)')
        conn.execute("INSERT INTO codes SELECT 'k' || g, 'x' FROM generate_series(1, 20000) g")
        conn.execute("ANALYZE codes")

        def plan(order: KeyOrder) -> str:
            space = KeySpace(exprs=[sql.Identifier("code")], types=[ColumnType.of("text")],
                             order=order)
            return "\n".join(r[0] for r in conn.execute(
                sql.SQL("EXPLAIN SELECT * FROM codes WHERE {}").format(
                    space.in_range(["k100"], ["k101"]))))

        assert "Index Cond" in plan(KeyOrder.NATIVE)
        assert "Index Cond" not in plan(KeyOrder.C) and "Seq Scan" in plan(KeyOrder.C)


def test_partition_scope_repairs_that_days_rows_and_nothing_else(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    source, target = new_db(), new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, version int, s text, "
                     "updated_at timestamptz)")
        conn.execute("INSERT INTO t SELECT g, 1, 's', '2026-01-01T00:00Z'::timestamptz "
                     "+ (g % 3) * interval '1 day' FROM generate_series(1, 300) g")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, version int, s text)")
        conn.execute("INSERT INTO t VALUES (999, 1, 'orphan')")
    raw = {"state": state_db,
           "connections": {"a": {"postgres": source}, "b": {"postgres": target}},
           "reconciliations": {"t": {
               "source": {"connection": "a", "table": "t", "key": ["id"], "version": "version",
                          "updated_at": "updated_at", "columns": ["s"]},
               "target": {"connection": "b", "table": "t", "key": ["id"], "version": "version",
                          "columns": ["s"]},
               "partitions": {"daily": {"start": "2026-01-01"}}, "repair": "upsert"}}}
    (tmp_path / "trueup.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "trueup.yaml")
    summary = start_backfill(config, "t", BackfillOptions(
        scope=BackfillScope.PARTITION, partition="2026-01-02", chunk_size=30))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert (summary.rows_planned, summary.rows_repaired, summary.chunks) == (100, 100, 4)
    day = diff(config, "t", partition="2026-01-02")
    assert day.consistent
    whole = diff(config, "t")
    assert (whole.missing, whole.orphan) == (200, 1)  # other days and the orphan untouched


def test_a_backfill_of_a_runs_differences_finds_padded_char_keys(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A run records a char(4) key as read, padded ('ab  '): the backfill must find 'ab'."""
    source, target = new_db(), new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE codes (code char(4) PRIMARY KEY, v int, note text)")
        conn.execute("INSERT INTO codes VALUES ('ab', 1, 'x'), ('cd', 1, 'y'), ('efgh', 1, 'z')")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE codes_copy (code char(4) PRIMARY KEY, v int, note text)")
        conn.execute("INSERT INTO codes_copy VALUES ('cd', 1, 'old'), ('zz', 1, 'orphan')")
    config = load_config(_codes_config(tmp_path, state_db, source, target))
    run = diff(config, "codes")
    assert (run.missing, run.mismatch, run.orphan) == (2, 1, 1)
    with psycopg.connect(state_db, autocommit=True) as conn:
        keys = conn.execute("SELECT key FROM trueup.differences ORDER BY 1").fetchall()
        assert [k for (k,) in keys] == [["ab"], ["cd"], ["efgh"], ["zz"]]  # as lineage reads
        # as runs recorded them before: padded
        conn.execute("UPDATE trueup.differences SET key = jsonb_build_array(rpad(key->>0, 4))")
    summary = start_backfill(config, "codes", BackfillOptions(scope=BackfillScope.RUN,
                                                              run_id=run.run_id))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert (summary.rows_repaired, summary.rows_skipped) == (4, 0)
    assert diff(config, "codes").consistent


@pytest.mark.parametrize(("typname", "values"), [
    ("int8", ["-9223372036854775808", "0", "42"]),
    ("numeric", ["9.00", "-0.5", "1e30", "NaN"]),
    ("float8", ["1e100", "0.30000000000000004", "-0", "NaN", "Infinity"]),
    ("text", ["plain", 'quo"te', "back\\slash", "tab\tnew\nline", "é ü \u2028", ""]),
    ("bpchar", ["ab  ", "x"]),
    ("uuid", ["6f1c0a5e-3b9d-4f3e-9a57-0c2d1e4f5a6b"]),
    ("timestamptz", ["2026-03-29 01:30:00.123456+02", "infinity"]),
    ("timestamp", ["2026-03-29 01:30:00", "-infinity"]),
    ("date", ["2026-11-29", "0044-03-15 BC"]),
    ("bool", ["true", "false"]),
])
def test_a_key_renders_one_repairs_text_in_sql_and_in_python(
        new_db: Callable[[], str], typname: str, values: list[str]) -> None:
    """Fresh chunks write repairs rows' keys from json_build_array, compared chunks from
    jsonb, rows made in Python from the key read back from jsonb: all must give the one text
    trueup.repairs holds for the key (its primary key and lineage compare text), and it must
    read back as the key jsonb_build_array makes, as differences store it."""
    space = KeySpace(exprs=[sql.Identifier("k"), sql.Identifier("n")],
                     types=[ColumnType.of(typname), ColumnType.of("int8")])
    with psycopg.connect(new_db(), autocommit=True) as conn:
        conn.execute(sql.SQL("SET extra_float_digits = 1; SET TimeZone = 'UTC'; "
                             "CREATE TABLE keys (k {}, n bigint)").format(
                                 sql.Identifier(typname)))
        for value in values:
            conn.execute("INSERT INTO keys VALUES (%s, 7)", (value,))
        rows = conn.execute(sql.SQL(
            "SELECT ({text})::text AS text, ({text})::jsonb = {key} AS same, "
            "({repairs})::text AS jsonb, {key} AS key FROM keys").format(
                text=space.repairs_text, key=space.as_json, repairs=space.repairs_key)).fetchall()
    assert len(rows) == len(values)
    assert all(same for _, same, _, _ in rows), rows
    assert [text for text, _, _, _ in rows] == [jsonb for _, _, jsonb, _ in rows]
    assert [text for text, _, _, _ in rows] == [repairs_text(key) for _, _, _, key in rows]


def _typed_codes(source: str, target: str, typname: str, keys: list[str]) -> tuple[str, str]:
    """Tables codes (holding ``keys``) and codes_copy (empty) keyed by a ``typname`` code."""
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE codes (code {typname} PRIMARY KEY, v int, note text)")
        conn.execute(f"INSERT INTO codes SELECT c::{typname}, 1, 'n' FROM unnest(%s::text[]) c",
                     (keys,))
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE codes_copy (code {typname} PRIMARY KEY, v int, note text)")
    return source, target


@pytest.mark.parametrize(("typname", "keys", "orphan"), [
    ("float8", ["1e20", "0.1", "-2.5", "3"], "1e21"),
    ("text", ["é", "plain", 'quo"te', "tab\tx"], "ü"),
    ("numeric(12,2)", ["9.00", "2.50", "-0.5", "3"], "99.10"),
    ("jsonb", ["9.00", '{"a": 2.50}', "2.0", "1", '"x"'], "99.10"),
])
def test_repairs_hold_each_key_as_jsonb_prints_it_so_lineage_finds_it(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, typname: str,
        keys: list[str], orphan: str) -> None:
    """trueup.repairs holds a key as one text, jsonb's with numbers trimmed, whichever path
    wrote it: a COPY from the source (json prints a float as the float's text: 1e+20, a
    numeric(12,2) as 9.00), the compare path, and an orphan's row made in Python (json.dumps
    escapes é; the orphan 99.10 is read back as a float)."""
    source, target = _typed_codes(new_db(), new_db(), typname, keys)
    with psycopg.connect(target, autocommit=True) as conn:
        # the last chunk (its range is open) holds a target row: it is compared, not copied
        conn.execute(f"INSERT INTO codes_copy VALUES (%s::{typname}, 1, 'orphan')", (orphan,))
    config = load_config(_codes_config(tmp_path, state_db, source, target))
    summary = start_backfill(config, "codes", BackfillOptions(scope=BackfillScope.ALL,
                                                              chunk_size=2))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert summary.rows_repaired == len(keys) + 1
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        rows = conn.execute("SELECT key, key::jsonb::text AS canonical, action "
                            "FROM trueup.repairs").fetchall()
        assert sorted(r["action"] for r in rows) == ["delete"] + ["insert"] * len(keys)
        assert [r["key"] for r in rows] == [r["canonical"] for r in rows]
        # its top-level numbers trimmed (9.00 is [9]), as Python renders it
        assert [r["key"] for r in rows] == [
            repairs_text(json.loads(r["key"], parse_float=Decimal)) for r in rows]
        for row in rows:
            found = lineage(conn, "codes", [json.loads(row["key"], parse_float=Decimal)]
                            )["repairs"]
            assert [r["action"] for r in found] == [row["action"]], row["key"]
        for typed in (*keys, orphan):  # as a person types it: 9.00 finds [9]
            assert len(lineage(conn, "codes", parse_key(typed, 1))["repairs"]) == 1, typed
    assert diff(config, "codes").consistent


@pytest.mark.parametrize(("typname", "keys", "typed"), [
    ("timestamptz", ["2026-01-01 10:30:00.5+00", "2026-01-01 10:30:00+00",
                     "2026-01-01 10:30:00.123456+00", "2026-01-01 10:30:00.12+00"],
     ["2026-01-01T10:30:00.5Z", "2026-01-01 11:30:00.500+01", "2026-01-01T10:30:00Z",
      "2026-01-01T10:30:00.123456+00:00", "2026-01-01 10:30:00.120000+00"]),
    ("timestamp", ["2026-01-01 10:30:00.5", "2026-01-01 10:30:00"],
     ["2026-01-01T10:30:00.5", "2026-01-01 10:30:00.500000", "2026-01-01T10:30:00"]),
])
def test_a_time_key_with_a_fraction_is_one_text_in_runs_and_repairs_so_lineage_finds_both(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, typname: str,
        keys: list[str], typed: list[str]) -> None:
    """Runs stored a time key as isoformat writes it (10:30:00.500000), repairs rows as
    Postgres does (10:30:00.5): lineage found the run but no repair (or the repair but no run),
    and an --all backfill's repairs rows named no run (their run_id NULL)."""
    source, target = _typed_codes(new_db(), new_db(), typname, keys)
    config = load_config(_codes_config(tmp_path, state_db, source, target))
    run_id = diff(config, "codes").run_id
    summary = start_backfill(config, "codes", BackfillOptions(scope=BackfillScope.ALL))
    assert summary.status is BackfillStatus.SUCCEEDED and summary.rows_repaired == len(keys)
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        found = conn.execute("SELECT d.key::text AS run_key, p.key, p.run_id "
                             "FROM trueup.repairs AS p FULL JOIN trueup.differences AS d "
                             "ON d.key = p.key::jsonb ORDER BY p.key").fetchall()
        assert [(r["run_key"], r["run_id"]) for r in found] == [
            (r["key"], run_id) for r in found], found
        for text in typed:
            document = lineage(conn, "codes", parse_key(text, 1))
            assert (len(document["runs"]), len(document["repairs"])) == (1, 1), text
    assert diff(config, "codes").consistent


def test_lineage_finds_a_time_key_a_run_stored_as_isoformat_wrote_it(state_db: str) -> None:
    """Runs before the fix stored 10:30:00.5 as 2026-01-01T10:30:00.500000+00:00: found
    whatever the spelling of KEY, and shown as stored."""
    stored = "2026-01-01T10:30:00.500000+00:00"
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        run = conn.execute("INSERT INTO trueup.runs (reconciliation, status) "
                           "VALUES ('codes', 'succeeded') RETURNING run_id").fetchone()
        assert run is not None
        conn.execute("INSERT INTO trueup.differences (run_id, seq, reconciliation, key, class) "
                     "VALUES (%s, 1, 'codes', %s, 'missing')",
                     (run["run_id"], json.dumps([stored])))
        for text in ("2026-01-01T10:30:00.5Z", "2026-01-01 10:30:00.5+00:00", stored):
            document = lineage(conn, "codes", parse_key(text, 1))
            assert [r["run_id"] for r in document["runs"]] == [run["run_id"]], text
            assert document["key"] == [stored]


@pytest.mark.parametrize(("typname", "stored", "typed"), [
    ("text", "9", "9"), ("text", "1e2", "1e2"), ("text", "-0", "-0"),
    ("bigint", "100", "1e2"), ("numeric", "9.00", "9.0"),
    ("timestamptz", "2026-01-01 10:30:00.5+00", "2026-01-01 11:30:00.50+01"),
])
def test_lineage_shows_the_key_as_found_not_as_typed(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], typname: str, stored: str, typed: str) -> None:
    """A text key "9" showed as [9], "1e2" as [100], "-0" as [0]: the first form KEY may have,
    not the key found. Nothing found: KEY as read."""
    source, target = _typed_codes(new_db(), new_db(), typname, [stored])
    path = _codes_config(tmp_path, state_db, source, target)
    config = load_config(path)
    diff(config, "codes")
    assert start_backfill(config, "codes", BackfillOptions(scope=BackfillScope.ALL)
                          ).rows_repaired == 1
    with psycopg.connect(state_db) as conn:
        (key_text,) = conn.execute("SELECT key FROM trueup.repairs").fetchone() or ("",)
    capsys.readouterr()
    assert main(["--config", str(path), "lineage", "codes", typed, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert json.dumps(document["key"]) == key_text
    assert (len(document["runs"]), len(document["repairs"])) == (1, 1)
    assert main(["--config", str(path), "lineage", "codes", typed]) == 0
    assert capsys.readouterr().out.startswith(f"codes key {key_text}: 1 runs, 1 repairs\n")
    assert main(["--config", str(path), "lineage", "codes", "77", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["key"] == [77]  # nothing found: KEY as read
    assert main(["--config", str(path), "lineage", "codes", "abc", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["key"] == ["abc"]


@pytest.mark.parametrize(("typname", "keys", "kept_out"), [
    ("numeric", ["0.30000000000000001", "0.3", "1.10", "7"], "0.30000000000000001"),
    ("jsonb", ['{"a": 2.50}', "9.00", "1"], '{"a": 2.50}'),
])
@pytest.mark.parametrize("shared", [False, True], ids=["state-apart", "state-in-target"])
def test_a_write_the_target_refused_corrects_its_one_repairs_row(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, typname: str,
        keys: list[str], kept_out: str, shared: bool) -> None:
    """The intent rows are recorded from the target's rendering of each key; a write that
    turned out otherwise (a trigger kept the row out: expected insert, actually skipped) is
    corrected under the same key text: in the state database, or among the candidates when
    the state lives in the target's. A key a float cannot hold (17 digits, a nested 2.50)
    must neither become a second row under the float's text nor correct another key's
    (0.3)."""
    source, target = _typed_codes(new_db(), new_db(), typname, keys)
    if shared:
        state_db = target
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(f"CREATE FUNCTION keep_out() RETURNS trigger LANGUAGE plpgsql AS $$ "
                     f"BEGIN IF NEW.code = '{kept_out}'::{typname} THEN RETURN NULL; END IF; "
                     f"RETURN NEW; END $$")
        conn.execute("CREATE TRIGGER keep_out BEFORE INSERT ON codes_copy "
                     "FOR EACH ROW EXECUTE FUNCTION keep_out()")
    config = load_config(_codes_config(tmp_path, state_db, source, target))
    summary = start_backfill(config, "codes", BackfillOptions(scope=BackfillScope.ALL))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert (summary.rows_repaired, summary.rows_skipped) == (len(keys) - 1, 1)
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        rows = conn.execute("SELECT key, action FROM trueup.repairs").fetchall()
        assert len(rows) == len(keys), rows
        (refused,) = lineage(conn, "codes", parse_key(kept_out, 1))["repairs"]
    assert refused["action"] == "skipped"


def test_target_rows_in_a_gap_of_the_source_keys_are_cut_into_chunks_of_their_own(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A tenant purged from the source (keys 101 to 2000) while its projection kept it: the
    source range around the gap would hold 1,900 orphans in one chunk, read at once. The
    target's keys cut it: no chunk holds twice --chunk-size target rows. Where the target
    follows the source, the plan is the source's."""
    source, target = new_db(), new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE codes (code bigint PRIMARY KEY, v int, note text)")
        conn.execute("INSERT INTO codes SELECT g, 1, 'n' FROM generate_series(1, 100) g "
                     "UNION ALL SELECT g, 1, 'n' FROM generate_series(2001, 2100) g")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE codes_copy (code bigint PRIMARY KEY, v int, note text)")
        conn.execute("INSERT INTO codes_copy SELECT g, 1, 'n' FROM generate_series(1, 2100) g")
    config = load_config(_codes_config(tmp_path, state_db, source, target))
    summary = start_backfill(config, "codes", BackfillOptions(scope=BackfillScope.ALL,
                                                              chunk_size=50))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert summary.rows_repaired == 1900
    # the gap's chunks plan its target rows (what --rate paces), the rest the source's 200
    assert 200 + 1800 <= summary.rows_planned <= 200 + 1900
    with psycopg.connect(state_db) as conn:
        ranges = conn.execute("SELECT (key_from ->> 0)::bigint, (key_to ->> 0)::bigint "
                              "FROM trueup.chunks ORDER BY chunk").fetchall()
    # every chunk of the old target (1 to 2100) held fewer than 100 rows
    held = [min(hi or 2101, 2101) - max(lo or 1, 1) for lo, hi in ranges]
    assert max(held) < 100, ranges
    assert diff(config, "codes").consistent

    # a target that follows the source keeps the source's plan: 4 chunks of 50
    summary = start_backfill(config, "codes", BackfillOptions(scope=BackfillScope.ALL,
                                                              chunk_size=50))
    assert (summary.chunks, summary.rows_repaired) == (4, 0)


def test_gap_cuts_of_text_keys_follow_their_columns_collation(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """Keys in a shared ICU collation (native order) whose databases sort in code point order
    (C.UTF-8): the gap's target cuts (c, C) are placed among the source's (a, B, d) in ICU's
    order (a0 < B0 < c0 < C0 < d0), as the ranges compare. In the database's order (B0 < C0 <
    a0) the bounds would come out of order, and keys would fall in two chunks."""
    source, target = new_db(), new_db()
    kept = [f"{stem}{n}" for stem in ("a", "B", "d") for n in range(10)]
    purged = [f"{stem}{n}" for stem in ("c", "C") for n in range(10)]
    for dsn, table, codes in ((source, "codes", kept), (target, "codes_copy", kept + purged)):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'CREATE TABLE {table} (code text COLLATE "{ICU}" PRIMARY KEY, v int, '
                         f'note text)')
            conn.execute(f"INSERT INTO {table} SELECT c, 1, 'n' FROM unnest(%s::text[]) c",
                         (codes,))
    config = load_config(_codes_config(tmp_path, state_db, source, target))
    summary = start_backfill(config, "codes", BackfillOptions(scope=BackfillScope.ALL,
                                                              chunk_size=3))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert (summary.rows_repaired, summary.rows_skipped) == (len(purged), 0)
    with psycopg.connect(state_db) as conn:
        bounds = [r[0] for r in conn.execute(
            "SELECT key_to ->> 0 FROM trueup.chunks WHERE key_to IS NOT NULL ORDER BY chunk")]
        keys = conn.execute("SELECT count(*), count(DISTINCT key) FROM trueup.repairs"
                            ).fetchone()
    assert keys == (len(purged), len(purged))
    with psycopg.connect(source) as conn:
        ordered = [r[0] for r in conn.execute(
            f'SELECT b FROM unnest(%s::text[]) b ORDER BY b COLLATE "{ICU}"', (bounds,))]
    assert bounds == ordered and len(set(bounds)) == len(bounds), bounds
    assert len(bounds) > 10, "the gap was cut"
    assert diff(config, "codes").consistent


@pytest.mark.parametrize("shared", [False, True], ids=["state-apart", "state-in-target"])
def test_orphans_of_keys_a_double_cannot_hold_are_asked_for_and_deleted_exactly(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, shared: bool,
        capsys: pytest.CaptureFixture[str]) -> None:
    """An orphan's key goes from the target to the source (is it there now?) and back to the
    target (delete it as it was seen) with every digit: 0.30000000000000001 is no float's,
    read as one it is 0.3, a key the source holds (the orphan was kept as present); and
    0.30000000000000002 as a float is 0.30000000000000004, a key nobody holds (the orphan was
    skipped, its delete finding no row)."""
    source, target = _typed_codes(new_db(), new_db(), "numeric", ["0.3", "1", "2.50"])
    if shared:
        state_db = target
    orphans = ["0.30000000000000001", "0.30000000000000002", "2.5000000000000001"]
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("INSERT INTO codes_copy SELECT c::numeric, 1, 'n' "
                     "FROM unnest(%s::text[]) c", (["0.3", "1", "2.50", *orphans],))
    path = _codes_config(tmp_path, state_db, source, target)
    config = load_config(path)
    summary = start_backfill(config, "codes", BackfillOptions(scope=BackfillScope.ALL))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert (summary.rows_repaired, summary.rows_skipped) == (len(orphans), 0)
    # lineage --json names the key it looked up with every digit too
    capsys.readouterr()
    assert main(["--config", str(path), "lineage", "codes", orphans[0], "--json"]) == 0
    printed = capsys.readouterr().out
    assert f'"key": [{orphans[0]}]' in printed
    assert [r["action"] for r in json.loads(printed)["repairs"]] == ["delete"]
    with psycopg.connect(target) as conn:
        left = conn.execute("SELECT code::text FROM codes_copy ORDER BY code").fetchall()
    assert [code for code, in left] == ["0.3", "1", "2.50"]
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        rows = conn.execute("SELECT key, action FROM trueup.repairs ORDER BY key").fetchall()
    assert [(r["key"], r["action"]) for r in rows] == [
        (f"[{o}]", "delete") for o in sorted(orphans)]
    assert diff(config, "codes").consistent


@pytest.mark.parametrize(("ddl", "key", "types", "rows"), [
    ("id bigint PRIMARY KEY", ["id"], ["int8"], "g"),
    ("region text COLLATE \"C\", id int, PRIMARY KEY (region, id)", ["region", "id"],
     ["text", "int4"], "'r' || (g % 7), g"),
    (f"code text COLLATE \"{ICU}\" PRIMARY KEY", ["code"], ["text"], "'c' || g"),
    ("at timestamptz PRIMARY KEY", ["at"], ["timestamptz"],
     "timestamptz '2026-01-01' + g * interval '1 minute'"),
    ("id bigint UNIQUE", ["id"], ["int8"], "CASE WHEN g % 100 = 0 THEN NULL ELSE g END"),
    # key columns named like the statement's own columns, an index on the second alone
    ("trueup_n bigint PRIMARY KEY", ["trueup_n"], ["int8"], "g"),
    ("k1 int, k2 int, PRIMARY KEY (k1, k2)", ["k1", "k2"], ["int4", "int4"],
     "g % 50, 20000 - g"),
], ids=["bigint", "composite", "icu-text", "timestamptz", "null-keys", "named-trueup_n",
        "named-k1-k2"])
@pytest.mark.parametrize("count", [0, 1, 250, 1000, 1001, 2345])
def test_cuts_stepped_along_the_key_index_are_the_windows_cuts(
        new_db: Callable[[], str], ddl: str, key: list[str], types: list[str], rows: str,
        count: int) -> None:
    """Planning steps from cut to cut along the key index (OFFSET from the last cut) where
    an index gives the key order: its cuts and counts must be those of numbering every row,
    of the whole table and of the keys past one (the target's keys beyond the source's)."""
    from trueup.backfill import planner

    table = sql.Identifier("t")
    with psycopg.connect(new_db(), autocommit=True, row_factory=dict_row) as conn:
        conn.execute(f"CREATE TABLE t ({ddl}, note text)")
        conn.execute(f"INSERT INTO t SELECT {rows.replace('%', '%%')}, 'n' "
                     "FROM generate_series(1, %s) g ORDER BY random()", (count,))
        if "k2" in key:
            conn.execute("CREATE INDEX ON t (k2)")
        conn.execute("ANALYZE t")
        space = KeySpace(exprs=[sql.Identifier(k) for k in key],
                         types=[ColumnType.of(t) for t in types], order=KeyOrder.NATIVE)
        wheres = [sql.SQL("true")]
        middle = conn.execute(sql.SQL(
            "SELECT {} AS key FROM t WHERE {} ORDER BY {} OFFSET %s LIMIT 1").format(
                space.as_json, space.complete, space.ordered), (count // 3,)).fetchone()
        if middle:
            wheres.append(space.after(middle["key"]))
        for where in wheres:
            stepping = planner._stepping(table, space, where, 100)
            # (a table of a few rows may well be sorted rather than read by its index)
            assert planner._steps_on_an_index(conn, stepping) or count < 1000
            expected = conn.execute(planner._windowed(table, space, where, 100)).fetchall()
            assert conn.execute(stepping).fetchall() == expected


def test_cuts_without_an_index_on_the_key_are_numbered_in_a_window(
        new_db: Callable[[], str]) -> None:
    """Without an index giving the key order each step would sort every row after the last
    cut: the plan says so, and the cuts are numbered in one window."""
    from trueup.backfill import planner

    space = KeySpace(exprs=[sql.Identifier("id")], types=[ColumnType.of("int8")])
    with psycopg.connect(new_db(), autocommit=True, row_factory=dict_row) as conn:
        conn.execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 2000) g")
        conn.execute("ANALYZE t")
        assert not planner._steps_on_an_index(
            conn, planner._stepping(sql.Identifier("t"), space, sql.SQL("true"), 100))
        cuts, last = planner._cut(conn, sql.Identifier("t"), space, sql.SQL("true"), 100)
    assert cuts == [([1 + 100 * i], 100) for i in range(20)] and last == [2000]


def test_cut_steps_stop_at_keys_that_are_not_unique(new_db: Callable[[], str]) -> None:
    """Keys that are not unique (no key trueup accepts, but an index may order them) must
    not make the steps loop: they stop, and the last range holds the rest."""
    from trueup.backfill import planner

    space = KeySpace(exprs=[sql.Identifier("id")], types=[ColumnType.of("int8")])
    with psycopg.connect(new_db(), autocommit=True, row_factory=dict_row) as conn:
        conn.execute("CREATE TABLE t AS SELECT least(g, 150) AS id "
                     "FROM generate_series(1, 1000) g")
        conn.execute("CREATE INDEX ON t (id)")
        conn.execute("ANALYZE t")
        stepping = planner._stepping(sql.Identifier("t"), space, sql.SQL("true"), 100)
        assert planner._steps_on_an_index(conn, stepping)
        cuts, last = planner._cut(conn, sql.Identifier("t"), space, sql.SQL("true"), 100)
    # ranges [1, 101), [101, 150), [150, ...): every row in one; the last's rows counted
    assert cuts == [([1], 100), ([101], 100), ([150], 1000 - 149)] and last == [150]


@pytest.mark.parametrize("scope", [BackfillScope.ALL, BackfillScope.RUN])
def test_a_key_column_named_like_the_key_lists_column_is_repaired(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, scope: BackfillScope) -> None:
    """Key lists are read from jsonb_array_elements(...) as j: a bare j inside them was the
    relation's column j, when its key has that name (every --run chunk and every orphan's
    delete failed: operator does not exist: bigint ->> integer)."""
    source, target = new_db(), new_db()
    for dsn, rows in ((source, "1, 2, 3"), (target, "1, 3, 4")):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (j bigint PRIMARY KEY, v int, note text)")
            conn.execute(f"INSERT INTO t SELECT g, 1, 'n' FROM unnest(ARRAY[{rows}]) g")
    raw = {"state": state_db,
           "connections": {"a": {"postgres": source}, "b": {"postgres": target}},
           "reconciliations": {"t": {
               "source": {"connection": "a", "table": "t", "key": ["j"], "version": "v",
                          "columns": ["note"]},
               "target": {"connection": "b", "table": "t", "key": ["j"], "version": "v",
                          "columns": ["note"]},
               "repair": "upsert"}}}
    (tmp_path / "trueup.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "trueup.yaml")
    run = diff(config, "t")
    assert (run.missing, run.orphan) == (1, 1)
    summary = start_backfill(config, "t", BackfillOptions(
        scope=scope, run_id=run.run_id if scope is BackfillScope.RUN else None))
    assert summary.status is BackfillStatus.SUCCEEDED, summary.error
    assert summary.rows_repaired == 2
    assert diff(config, "t").consistent


@pytest.mark.parametrize(("source_table", "source_key", "columns", "target_table",
                          "target_key", "extra"), [
    ("cuts", "k0", ["trueup_fp", "trueup_hi"], "r", "trueup_lo", "trueup_k0"),
    ("last", "hashtextextended", ["trueup_k0", "k0"], "u", "json_build_array", "trueup_tfp"),
], ids=["cuts-r", "last-u"])
def test_tables_and_columns_named_like_trueups_own_names_diff_and_repair(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, source_table: str,
        source_key: str, columns: list[str], target_table: str, target_key: str,
        extra: str) -> None:
    """A user's names share statements with trueup's aliases: a bare name must never reach
    the other (a column trueup_lo in the diff's segment bounds, a table r or u, a key named
    hashtextextended in the fresh COPY's ORDER BY, a table cuts with a column k0 in the
    planner's steps, a target column trueup_fp or trueup_k0 beside the stage's). Each
    failed or cut wrong before."""
    source, target = new_db(), new_db()
    version = "trueup_v"
    cols = ", ".join(f'"{c}" text' for c in columns)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{source_table}" ("{source_key}" bigint PRIMARY KEY, '
                     f'"{version}" int, {cols}, updated_at timestamptz)')
        conn.execute(f'INSERT INTO "{source_table}" SELECT g, 1, '
                     + ", ".join("'v' || g" for _ in columns)
                     + ", '2026-02-01T10:00Z' FROM generate_series(1, 1000) g")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{target_table}" ("{target_key}" bigint PRIMARY KEY, '
                     f'"{version}" int, {cols}, "{extra}" text)')
    raw = {"state": state_db,
           "connections": {"a": {"postgres": source}, "b": {"postgres": target}},
           "reconciliations": {"odd": {
               "source": {"connection": "a", "table": source_table, "key": [source_key],
                          "version": version, "columns": columns, "updated_at": "updated_at"},
               "target": {"connection": "b", "table": target_table, "key": [target_key],
                          "version": version, "columns": columns},
               "partitions": {"daily": {"start": "2026-01-01"}}, "repair": "upsert"}}}
    (tmp_path / "trueup.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "trueup.yaml")
    # an empty target: every chunk goes in by COPY, cut by the planner's steps
    summary = start_backfill(config, "odd", BackfillOptions(scope=BackfillScope.ALL,
                                                            chunk_size=100))
    assert summary.status is BackfillStatus.SUCCEEDED, summary.error
    assert (summary.chunks, summary.rows_planned, summary.rows_repaired) == (10, 1000, 1000)
    with psycopg.connect(state_db) as conn:
        planned = [r[0] for r in conn.execute(
            "SELECT rows_planned FROM trueup.chunks ORDER BY chunk")]
    assert planned == [100] * 10
    # drift: every segment of the diff differs, and the compare path repairs it
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(f'UPDATE "{target_table}" SET "{columns[0]}" = \'drift\' '
                     f'WHERE "{target_key}" % 7 = 0')
        conn.execute(f'DELETE FROM "{target_table}" WHERE "{target_key}" % 11 = 0')
        conn.execute(f'INSERT INTO "{target_table}" ("{target_key}", "{version}") '
                     "SELECT g, 1 FROM generate_series(2001, 2005) g")
    day = diff(config, "odd", partition="2026-02-01")
    assert day.mismatch == 143 - 13 and day.missing == 90
    run = diff(config, "odd")
    assert (run.mismatch, run.missing, run.orphan) == (130, 90, 5)
    summary = start_backfill(config, "odd", BackfillOptions(scope=BackfillScope.RUN,
                                                            run_id=run.run_id))
    assert summary.status is BackfillStatus.SUCCEEDED, summary.error
    assert summary.rows_repaired == 225
    assert diff(config, "odd").consistent
