-- 0007: one index fewer on repairs. Every repairs row maintained three: the identity
-- repair_id's primary key, the unique (backfill_id, key) and (backfill_id, chunk). Nothing
-- looks a row up by repair_id (it orders a key's few repairs), so the unique (backfill_id,
-- key), which every writer and `trueup lineage` go through, becomes the primary key and
-- repair_id keeps its values without an index: about 0.7 us less per row written.
-- On a big repairs table the new index is built under an ACCESS EXCLUSIVE lock (see
-- docs/operations.md, Upgrading).

ALTER TABLE trueup.repairs DROP CONSTRAINT repairs_pkey;
ALTER TABLE trueup.repairs DROP CONSTRAINT repairs_once_per_backfill;
ALTER TABLE trueup.repairs ADD CONSTRAINT repairs_pkey PRIMARY KEY (backfill_id, key);
