-- Named queries of workers.projector.catchup.

-- name: projection_state
-- A projection's state row, if it has one (a backfill or rebuild fills one that is not live).
SELECT state FROM projection_status WHERE projection = $1;
