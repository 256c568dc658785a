-- Queries behind `trueup status`: the newest runs, backfills and replays.

-- name: recent_runs
SELECT run_id, reconciliation, partition, status, started_at, finished_at, source_rows,
       target_rows, missing, orphan, stale, ahead, mismatch, in_flight, unreadable, seconds,
       error
FROM trueup.runs
ORDER BY started_at DESC, run_id DESC
LIMIT %(limit)s;

-- name: recent_backfills
SELECT b.backfill_id, b.reconciliation, b.scope, b.status, b.dry_run, b.rows_planned,
       b.rows_repaired, b.rows_skipped, b.created_at, b.finished_at, b.error,
       count(c.chunk) AS chunks,
       count(c.chunk) FILTER (WHERE c.status = 'done') AS chunks_done
FROM (SELECT * FROM trueup.backfills ORDER BY created_at DESC, backfill_id DESC
      LIMIT %(limit)s) AS b
LEFT JOIN trueup.chunks AS c USING (backfill_id)
GROUP BY b.backfill_id, b.reconciliation, b.scope, b.status, b.dry_run, b.rows_planned,
         b.rows_repaired, b.rows_skipped, b.created_at, b.finished_at, b.error
ORDER BY b.created_at DESC, b.backfill_id DESC;

-- name: recent_replays
SELECT replay_id, name, status, dry_run, moved, parked, skipped, started_at, finished_at,
       seconds, error
FROM trueup.replays
ORDER BY started_at DESC, replay_id DESC
LIMIT %(limit)s;

-- name: latest_check_results
-- The latest result of every check, unless a later recording by the same recorder left the
-- check out (a check removed from a suite). A recorder writes its results in one transaction
-- (they share its `at`); the recorders of one asset are told apart by whether they name a
-- reconciliation and a run (see migration 0011). The checks are found by skipping along the
-- index from one to the next, so the rows read are about those listed.
WITH RECURSIVE checks (asset_key, check_name) AS (
    (SELECT asset_key, check_name FROM trueup.check_results
     ORDER BY asset_key, check_name LIMIT 1)
    UNION ALL
    SELECT next.asset_key, next.check_name
    FROM checks AS c
    CROSS JOIN LATERAL (SELECT r.asset_key, r.check_name FROM trueup.check_results AS r
                        WHERE (r.asset_key, r.check_name) > (c.asset_key, c.check_name)
                        ORDER BY r.asset_key, r.check_name LIMIT 1) AS next
)
SELECT latest.*
FROM checks AS c
CROSS JOIN LATERAL (SELECT r.asset_key, r.check_name, r.reconciliation, r.run_id, r.passed,
                           r.severity, r.at
                    FROM trueup.check_results AS r
                    WHERE r.asset_key = c.asset_key AND r.check_name = c.check_name
                    ORDER BY r.at DESC LIMIT 1) AS latest
WHERE NOT EXISTS (SELECT 1 FROM trueup.check_results AS later
                  WHERE later.asset_key = latest.asset_key
                    AND (later.reconciliation IS NULL) = (latest.reconciliation IS NULL)
                    AND (later.run_id IS NULL) = (latest.run_id IS NULL)
                    AND later.at > latest.at)
ORDER BY latest.asset_key, latest.check_name;
