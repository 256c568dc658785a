-- 0014: a backfill may be asked to run alongside others of its reconciliation (`trueup
-- backfill ... --alongside`: an urgent --run while a long --all runs). Such a backfill does
-- not count against the one-active rule, and the rule does not stop it; every other backfill
-- still waits for no active one. A new column with a constant default (no rewrite) and the
-- partial unique index built again over the few active rows' table (trueup.backfills holds a
-- row per backfill, not per key).

ALTER TABLE trueup.backfills ADD COLUMN alongside boolean NOT NULL DEFAULT false;
DROP INDEX trueup.backfills_one_active_idx;
CREATE UNIQUE INDEX backfills_one_active_idx
    ON trueup.backfills (reconciliation)
    WHERE status IN ('planning', 'running') AND NOT alongside;
