-- What a reactor's handler does besides appending (projections/reactor.py), on the connection of the
-- transaction that moves its checkpoint. Unqualified names: the worker's search_path names the schema.

-- name: schedule
-- Schedule (or move) the deadline of key $2.
INSERT INTO deadlines AS d (reactor, key, partition, due_at, deadline_id, payload, correlation_id, scheduled_by)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (reactor, key) DO UPDATE
    SET partition = EXCLUDED.partition, due_at = EXCLUDED.due_at, deadline_id = EXCLUDED.deadline_id,
        payload = EXCLUDED.payload, correlation_id = EXCLUDED.correlation_id, scheduled_by = EXCLUDED.scheduled_by,
        created_at = clock_timestamp();

-- name: cancel
DELETE FROM deadlines WHERE reactor = $1 AND key = $2;

-- name: refused
-- A command the domain refused: recorded once per cause and stream.
INSERT INTO reactor_refusals (reactor, cause_id, stream_id, error) VALUES ($1, $2, $3, $4)
ON CONFLICT (reactor, cause_id, stream_id) DO NOTHING;

-- name: schedule_many
-- A batch's schedules at once (distinct keys).
INSERT INTO deadlines AS d (reactor, key, partition, due_at, deadline_id, payload, correlation_id, scheduled_by)
SELECT $1, u.key, u.partition, u.due_at, u.deadline_id, u.payload, u.correlation_id, u.scheduled_by
FROM unnest($2::text[], $3::integer[], $4::timestamptz[], $5::uuid[], $6::bytea[], $7::text[], $8::uuid[])
    AS u(key, partition, due_at, deadline_id, payload, correlation_id, scheduled_by)
ON CONFLICT (reactor, key) DO UPDATE
    SET partition = EXCLUDED.partition, due_at = EXCLUDED.due_at, deadline_id = EXCLUDED.deadline_id,
        payload = EXCLUDED.payload, correlation_id = EXCLUDED.correlation_id, scheduled_by = EXCLUDED.scheduled_by,
        created_at = clock_timestamp();

-- name: cancel_many
DELETE FROM deadlines WHERE reactor = $1 AND key = ANY($2::text[]);
