-- Per-stream checkpoints of projections: locked, checked and moved in the batch's own transaction.

-- name: claim_checkpoints
-- The claim of checkpoint rows of one batch, or of a worker group's combined batch, after the locks $1 (text[],
-- taken shared in the order given): the function claim_checkpoints (store/sql/migrations/0015_claim_checkpoints.sql
-- says what it does, and why it is a function). $2-$5 one row per delivered event and read model (read model,
-- stream, version, event id), $6-$7 (read model, name) pairs of the read models that handle some names only.
SELECT projection, stream_id, previous_version, version, halted_version, ghosts, handled
FROM claim_checkpoints($1::text[], $2::text[], $3::text[], $4::bigint[], $5::uuid[], $6::text[], $7::text[]);

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
