-- Catch-up from the store: one worker process per projection at a time reads its backlog with read_all.

-- name: catchup_start
-- A projection's state and low watermark (every event at or before it is settled: see workers/sql/lag.sql).
SELECT state, watermark_txid, watermark_position FROM projection_status WHERE projection = $1;
