-- 0003: the order a backfill's key ranges were cut in. 'c': text keys compare in the C
-- collation on every side (whatever their collations; no index in another collation serves
-- such a range). 'native': every side's text key columns share one collation, and ranges
-- compare in it, through the key index. Backfills planned before this migration used 'c'.

ALTER TABLE trueup.backfills
    ADD COLUMN key_order text NOT NULL DEFAULT 'c'
        CONSTRAINT backfills_key_order_check CHECK (key_order IN ('c', 'native'));
