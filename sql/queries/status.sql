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
-- Each asset's checks as its latest recording left them (a recording's results share its
-- transaction's `at`): a check since removed from a suite is not listed. The assets are found
-- by skipping along the index from one to the next, so the rows read are those listed.
WITH RECURSIVE assets (asset_key) AS (
    (SELECT asset_key FROM trueup.check_results ORDER BY asset_key LIMIT 1)
    UNION ALL
    SELECT (SELECT c.asset_key FROM trueup.check_results AS c
            WHERE c.asset_key > a.asset_key ORDER BY c.asset_key LIMIT 1)
    FROM assets AS a
    WHERE a.asset_key IS NOT NULL
)
SELECT DISTINCT ON (c.asset_key, c.check_name)
       c.asset_key, c.check_name, c.reconciliation, c.run_id, c.passed, c.severity, c.at
FROM assets AS a
CROSS JOIN LATERAL (SELECT at FROM trueup.check_results
                    WHERE asset_key = a.asset_key ORDER BY at DESC LIMIT 1) AS latest
JOIN trueup.check_results AS c ON c.asset_key = a.asset_key AND c.at = latest.at
ORDER BY c.asset_key, c.check_name, c.check_result_id DESC;
