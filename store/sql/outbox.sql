-- Named queries of the outbox relay. Unqualified names resolve in the deployment's schema.

-- name: claim
-- Lock the oldest unclaimed outbox rows (rows another relay holds are skipped, not waited for) and
-- return their events in position order. Locks only the outbox rows: events rows are immutable.
SELECT e.global_position, e.event_id, e.stream_id, e.version, e.event_type, e.data, e.metadata,
       e.recorded_at, e.transaction_id
FROM outbox AS o
JOIN events AS e ON e.global_position = o.global_position
ORDER BY o.global_position
LIMIT $1
FOR UPDATE OF o SKIP LOCKED;

-- name: delete
-- Forget published rows; runs in the claiming transaction, after the broker confirmed every message.
DELETE FROM outbox WHERE global_position = ANY($1::bigint[]);

-- name: pending
-- How many rows wait to be published and the age in seconds of the oldest (0 when none).
-- One scan of the outbox, which the relay keeps short; run every few seconds, not per batch.
SELECT count(*) AS pending,
       coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8 AS oldest_age_seconds
FROM outbox;
