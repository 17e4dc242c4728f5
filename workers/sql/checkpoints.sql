-- Per-stream checkpoints of projections: locked, checked and moved in the batch's own transaction.

-- name: claim_checkpoints
-- Lock the batch's checkpoint rows in stream_id order, so concurrent workers queue in one order and never
-- deadlock, and move each to the newest version the batch delivered (unless halted or already past it).
-- The row lock is taken on the latest committed row, also after waiting for another worker's batch, and
-- previous_version records where it was: the caller applies (previous_version, version] in this same
-- transaction, or rolls all of it back.
INSERT INTO checkpoints AS c (projection, stream_id, version, previous_version)
SELECT $1, u.stream_id, u.version, -1
FROM unnest($2::text[], $3::bigint[]) AS u(stream_id, version)
ORDER BY u.stream_id
ON CONFLICT (projection, stream_id) DO UPDATE
    SET previous_version = c.version,
        version = CASE WHEN c.halted_version IS NULL THEN greatest(c.version, EXCLUDED.version)
                       ELSE c.version END,
        updated_at = clock_timestamp()
RETURNING c.stream_id, c.previous_version, c.version, c.halted_version;

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

-- name: insert_dead_letter
-- Park an event whose handler kept failing ('parked': its stream halts; 'skipped': the stream moved on).
INSERT INTO dead_letters (projection, stream_id, version, global_position, event_id, event_type, error,
                          traceback, attempts, status)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
RETURNING id;
