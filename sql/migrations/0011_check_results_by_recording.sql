-- 0011: `trueup status` lists each check's latest result unless a later recording by the same
-- recorder left the check out (a check removed from a suite). Every recorder writes all its
-- results in one transaction, so they share its `at`; recorders on one asset are told apart
-- by whether they name a reconciliation and a run: a differences run's class checks name
-- both, the freshness check only the reconciliation, a suite run or a dead-letter depth check
-- neither. The new index finds a recorder's recordings after a result with one probe; the
-- listing reads only the rows it shows (it read every result: 3.8 s at 2M results). Building it
-- holds writes to trueup.check_results for the build's time (about a second per million rows).

CREATE INDEX check_results_recorder_idx ON trueup.check_results
    (asset_key, (reconciliation IS NULL), (run_id IS NULL), at DESC);
