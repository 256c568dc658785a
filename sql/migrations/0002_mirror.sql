-- 0002: the Kafka mirror. A reconciliation whose target is a topic consumes it into a mirror
-- table (one per reconciliation, in schema trueup_mirror, keyed like the source table) and
-- stores the next offset of every partition here, in the same transaction as the mirror rows:
-- exactly once into the mirror.

CREATE SCHEMA IF NOT EXISTS trueup_mirror;

CREATE TABLE trueup.mirror_offsets (
    reconciliation  text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL CHECK (partition >= 0),
    next_offset     bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (reconciliation, topic, partition)
);
