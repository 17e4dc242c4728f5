-- Named queries of workers.rebuild.backfill: projections first seen, registered and claimed.

-- name: projection_state
-- A projection's state row, if it has one.
SELECT state FROM projection_status WHERE projection = $1;

-- name: register_projections
-- Projections first seen: over a non-empty store they must be backfilled before they are live; reactors ($2)
-- are live at once (their effects go to the store: they work the history off through their queues and catch-up).
INSERT INTO projection_status (projection, state)
SELECT p, CASE WHEN p <> ALL($2::text[]) AND EXISTS (SELECT 1 FROM events) THEN 'backfilling' ELSE 'live' END
FROM unnest($1::text[]) AS p
ON CONFLICT (projection) DO NOTHING
RETURNING projection, state;
