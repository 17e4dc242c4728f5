-- Parked failures: listing and showing them, re-driving and skipping their streams.

-- name: insert_undecodable
-- Keep messages that could not be decoded at all, raw, so nothing received is ever thrown away.
INSERT INTO dead_letters (projection, error, body, attempts)
SELECT $1, u.error, u.body, 1 FROM unnest($2::text[], $3::bytea[]) AS u(error, body)
RETURNING id;

-- name: list_parked
-- Parked failures, oldest first, optionally of one projection.
SELECT id, projection, stream_id, version, event_type, attempts, error, created_at, body IS NOT NULL AS undecodable
FROM dead_letters
WHERE status = 'parked' AND ($1::text IS NULL OR projection = $1)
ORDER BY id;

-- name: get_dead_letter
-- One dead letter in full, whatever its status; the raw message only by its size.
SELECT id, projection, stream_id, version, event_type, event_id, global_position, status, attempts, error,
       traceback, created_at, resolved_at, octet_length(body) AS body_bytes
FROM dead_letters
WHERE id = $1;

-- name: lock_dead_letter
-- The dead letter to re-drive, locked so two retries of it do not race.
SELECT id, projection, stream_id, version, status, body FROM dead_letters WHERE id = $1 FOR UPDATE;

-- name: lock_stream_checkpoint
-- Get-or-create and lock one stream's checkpoint row.
INSERT INTO checkpoints AS c (projection, stream_id, version) VALUES ($1, $2, -1)
ON CONFLICT (projection, stream_id) DO UPDATE SET version = c.version
RETURNING c.version, c.halted_version;

-- name: release_stream
-- Move a re-driven stream's checkpoint to the last applied version, release it, count the applied events.
WITH released AS (
    UPDATE checkpoints SET version = $3, halted_version = NULL, updated_at = clock_timestamp()
    WHERE projection = $1 AND stream_id = $2
    RETURNING 1
)
INSERT INTO projection_status AS s (projection, applied)
SELECT $1, $4::bigint WHERE $4::bigint > 0
ON CONFLICT (projection) DO UPDATE SET applied = s.applied + EXCLUDED.applied, updated_at = clock_timestamp();

-- name: resolve_dead_letter
-- Mark a dead letter re-driven; for undecodable ones, remember which stream the message turned out to be.
UPDATE dead_letters
SET status = 'retried', resolved_at = clock_timestamp(),
    stream_id = coalesce(stream_id, $2), version = coalesce(version, $3)
WHERE id = $1;

-- name: skip_dead_letter
-- Mark a parked dead letter skipped by an operator: its stream moved past it without applying it.
UPDATE dead_letters SET status = 'skipped', resolved_at = clock_timestamp() WHERE id = $1;

-- name: count_failed_retry
-- A retry that failed again: one more attempt, the newest error.
UPDATE dead_letters SET attempts = attempts + 1, error = $2, traceback = $3 WHERE id = $1;
