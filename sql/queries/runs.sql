-- Runs of a reconciliation and the differences they found.

-- name: start_run
-- In the transaction that takes the run's lock (hold_run): no other session sees the run
-- running before its process holds it.
INSERT INTO trueup.runs (reconciliation, partition, status)
VALUES (%(reconciliation)s, %(partition)s, 'running')
RETURNING run_id, started_at;

-- name: hold_run
-- While a run is running, the session of its process holds this session-level advisory lock
-- (as a replay holds its queue's, see replay.sql): released when that session ends, even by
-- kill -9 or an OOM kill, so a run whose lock is free lost its process.
SELECT pg_advisory_lock(hashtextextended('trueup.run:' || %(run_id)s::bigint::text, 0));

-- name: abandon_runs
-- Runs still 'running' whose process died (no session holds their lock), of one
-- reconciliation (NULL: of all). Tried with a transaction-level lock, released at commit: a
-- live run's lock is held, so it is never touched. A run that finished meanwhile is no longer
-- 'running' when the row is rechecked.
UPDATE trueup.runs
SET status = 'failed', finished_at = now(), error = %(error)s
WHERE status = 'running'
  AND (reconciliation = %(reconciliation)s OR %(reconciliation)s::text IS NULL)
  -- a lock tried for running rows only (CASE: whatever order the planner puts conditions in)
  AND CASE WHEN status = 'running'
           THEN pg_try_advisory_xact_lock(hashtextextended('trueup.run:' || run_id::text, 0))
      END
RETURNING run_id, reconciliation;

-- name: dead_runs
-- abandon_runs for a session that may not write (a user who may only read runs status): the
-- runs it would mark, to be shown failed. Not on a standby, which sees no primary's locks.
SELECT run_id FROM trueup.runs
WHERE status = 'running'
  AND CASE WHEN pg_is_in_recovery() OR status <> 'running' THEN false
           ELSE pg_try_advisory_xact_lock(hashtextextended('trueup.run:' || run_id::text, 0))
      END;

-- name: finish_run
UPDATE trueup.runs
SET status = 'succeeded', finished_at = now(), source_rows = %(source_rows)s,
    target_rows = %(target_rows)s, missing = %(missing)s, orphan = %(orphan)s,
    stale = %(stale)s, ahead = %(ahead)s, mismatch = %(mismatch)s,
    in_flight = %(in_flight)s, unreadable = %(unreadable)s, seconds = %(seconds)s
WHERE run_id = %(run_id)s AND status = 'running'
RETURNING run_id;

-- name: fail_run
UPDATE trueup.runs
SET status = 'failed', finished_at = now(), error = %(error)s, seconds = %(seconds)s
WHERE run_id = %(run_id)s AND status = 'running'
RETURNING run_id;

-- name: run_differences
SELECT key, class, source_version, target_version, source_fingerprint, target_fingerprint,
       detail
FROM trueup.differences
WHERE run_id = %(run_id)s
ORDER BY seq;
