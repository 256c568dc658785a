-- 0005: repairs rows cheaper to write, chunks cheaper to complete. A backfill writes one
-- repairs row per repaired key (10,000 per chunk by default), so what each row maintains is paid
-- a million times in a backfill of a million keys. Measured per row, COPYing 10,000-row chunks:
-- * No foreign key to backfills (2.4 us of 8.8): it guarded nothing the writers do not. A
--   repairs row is written only while its worker holds the chunk's lease, the chunk belongs to
--   its backfill (a key of its own), and no backfill is ever deleted. The key to runs stays: it
--   is checked only for rows that name a run, and a run can be deleted by hand.
-- * No index on (reconciliation, key) (1.1 us): `trueup lineage` finds a key's repairs through
--   the backfills of its reconciliation and the unique (backfill_id, key), one probe each.
-- * An index on (backfill_id, chunk) (0.7 us): complete_chunk counted a chunk's rows by reading
--   every row of the backfill (the unique index leads with backfill_id, then the key), so each
--   chunk of a backfill of a million keys read up to a million rows; now it reads its own.

ALTER TABLE trueup.repairs DROP CONSTRAINT repairs_backfill_id_fkey;
DROP INDEX trueup.repairs_key_idx;
CREATE INDEX repairs_chunk_idx ON trueup.repairs (backfill_id, chunk);
