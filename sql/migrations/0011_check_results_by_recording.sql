-- 0011: `trueup status` lists each asset's checks as its latest recording left them. A recording
-- (a differences run's class checks, a suite run, a dead-letter depth check) writes all its
-- results in one transaction, so they share its `at`; the checks of an asset are those of its
-- latest `at`, and a check since removed from a suite is no longer listed. The index finds
-- that `at` per asset with one probe (and serves the auto-repair's blocking checks likewise);
-- the (asset_key, check_name, at) index it replaces served only the old listing, which read
-- every row (3.8 s at 2M results). Building it holds writes to trueup.check_results for the
-- build's time (about a second per million rows).

DROP INDEX trueup.check_results_latest_idx;
CREATE INDEX check_results_latest_idx ON trueup.check_results (asset_key, at DESC);
