-- `trueup lineage NAME KEY`: every run that saw a key and every repair of it.

-- name: key_runs
SELECT d.run_id, r.partition, r.status, r.started_at, d.class, d.source_version,
       d.target_version, d.source_fingerprint, d.target_fingerprint
FROM trueup.differences AS d
JOIN trueup.runs AS r USING (run_id)
WHERE d.reconciliation = %(reconciliation)s AND d.key = ANY(%(keys)s::jsonb[])
ORDER BY d.run_id;

-- name: key_repairs
SELECT p.backfill_id, p.chunk, p.action, p.at, p.fingerprint_before, p.fingerprint_after,
       p.run_id, b.scope, b.status AS backfill_status
FROM trueup.backfills AS b
JOIN trueup.chunks AS c ON c.backfill_id = b.backfill_id
-- one probe of the primary key (backfill_id, chunk, key) per chunk of the reconciliation's
-- backfills (a key has its row in one of them)
JOIN trueup.repairs AS p ON p.backfill_id = c.backfill_id AND p.chunk = c.chunk
                        AND p.key = ANY(%(keys)s::jsonb[])
WHERE b.reconciliation = %(reconciliation)s
ORDER BY p.at, p.backfill_id;
