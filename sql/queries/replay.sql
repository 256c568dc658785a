-- Queries behind `trueup replay`: one row per replay, one event per replayed message.

-- name: replay_lock
-- One replay (or dry run) per dead-letter queue at a time: a session-level advisory lock,
-- released when the process ends, even by kill -9.
SELECT pg_try_advisory_lock(hashtextextended('trueup.replay:' || %(name)s, 0)) AS locked;

-- name: replay_unlock
SELECT pg_advisory_unlock(hashtextextended('trueup.replay:' || %(name)s, 0));

-- name: abandon_replays
-- Called while holding the lock: a replay of this queue still 'running' lost its process.
UPDATE trueup.replays
SET status = 'failed', finished_at = now(),
    error = 'interrupted: the replaying process ended before finishing'
WHERE name = %(name)s AND status = 'running'
RETURNING replay_id;

-- name: start_replay
INSERT INTO trueup.replays (name, dry_run, filter, max_messages, rate)
VALUES (%(name)s, %(dry_run)s, %(filter)s, %(max_messages)s, %(rate)s)
RETURNING replay_id, started_at;

-- name: record_replay_batch
-- A batch's events and counts in one statement (atomic without a transaction block, one round
-- trip). Columns travel as JSON arrays: encoding them is cheap next to Postgres array literals.
-- Nothing is written when the replay is no longer running; the caller sees no row then.
-- A replay records each message once (the caller leaves out ids it recorded, see
-- last_replayed): no ON CONFLICT, whose speculative insertion cost a quarter of the statement.
-- An id recorded as not sent whose later copy was sent is updated instead (upgraded).
WITH counted AS (
    UPDATE trueup.replays
    SET moved = moved + %(moved)s, parked = parked + %(parked)s,
        skipped = skipped + %(skipped)s
    WHERE replay_id = %(replay_id)s AND status = 'running'
    RETURNING replay_id
), recorded AS (
    INSERT INTO trueup.replay_events
        (replay_id, message_id, origin, destination, outcome, error_class, attempts)
    SELECT c.replay_id, e.message_id, e.origin, e.destination, e.outcome, e.error_class,
           e.attempts::integer
    FROM counted AS c,
         ROWS FROM (json_array_elements_text(%(message_ids)s::json),
                    json_array_elements_text(%(origins)s::json),
                    json_array_elements_text(%(destinations)s::json),
                    json_array_elements_text(%(outcomes)s::json),
                    json_array_elements_text(%(error_classes)s::json),
                    json_array_elements_text(%(attempts)s::json))
         AS e (message_id, origin, destination, outcome, error_class, attempts)
), upgraded AS (
    -- Rare: a later copy of an id this replay recorded as not sent was sent (empty arrays
    -- otherwise). Its event says so, or that copy's later duplicates would be sent again.
    -- The whole event becomes the sent copy's, as when both copies are in one batch.
    UPDATE trueup.replay_events AS e
    SET outcome = u.outcome, destination = u.destination, attempts = u.attempts::integer,
        origin = u.origin, error_class = u.error_class
    FROM counted AS c,
         ROWS FROM (json_array_elements_text(%(upgraded_message_ids)s::json),
                    json_array_elements_text(%(upgraded_outcomes)s::json),
                    json_array_elements_text(%(upgraded_destinations)s::json),
                    json_array_elements_text(%(upgraded_attempts)s::json),
                    json_array_elements_text(%(upgraded_origins)s::json),
                    json_array_elements_text(%(upgraded_error_classes)s::json))
         AS u (message_id, outcome, destination, attempts, origin, error_class)
    WHERE e.message_id = u.message_id AND e.replay_id = c.replay_id
)
SELECT replay_id FROM counted;

-- name: last_replayed
-- Of these messages (a JSON array of ids), those that replays of this queue recorded: the
-- newest replay that moved or parked each (NULL: none did; a letter whose copy came from an
-- older replay, its trueup-replay-id header, was already handled) and when it last was (a
-- letter that failed after that is another message under a reused id), and whether replay
-- %(replay_id)s itself recorded it.
SELECT e.message_id,
       max(e.replay_id) FILTER (WHERE e.outcome IN ('moved', 'parked')) AS replay_id,
       max(e.at) FILTER (WHERE e.outcome IN ('moved', 'parked')) AS moved_at,
       bool_or(e.replay_id = %(replay_id)s) AS recorded_here
FROM trueup.replay_events AS e
JOIN trueup.replays AS r USING (replay_id)
WHERE e.message_id = ANY(ARRAY(SELECT json_array_elements_text(%(message_ids)s::json)))
  AND r.name = %(name)s
GROUP BY e.message_id;

-- name: finish_replay
UPDATE trueup.replays
SET status = %(status)s, finished_at = now(), seconds = %(seconds)s, error = %(error)s
WHERE replay_id = %(replay_id)s AND status = 'running'
RETURNING replay_id;

-- name: replay_events
SELECT message_id, origin, destination, outcome, error_class, attempts, at
FROM trueup.replay_events
WHERE replay_id = %(replay_id)s
ORDER BY at, message_id;
