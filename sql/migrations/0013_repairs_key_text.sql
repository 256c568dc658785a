-- 0013: a repairs row's key as jsonb's text in the "C" collation, not as jsonb. Every repairs
-- row adds an entry to the primary key (backfill_id, chunk, key), and comparing jsonb values
-- down the index cost more than the row itself: measured by COPY of 1,000,000 rows of 10,000-row
-- chunks, 5.5 us a row with the jsonb key, 2.7 with this one (1.9 without any primary key).
-- jsonb's text is canonical (one text per jsonb value), so the key text identifies the key as
-- the jsonb did; every writer renders it so (see trueup.backfill.model.jsonb_text), and readers
-- compare with `key::jsonb` or with `jsonb::text`. Like 0007 and 0008, this rewrites the table
-- and builds its primary key again under an ACCESS EXCLUSIVE lock (see docs/operations.md,
-- Upgrading).

ALTER TABLE trueup.repairs ALTER COLUMN key TYPE text COLLATE "C" USING key::text;
