-- Per-stream checkpoints of projections: locked, checked and moved in the batch's own transaction.

-- name: claim_checkpoints
-- Lock the batch's checkpoint rows in stream_id order, so concurrent workers queue in one order and never
-- deadlock, and move each to the newest delivered version the store holds (unless halted or already past it).
-- Input: one row per delivered event ($2 stream, $3 version, $4 event id). A delivered event the store does not
-- hold at its stream and version under the same id is a ghost (published, then lost with a primary by an
-- asynchronous failover, or a store restored from an older backup): it never moves a checkpoint, and its
-- versions are returned (ghosts) for the caller to take from the store instead. The row lock is taken on the
-- latest committed row, also after waiting for another worker's batch, and previous_version records where it
-- was: the caller applies (previous_version, version] in this same transaction, or rolls all of it back.
-- A read model that handles the event names $5 only (Projection.handled_names(); NULL: every event) has a
-- checkpoint that moves past the events it does not handle without their ever reaching it: for it, each stream's
-- handled store versions in (previous_version, version] are returned (handled), what this transaction must apply,
-- delivered or read from the store as gaps, however far apart they lie (one index range scan per stream).
WITH delivered AS (
    SELECT d.stream_id, d.version, coalesce(e.event_id = d.event_id, false) AS stored
    FROM unnest($2::text[], $3::bigint[], $4::uuid[]) AS d(stream_id, version, event_id)
    LEFT JOIN events AS e ON e.stream_id = d.stream_id AND e.version = d.version
), targets AS (
    SELECT stream_id, coalesce(max(version) FILTER (WHERE stored), -1) AS version,
           array_agg(version ORDER BY version) FILTER (WHERE NOT stored) AS ghosts
    FROM delivered
    GROUP BY stream_id
), claimed AS (
    INSERT INTO checkpoints AS c (projection, stream_id, version, previous_version)
    SELECT $1, t.stream_id, t.version, -1
    FROM targets AS t
    ORDER BY t.stream_id
    ON CONFLICT (projection, stream_id) DO UPDATE
        SET previous_version = c.version,
            version = CASE WHEN c.halted_version IS NULL THEN greatest(c.version, EXCLUDED.version)
                           ELSE c.version END,
            updated_at = clock_timestamp()
    RETURNING c.stream_id, c.previous_version, c.version, c.halted_version
)
SELECT c.stream_id, c.previous_version, c.version, c.halted_version, t.ghosts,
       CASE WHEN $5::text[] IS NOT NULL THEN ARRAY(
           SELECT e.version FROM events AS e
           WHERE e.stream_id = c.stream_id AND e.version > c.previous_version AND e.version <= c.version
             AND split_part(e.event_type, '.v', 1) = ANY($5::text[])
           ORDER BY e.version) END AS handled
FROM claimed AS c
JOIN targets AS t USING (stream_id);

-- name: halt_streams
-- Stop streams at a parked event: the checkpoint stays just before it (claimed rows, locked).
UPDATE checkpoints AS c SET version = h.version - 1, halted_version = h.version
FROM unnest($2::text[], $3::bigint[]) AS h(stream_id, version)
WHERE c.projection = $1 AND c.stream_id = h.stream_id;

-- name: count_applied
-- Add a batch's applied events to the projection's count; last statement before commit, so workers of one
-- projection hold this row only for an instant.
INSERT INTO projection_status AS s (projection, applied) VALUES ($1, $2)
ON CONFLICT (projection) DO UPDATE SET applied = s.applied + EXCLUDED.applied, updated_at = clock_timestamp();

-- name: count_applied_many
-- count_applied for several projections at once ($1 text[], $2 bigint[]; a worker group's combined batch), in
-- the order given (callers sort them by name: rows locked in one order).
INSERT INTO projection_status AS s (projection, applied)
SELECT p, n FROM unnest($1::text[], $2::bigint[]) AS u(p, n)
ON CONFLICT (projection) DO UPDATE SET applied = s.applied + EXCLUDED.applied, updated_at = clock_timestamp();

-- name: insert_dead_letter
-- Park an event whose handler kept failing ('parked': its stream halts; 'skipped': the stream moved on).
INSERT INTO dead_letters (projection, stream_id, version, global_position, event_id, event_type, error,
                          traceback, attempts, status)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
RETURNING id;

-- name: record_ghosts
-- Delivered events the store does not hold (claim_checkpoints' ghosts), recorded as resolved dead letters: the
-- stream went on without them. Once per projection and event id, however often the message is redelivered.
INSERT INTO dead_letters (projection, stream_id, version, global_position, event_id, event_type, error, status)
SELECT $1, g.stream_id, g.version, g.global_position, g.event_id, g.event_type, $6, 'skipped'
FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::uuid[], $7::text[])
    AS g(stream_id, version, global_position, event_id, event_type)
WHERE NOT EXISTS (SELECT 1 FROM dead_letters AS d WHERE d.projection = $1 AND d.event_id = g.event_id);
