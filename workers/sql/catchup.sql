-- Catch-up from the store: one worker process per projection at a time reads its backlog with read_all.

-- name: try_lock_catchup
-- Held for the whole catch-up on the connection that reads; released explicitly, or when that session ends.
SELECT pg_try_advisory_lock(hashtextextended($1, 0));

-- name: unlock_catchup
SELECT pg_advisory_unlock(hashtextextended($1, 0));

-- name: catchup_start
-- A projection's state and low watermark (every event at or before it is settled: see workers/sql/lag.sql).
SELECT state, watermark_txid, watermark_position FROM projection_status WHERE projection = $1;
