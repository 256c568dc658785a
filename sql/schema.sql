-- trueup's state schema as it stands after every migration in sql/migrations/.
-- Migrations are what runs; this file is the readable whole. tests/integration/
-- test_state.py builds a database from each and checks that they are the same.

CREATE SCHEMA IF NOT EXISTS trueup;

CREATE TABLE trueup.runs (
    run_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reconciliation  text        NOT NULL,
    partition       text,
    status          text        NOT NULL DEFAULT 'running'
                    CONSTRAINT runs_status_check
                    CHECK (status IN ('running', 'succeeded', 'failed')),
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    source_rows     bigint,
    target_rows     bigint,
    missing         bigint      NOT NULL DEFAULT 0,
    orphan          bigint      NOT NULL DEFAULT 0,
    stale           bigint      NOT NULL DEFAULT 0,
    ahead           bigint      NOT NULL DEFAULT 0,
    mismatch        bigint      NOT NULL DEFAULT 0,
    in_flight       bigint      NOT NULL DEFAULT 0,
    unreadable      bigint      NOT NULL DEFAULT 0,
    seconds         double precision,
    error           text
);
-- status and freshness: the newest runs of one reconciliation (and partition).
CREATE INDEX runs_reconciliation_started_idx
    ON trueup.runs (reconciliation, started_at DESC);

CREATE TABLE trueup.differences (
    run_id              bigint NOT NULL REFERENCES trueup.runs (run_id) ON DELETE CASCADE,
    seq                 integer NOT NULL,
    reconciliation      text   NOT NULL,
    key                 jsonb  NOT NULL,
    class               text   NOT NULL
                        CONSTRAINT differences_class_check
                        CHECK (class IN ('missing', 'orphan', 'stale', 'ahead', 'mismatch',
                                         'in_flight', 'unreadable')),
    source_version      jsonb,
    target_version      jsonb,
    source_fingerprint  bigint,
    target_fingerprint  bigint,
    detail              jsonb,
    PRIMARY KEY (run_id, seq)
);
-- backfill --run plans from one run's differences, class by class.
CREATE INDEX differences_run_class_idx ON trueup.differences (run_id, class);
-- lineage NAME KEY: every run that saw the key.
CREATE INDEX differences_key_idx ON trueup.differences (reconciliation, key);

CREATE TABLE trueup.backfills (
    backfill_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reconciliation  text        NOT NULL,
    scope           text        NOT NULL
                    CONSTRAINT backfills_scope_check
                    CHECK (scope IN ('run', 'partition', 'all', 'keys')),
    run_id          bigint REFERENCES trueup.runs (run_id),
    partition       text,
    status          text        NOT NULL DEFAULT 'planning'
                    CONSTRAINT backfills_status_check
                    CHECK (status IN ('planning', 'running', 'succeeded', 'failed',
                                      'cancelled')),
    dry_run         boolean     NOT NULL DEFAULT false,
    chunk_size      integer     NOT NULL CHECK (chunk_size > 0),
    rate            double precision CHECK (rate IS NULL OR rate > 0),
    -- the order key ranges were cut in: 'c' (text keys in the C collation on every side) or
    -- 'native' (every side's text key columns share one collation, served by the key index)
    key_order       text        NOT NULL DEFAULT 'c'
                    CONSTRAINT backfills_key_order_check
                    CHECK (key_order IN ('c', 'native')),
    rows_planned    bigint      NOT NULL DEFAULT 0,
    rows_repaired   bigint      NOT NULL DEFAULT 0,
    rows_skipped    bigint      NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    error           text,
    -- the root id of the Dagster run that planned it (migration 0012), else NULL
    launched_by     text,
    -- asked to run alongside other active backfills of its reconciliation (migration 0014)
    alongside       boolean     NOT NULL DEFAULT false
);
-- One active backfill per reconciliation, but those asked to run alongside others
-- (--alongside); the advisory lock gives the friendly message, this index makes a race
-- between two planners impossible.
CREATE UNIQUE INDEX backfills_one_active_idx
    ON trueup.backfills (reconciliation)
    WHERE status IN ('planning', 'running') AND NOT alongside;
CREATE INDEX backfills_reconciliation_created_idx
    ON trueup.backfills (reconciliation, created_at DESC);

CREATE TABLE trueup.chunks (
    backfill_id       bigint  NOT NULL REFERENCES trueup.backfills (backfill_id)
                              ON DELETE CASCADE,
    chunk             integer NOT NULL,
    status            text    NOT NULL DEFAULT 'pending'
                      CONSTRAINT chunks_status_check
                      CHECK (status IN ('pending', 'running', 'done', 'failed', 'cancelled')),
    key_from          jsonb,            -- inclusive lower key bound of a key-range chunk
    key_to            jsonb,            -- exclusive upper key bound of a key-range chunk
    keys              jsonb,            -- explicit keys of a chunk planned from differences
    rows_planned      bigint  NOT NULL DEFAULT 0,
    rows_repaired     bigint  NOT NULL DEFAULT 0,
    rows_skipped      bigint  NOT NULL DEFAULT 0,
    attempts          integer NOT NULL DEFAULT 0,
    lease_owner       text,
    lease_expires_at  timestamptz,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    error             text,
    PRIMARY KEY (backfill_id, chunk)
);
-- claim_chunk: pending chunks that are due, and running chunks whose lease expired.
CREATE INDEX chunks_claimable_idx
    ON trueup.chunks (backfill_id, next_attempt_at)
    WHERE status IN ('pending', 'running');

-- No foreign keys (to backfills or runs) and one index: see migrations 0005, 0007 and 0008
-- (one row per repaired key, a million in a backfill of a million keys).
CREATE TABLE trueup.repairs (
    repair_id           bigint GENERATED ALWAYS AS IDENTITY (CACHE 1000),
    reconciliation      text        NOT NULL,
    -- the key as jsonb prints it, its top-level numbers without trailing zeros (one text per
    -- key), compared in "C": cheaper to index than jsonb (see migration 0013)
    key                 text        COLLATE "C" NOT NULL,
    run_id              bigint,
    backfill_id         bigint      NOT NULL,
    chunk               integer     NOT NULL,
    action              text        NOT NULL
                        CONSTRAINT repairs_action_check
                        CHECK (action IN ('insert', 'update', 'delete', 'publish', 'tombstone',
                                          'skipped')),
    fingerprint_before  bigint,
    fingerprint_after   bigint,
    at                  timestamptz NOT NULL DEFAULT now(),
    -- each key is repaired once per backfill (a key belongs to one of its chunks), even when a
    -- chunk is retried after a crash. complete_chunk counts a chunk's rows through it, and
    -- `trueup lineage` probes each chunk of a reconciliation's backfills for a key.
    CONSTRAINT repairs_pkey PRIMARY KEY (backfill_id, chunk, key)
);

CREATE TABLE trueup.replays (
    replay_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text        NOT NULL,
    status       text        NOT NULL DEFAULT 'running'
                 CONSTRAINT replays_status_check
                 CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    dry_run      boolean     NOT NULL DEFAULT false,
    filter       text,
    max_messages bigint,
    rate         double precision,
    moved        bigint      NOT NULL DEFAULT 0,
    parked       bigint      NOT NULL DEFAULT 0,
    skipped      bigint      NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    seconds      double precision,
    error        text
);
CREATE INDEX replays_name_started_idx ON trueup.replays (name, started_at DESC);

-- No foreign key to replays, primary key led by message_id: see migration 0004 (one row per
-- dead letter a replay handles, written on the path of every batch).
CREATE TABLE trueup.replay_events (
    replay_id    bigint      NOT NULL,
    message_id   text        NOT NULL,
    origin       text,
    destination  text,
    outcome      text        NOT NULL
                 CONSTRAINT replay_events_outcome_check
                 CHECK (outcome IN ('moved', 'parked', 'skipped', 'would_move', 'would_park')),
    error_class  text,
    attempts     integer,
    at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (message_id, replay_id)  -- also "was this message ever replayed?"
);
CREATE INDEX replay_events_replay_idx ON trueup.replay_events (replay_id);

CREATE TABLE trueup.check_results (
    check_result_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    asset_key       text        NOT NULL,
    check_name      text        NOT NULL,
    reconciliation  text,
    run_id          bigint REFERENCES trueup.runs (run_id) ON DELETE SET NULL,
    passed          boolean     NOT NULL,
    severity        text        NOT NULL
                    CONSTRAINT check_results_severity_check
                    CHECK (severity IN ('WARN', 'ERROR')),
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    at              timestamptz NOT NULL DEFAULT now()
);
-- status: the latest result of every check ...
CREATE INDEX check_results_latest_idx ON trueup.check_results (asset_key, check_name, at DESC);
-- ... unless its recorder recorded again without it (migration 0011)
CREATE INDEX check_results_recorder_idx ON trueup.check_results
    (asset_key, (reconciliation IS NULL), (run_id IS NULL), at DESC);

CREATE SCHEMA IF NOT EXISTS trueup_mirror;
-- unreadable messages of each mirror, a table named as its reconciliation (migration 0006)
CREATE SCHEMA IF NOT EXISTS trueup_mirror_unreadable;

-- Where each replay of a Kafka dead-letter topic got to (see migration 0009): the replay
-- group's committed offsets expire when it has had no commit for a while. topic_id (0010):
-- the incarnation of the topic the position is in (NULL: kept before 0010).
CREATE TABLE trueup.replay_positions (
    name            text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL CHECK (partition >= 0),
    next_offset     bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    topic_id        text,
    PRIMARY KEY (name, topic, partition)
);

CREATE TABLE trueup.mirror_offsets (
    reconciliation  text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL CHECK (partition >= 0),
    next_offset     bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (reconciliation, topic, partition)
);
