-- Runs of a reconciliation and the differences they found.

-- name: start_run
INSERT INTO trueup.runs (reconciliation, partition, status)
VALUES (%(reconciliation)s, %(partition)s, 'running')
RETURNING run_id, started_at;

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
