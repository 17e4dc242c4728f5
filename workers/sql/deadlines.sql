-- Firing reactors' deadlines (workers/projector/deadlines.py). Unqualified: the deployment's schema.

-- name: due
-- Up to $3 deadlines of reactor $1 in partition $2 that are due, oldest due first; locked, and skipped when
-- another transaction holds them (a worker that just lost the partition and is finishing its batch).
SELECT key, due_at, payload, deadline_id, correlation_id, scheduled_by,
       extract(epoch FROM clock_timestamp() - due_at)::float8 AS lateness_seconds
FROM deadlines
WHERE reactor = $1 AND partition = $2 AND due_at <= clock_timestamp()
ORDER BY due_at, key
LIMIT $3
FOR UPDATE SKIP LOCKED;

-- name: fired
-- The deadline fired: gone, in the transaction of its handler's effects.
DELETE FROM deadlines WHERE reactor = $1 AND key = $2 AND deadline_id = $3;

-- name: next_due
-- Seconds until the partition's next deadline is due (NULL: none pending), and reactor $1's pending deadlines.
SELECT (SELECT extract(epoch FROM min(due_at) - clock_timestamp())::float8
        FROM deadlines WHERE reactor = $1 AND partition = $2) AS next_due,
       (SELECT count(*) FROM deadlines WHERE reactor = $1) AS pending;

-- name: park
-- A deadline whose handler kept failing, kept as a dead letter (its payload as the body) and deleted.
WITH gone AS (
    DELETE FROM deadlines WHERE reactor = $1 AND key = $2 AND deadline_id = $3 RETURNING payload
)
INSERT INTO dead_letters (projection, stream_id, event_id, event_type, error, traceback, attempts, body, status)
SELECT $1, 'deadline:' || $2, $3, 'deadline', $4, $5, $6, payload, $7 FROM gone;

-- name: fired_all
-- A transaction's deadlines fired as one piece: gone with their handlers' effects.
DELETE FROM deadlines AS d USING unnest($2::text[], $3::uuid[]) AS u(key, deadline_id)
WHERE d.reactor = $1 AND d.key = u.key AND d.deadline_id = u.deadline_id;

-- name: count_fired
-- Add a transaction's fired deadlines to the reactor's count (status shows it); last statement before commit.
INSERT INTO projection_status AS s (projection, deadlines_fired) VALUES ($1, $2)
ON CONFLICT (projection) DO UPDATE SET deadlines_fired = s.deadlines_fired + EXCLUDED.deadlines_fired;
