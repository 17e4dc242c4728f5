-- Per-stream checkpoints of projections: locked, checked and moved in the batch's own transaction.

-- name: lock_projection_shared
-- First statement of every batch: share the projection's lock; a rebuild takes it exclusively to swap tables.
SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 0));

-- name: lock_checkpoints
-- Get-or-create the checkpoint rows of the batch's streams and lock them in stream_id order, so concurrent
-- workers queue in one order and never deadlock. The no-op DO UPDATE takes the row lock and makes
-- RETURNING see the latest committed row, also after waiting for another worker's batch.
INSERT INTO checkpoints AS c (projection, stream_id, version)
SELECT $1, s.stream_id, -1 FROM unnest($2::text[]) AS s(stream_id) ORDER BY s.stream_id
ON CONFLICT (projection, stream_id) DO UPDATE SET version = c.version
RETURNING c.stream_id, c.version, c.halted_version;

-- name: load_ranges
-- Events of several streams, each from first to last version inclusive, in stream and version order (gaps).
SELECT e.global_position, e.event_id, e.stream_id, e.version, e.event_type, e.data, e.metadata,
       e.recorded_at, e.transaction_id
FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS r(stream_id, first_version, last_version)
JOIN events AS e ON e.stream_id = r.stream_id AND e.version BETWEEN r.first_version AND r.last_version
ORDER BY e.stream_id, e.version;

-- name: advance_checkpoints
-- Move the (locked) checkpoints of the batch's streams and add the applied events to the projection's
-- count. The count's row is touched last, right before commit, so workers hold it only briefly.
WITH moved AS (
    UPDATE checkpoints AS c
    SET version = m.version, halted_version = m.halted_version, updated_at = clock_timestamp()
    FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS m(stream_id, version, halted_version)
    WHERE c.projection = $1 AND c.stream_id = m.stream_id
    RETURNING 1
)
INSERT INTO projection_status AS s (projection, applied)
SELECT $1, $5::bigint WHERE $5::bigint > 0
ON CONFLICT (projection) DO UPDATE SET applied = s.applied + EXCLUDED.applied, updated_at = clock_timestamp();

-- name: insert_dead_letter
-- Park an event whose handler kept failing ('parked': its stream halts; 'skipped': the stream moved on).
INSERT INTO dead_letters (projection, stream_id, version, global_position, event_id, event_type, error,
                          traceback, attempts, status)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
RETURNING id;
