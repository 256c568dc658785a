-- `trueup lineage NAME KEY`: every run that saw a key and every repair of it.

-- name: key_runs
-- stored_key: the key as the run stored it (lineage shows it, not the KEY typed), taken out
-- of the row before it is printed
SELECT d.run_id, r.partition, r.status, r.started_at, d.class, d.source_version,
       d.target_version, d.source_fingerprint, d.target_fingerprint, d.key::text AS stored_key
FROM trueup.differences AS d
JOIN trueup.runs AS r USING (run_id)
WHERE d.reconciliation = %(reconciliation)s AND d.key = ANY(%(keys)s::jsonb[])
ORDER BY d.run_id;

-- name: key_repairs
-- A repair of a chunk not done is an intent (a cross-database upsert records it before the
-- target commits): chunk_status says so.
SELECT p.backfill_id, p.chunk, p.action, p.at, p.fingerprint_before, p.fingerprint_after,
       p.run_id, b.scope, b.status AS backfill_status, c.status AS chunk_status,
       p.key AS stored_key
FROM trueup.backfills AS b
JOIN trueup.chunks AS c ON c.backfill_id = b.backfill_id
-- one probe of the primary key (backfill_id, chunk, key) per chunk that may hold rows (a key has
-- its row in one of them): not a dry run's, nor a done chunk that counted none; OFFSET 0 keeps
-- it a probe per chunk
CROSS JOIN LATERAL (
    SELECT r.* FROM trueup.repairs AS r
    WHERE r.backfill_id = c.backfill_id AND r.chunk = c.chunk
      AND r.key = ANY(%(repairs_keys)s::text[])  -- see trueup.backfill.keyspace.repairs_text
    OFFSET 0) AS p
WHERE b.reconciliation = %(reconciliation)s AND NOT b.dry_run
  AND (c.status <> 'done' OR c.rows_repaired + c.rows_skipped > 0)
ORDER BY p.at, p.backfill_id;
