-- 0009: where each replay of a Kafka dead-letter topic got to, per partition, kept in trueup's
-- state as well as in the replay group's committed offsets. A group that never has members
-- loses its offsets offsets.retention.minutes (7 days by default) after its last commit: the
-- depth then counted every letter already replayed, and the next replay copied each letter
-- kept for good to the tail once more. A small new table: no lock on anything that exists.

CREATE TABLE trueup.replay_positions (
    name            text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL CHECK (partition >= 0),
    next_offset     bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, topic, partition)
);
