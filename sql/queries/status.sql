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
SELECT DISTINCT ON (asset_key, check_name)
       asset_key, check_name, reconciliation, run_id, passed, severity, at
FROM trueup.check_results
ORDER BY asset_key, check_name, at DESC;
