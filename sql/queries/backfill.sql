-- Backfills, their chunks and repairs (trueup/backfill/). Every transition is guarded by the
-- status it expects; the caller raises when no row comes back.

-- name: active_backfill
-- The one the one-active rule holds to first (those running --alongside do not count for it).
SELECT backfill_id, status, created_at
FROM trueup.backfills
WHERE reconciliation = %(reconciliation)s AND status IN ('planning', 'running')
ORDER BY alongside, created_at, backfill_id
LIMIT 1;

-- name: insert_backfill
INSERT INTO trueup.backfills (reconciliation, scope, run_id, partition, status, dry_run,
                              chunk_size, rate, launched_by, alongside)
VALUES (%(reconciliation)s, %(scope)s, %(run_id)s, %(partition)s, 'planning', %(dry_run)s,
        %(chunk_size)s, %(rate)s, %(launched_by)s, %(alongside)s)
RETURNING backfill_id;

-- name: left_running
-- The backfill a retried (or re-executed) Dagster run continues: the one its root run planned,
-- still running (that run's process died), of the same reconciliation.
SELECT backfill_id FROM trueup.backfills
WHERE reconciliation = %(reconciliation)s AND launched_by = %(launched_by)s
  AND status = 'running';

-- name: set_key_order
UPDATE trueup.backfills SET key_order = %(key_order)s WHERE backfill_id = %(backfill_id)s;

-- name: column_collation
-- The type and collation of a table's column (collation NULL: the database's default).
SELECT t.typname AS type,
       CASE WHEN a.attcollation = 100 THEN NULL ELSE jsonb_build_object(
           'provider', c.collprovider, 'collate', c.collcollate, 'ctype', c.collctype,
           'locale', coalesce(to_jsonb(c) -> 'colliculocale', to_jsonb(c) -> 'colllocale'),
           'version', pg_collation_actual_version(c.oid),
           'deterministic', c.collisdeterministic) END AS collation
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_collation c ON c.oid = a.attcollation
WHERE a.attrelid = %(table)s::regclass AND a.attname = %(column)s AND NOT a.attisdropped;

-- name: column_collation_name
-- A table column's collation by name, as Postgres quotes it ("default": the database's).
SELECT a.attcollation::regcollation::text AS collation
FROM pg_attribute a
WHERE a.attrelid = %(table)s::regclass AND a.attname = %(column)s AND NOT a.attisdropped
  AND a.attcollation <> 0;

-- name: default_collation
-- The current database's default collation, described as column_collation describes one
-- (PostgreSQL 15 and later: datlocprovider and the actual version).
SELECT jsonb_build_object(
           'provider', d.datlocprovider, 'collate', d.datcollate, 'ctype', d.datctype,
           'locale', coalesce(to_jsonb(d) -> 'daticulocale', to_jsonb(d) -> 'datlocale'),
           'version', pg_database_collation_actual_version(d.oid),
           'deterministic', true) AS collation
FROM pg_database d WHERE d.datname = current_database();

-- name: plan_run_chunks
-- Batches of a run's repairable differences, in the order the run found them.
INSERT INTO trueup.chunks (backfill_id, chunk, keys, rows_planned)
-- Each key once, so that it belongs to one chunk (the repairs primary key counts on that).
SELECT %(backfill_id)s, (n - 1) / %(chunk_size)s, jsonb_agg(key ORDER BY n), count(*)
FROM (SELECT key, row_number() OVER (ORDER BY first_seq) AS n
      FROM (SELECT key, min(seq) AS first_seq
            FROM trueup.differences
            WHERE run_id = %(run_id)s
              AND class IN ('missing', 'orphan', 'stale', 'ahead', 'mismatch')
            GROUP BY key) AS k
     ) AS d
GROUP BY (n - 1) / %(chunk_size)s;

-- name: insert_range_chunk
INSERT INTO trueup.chunks (backfill_id, chunk, key_from, key_to, rows_planned)
VALUES (%(backfill_id)s, %(chunk)s, %(key_from)s, %(key_to)s, %(rows_planned)s);

-- name: start_backfill
UPDATE trueup.backfills
SET status = 'running', started_at = now(),
    rows_planned = (SELECT coalesce(sum(rows_planned), 0) FROM trueup.chunks
                    WHERE backfill_id = %(backfill_id)s)
WHERE backfill_id = %(backfill_id)s AND status = 'planning'
RETURNING backfill_id;

-- name: get_backfill
SELECT b.*,
       (SELECT count(*) FROM trueup.chunks c WHERE c.backfill_id = b.backfill_id) AS chunks,
       (SELECT count(*) FROM trueup.chunks c
        WHERE c.backfill_id = b.backfill_id AND c.status = 'done') AS chunks_done
FROM trueup.backfills AS b
WHERE b.backfill_id = %(backfill_id)s;

-- name: claim_chunk
-- A pending chunk that is due, or a running one whose worker stopped renewing its lease
-- (taken_over: the previous holder's lease had expired).
WITH picked AS (
    SELECT backfill_id, chunk, status AS was FROM trueup.chunks
    WHERE backfill_id = %(backfill_id)s
      AND ((status = 'pending' AND next_attempt_at <= now())
           OR (status = 'running' AND lease_expires_at < now()))
    ORDER BY next_attempt_at, chunk
    LIMIT 1
    FOR UPDATE SKIP LOCKED)
UPDATE trueup.chunks AS c
SET status = 'running', attempts = c.attempts + 1, lease_owner = %(owner)s,
    lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
FROM picked
WHERE (c.backfill_id, c.chunk) = (picked.backfill_id, picked.chunk)
RETURNING c.backfill_id, c.chunk, c.key_from, c.key_to, c.keys, c.rows_planned, c.attempts,
          picked.was = 'running' AS taken_over;

-- name: renew_lease
-- From the clock, not now(): a chunk holds its lease late in a transaction that began before
-- its target write, which can outlast the lease.
UPDATE trueup.chunks
SET lease_expires_at = clock_timestamp() + make_interval(secs => %(lease_seconds)s)
WHERE backfill_id = %(backfill_id)s AND chunk = %(chunk)s AND status = 'running'
  AND lease_owner = %(owner)s
RETURNING chunk;

-- name: complete_chunk
-- Counts come from the chunk's repairs rows (count), so a retried chunk never counts a key
-- twice, unless the caller knows them (see trueup.backfill.chunks.complete).
WITH counted AS (
    SELECT count(*) FILTER (WHERE action <> 'skipped') AS repaired,
           count(*) FILTER (WHERE action = 'skipped') AS skipped
    FROM trueup.repairs
    WHERE %(count)s AND backfill_id = %(backfill_id)s AND chunk = %(chunk)s
), done AS (
    UPDATE trueup.chunks AS c
    SET status = 'done', finished_at = now(), lease_expires_at = NULL,  -- owner kept: who did it
        error = NULL,
        rows_repaired = CASE WHEN %(count)s THEN counted.repaired ELSE %(repaired)s END,
        rows_skipped = CASE WHEN %(count)s THEN counted.skipped ELSE %(skipped)s END
    FROM counted
    WHERE c.backfill_id = %(backfill_id)s AND c.chunk = %(chunk)s AND c.status = 'running'
      AND c.lease_owner = %(owner)s
    RETURNING c.rows_repaired, c.rows_skipped
)
UPDATE trueup.backfills AS b
SET rows_repaired = b.rows_repaired + done.rows_repaired,
    rows_skipped = b.rows_skipped + done.rows_skipped
FROM done
WHERE b.backfill_id = %(backfill_id)s
RETURNING done.rows_repaired, done.rows_skipped;

-- name: retry_chunk
UPDATE trueup.chunks
SET status = 'pending', next_attempt_at = now() + make_interval(secs => %(delay_seconds)s),
    lease_owner = NULL, lease_expires_at = NULL, error = %(error)s
WHERE backfill_id = %(backfill_id)s AND chunk = %(chunk)s AND status = 'running'
  AND lease_owner = %(owner)s
RETURNING chunk;

-- name: fail_chunk
UPDATE trueup.chunks
SET status = 'failed', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
    error = %(error)s
WHERE backfill_id = %(backfill_id)s AND chunk = %(chunk)s AND status = 'running'
  AND lease_owner = %(owner)s
RETURNING chunk;

-- name: chunk_progress
SELECT count(*) AS chunks,
       count(*) FILTER (WHERE status = 'done') AS done,
       count(*) FILTER (WHERE status IN ('pending', 'running')) AS open,
       (SELECT chunk::text || ': ' || coalesce(error, 'failed') FROM trueup.chunks
        WHERE backfill_id = %(backfill_id)s AND status = 'failed'
        ORDER BY chunk LIMIT 1) AS failure
FROM trueup.chunks
WHERE backfill_id = %(backfill_id)s;

-- name: finish_backfill
UPDATE trueup.backfills
SET status = %(status)s, finished_at = now(), error = %(error)s
WHERE backfill_id = %(backfill_id)s AND status = 'running'
RETURNING backfill_id;

-- name: finish_backfill_done
-- A backfill whose chunks were all found finished, unless a --resume reopened some since (a
-- cancel, then a resume, between that count and this update): it stays running for them.
UPDATE trueup.backfills AS b
SET status = %(status)s, finished_at = now(), error = %(error)s
WHERE b.backfill_id = %(backfill_id)s AND b.status = 'running'
  AND NOT EXISTS (SELECT 1 FROM trueup.chunks AS c
                  WHERE c.backfill_id = b.backfill_id AND c.status IN ('pending', 'running'))
RETURNING backfill_id;

-- name: cancel_backfill
WITH cancelled AS (
    UPDATE trueup.backfills
    SET status = 'cancelled', finished_at = now()
    WHERE backfill_id = %(backfill_id)s AND status IN ('planning', 'running')
    RETURNING backfill_id
)
-- Pending chunks stop here; a running chunk finishes (or is reclaimed by a resume).
UPDATE trueup.chunks AS c
SET status = 'cancelled'
FROM cancelled
WHERE c.backfill_id = cancelled.backfill_id AND c.status = 'pending'
RETURNING c.chunk;

-- name: reopen_backfill
UPDATE trueup.backfills
SET status = 'running', finished_at = NULL, error = NULL
WHERE backfill_id = %(backfill_id)s AND status IN ('failed', 'cancelled')
RETURNING backfill_id;

-- name: reopen_chunks
-- Every unfinished chunk starts its attempts again: those waiting for a retry too, or they
-- would fail the resumed backfill at their next failure, after their backoff; and those whose
-- worker died holding them (a lease run out), claimed at once, not a lease later. A live
-- holder's lease stands; a stalled one's completion finds the chunk no longer its own. Those are
-- returned as taken over (the worker that claims them next finds them pending).
WITH reopened AS (
    SELECT chunk, status = 'running' AS taken_over, attempts FROM trueup.chunks
    WHERE backfill_id = %(backfill_id)s
      AND (status IN ('failed', 'cancelled') OR (status = 'pending' AND attempts > 0)
           OR (status = 'running' AND lease_expires_at < now()))
    FOR UPDATE
)
UPDATE trueup.chunks AS c
SET status = 'pending', attempts = 0, next_attempt_at = now(), error = NULL
FROM reopened AS r
WHERE c.backfill_id = %(backfill_id)s AND c.chunk = r.chunk
RETURNING c.chunk, r.taken_over, r.attempts;

-- name: stage_repairs
CREATE TEMP TABLE IF NOT EXISTS trueup_repairs_stage (
    key jsonb NOT NULL, action text NOT NULL, fingerprint_before bigint,
    fingerprint_after bigint
) ON COMMIT DELETE ROWS;

-- name: record_repairs
-- A plain insert: the primary key (backfill_id, chunk, key) refuses a second row for a key. A
-- chunk that may hold rows already adds record_repairs_again (see
-- trueup.backfill.model.record_staged).
INSERT INTO trueup.repairs (reconciliation, key, run_id, backfill_id, chunk, action,
                            fingerprint_before, fingerprint_after)
SELECT %(reconciliation)s, s.key::text,
       coalesce(%(run_id)s, (SELECT max(d.run_id) FROM trueup.differences AS d
                             WHERE d.reconciliation = %(reconciliation)s AND d.key = s.key)),
       %(backfill_id)s, %(chunk)s, s.action, s.fingerprint_before, s.fingerprint_after
FROM trueup_repairs_stage AS s

-- name: record_repairs_of_run
-- record_repairs when the rows' run is known: the backfill's, or none (no run of the
-- reconciliation has differences). No lookup per row.
INSERT INTO trueup.repairs (reconciliation, key, run_id, backfill_id, chunk, action,
                            fingerprint_before, fingerprint_after)
SELECT %(reconciliation)s, s.key::text, %(run_id)s, %(backfill_id)s, %(chunk)s, s.action,
       s.fingerprint_before, s.fingerprint_after
FROM trueup_repairs_stage AS s

-- name: copy_target
-- Whether an upsert target takes a COPY of source rows as it takes an INSERT: a plain or
-- partitioned table without rules or row-level security, with a unique index on exactly the
-- key columns (valid, checked at once, not partial) for a row that arrives meanwhile to meet.
SELECT c.relkind IN ('r', 'p') AND NOT c.relrowsecurity AND NOT c.relhasrules
       AND EXISTS (
           SELECT 1 FROM pg_index AS i
           WHERE i.indrelid = c.oid AND i.indisunique AND i.indimmediate AND i.indisvalid
             AND i.indpred IS NULL AND i.indexprs IS NULL
             AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text COLLATE "C")
                  FROM unnest(i.indkey[0:i.indnkeyatts - 1]) AS k (attnum)
                  JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum = k.attnum)
                 = %(key)s::text[]) AS takes_copy
FROM pg_class AS c
WHERE c.oid = %(table)s::regclass;

-- name: chunk_has_repairs
-- Whether a chunk holds repairs rows already: the intent of an attempt that did not finish.
SELECT EXISTS (SELECT 1 FROM trueup.repairs
               WHERE backfill_id = %(backfill_id)s AND chunk = %(chunk)s);

-- name: has_differences
-- Whether any run of the reconciliation found differences: else no repairs row has a run to name.
SELECT EXISTS (SELECT 1 FROM trueup.differences WHERE reconciliation = %(reconciliation)s);

-- name: record_repairs_again
-- Appended to record_repairs or record_repairs_of_run: a retried chunk finds its earlier rows
-- and corrects them.
ON CONFLICT (backfill_id, chunk, key) DO UPDATE
SET action = excluded.action, fingerprint_after = excluded.fingerprint_after, at = now();

-- name: lineage_sample
SELECT key, run_id, chunk, action, fingerprint_before, fingerprint_after, at
FROM trueup.repairs
WHERE backfill_id = %(backfill_id)s
ORDER BY chunk, key  -- the first chunks, read through the primary key
LIMIT %(limit)s;
