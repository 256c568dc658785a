-- 0013: a repairs row's key as text in the "C" collation, not as jsonb. Every repairs row adds
-- an entry to the primary key (backfill_id, chunk, key), and comparing jsonb values down the
-- index cost more than the row itself: measured by COPY of 1,000,000 rows of 10,000-row chunks,
-- 5.5 us a row with the jsonb key, 2.7 with this one (1.9 without any primary key).
-- The text is jsonb's with numbers without trailing zeros (jsonb compares 9.00 and 9 equal):
-- one text per key, as every writer renders it (trueup.backfill.keyspace.repairs_text), so the
-- primary key still holds one row per key and lineage finds it. Like 0007 and 0008, this
-- rewrites the table and builds its primary key again under an ACCESS EXCLUSIVE lock (see
-- docs/operations.md, Upgrading).

-- in trueup's schema, not pg_temp: a state role may lack the TEMPORARY privilege
CREATE FUNCTION trueup.repairs_text_0013(key jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(key) = 'array' THEN coalesce((
        SELECT jsonb_agg(CASE WHEN jsonb_typeof(e) = 'number'
                              THEN to_jsonb(trim_scale(e::text::numeric)) ELSE e END
                         ORDER BY n)
        FROM jsonb_array_elements(key) WITH ORDINALITY AS x (e, n)), key)::text
    ELSE key::text END
$$;

ALTER TABLE trueup.repairs ALTER COLUMN key TYPE text COLLATE "C"
    -- only a key with a point in it may hold a number with trailing zeros
    USING CASE WHEN key::text LIKE '%.%' THEN trueup.repairs_text_0013(key)
               ELSE key::text END;

DROP FUNCTION trueup.repairs_text_0013(jsonb);
