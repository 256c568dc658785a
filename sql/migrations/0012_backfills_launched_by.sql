-- 0012: who launched a backfill, when something other than a person at a shell did: the root
-- run id of the Dagster run that planned it. A run that retries or re-executes that run
-- continues the backfill it left running (its process died), and only that one: a backfill
-- someone else runs is never joined by mistake. A new nullable column: no rewrite, no lock
-- held for long.

ALTER TABLE trueup.backfills ADD COLUMN launched_by text;
