-- Publications: republish (a publication's checkpoints and watermark moved back to a position).

-- name: republish_checkpoints
-- Move publication $1's checkpoint of every stream with an event at or after global position $2 back to just
-- before the first such event (never forward); the streams moved and the events they will publish again.
WITH first AS (
    SELECT stream_id, min(version) AS version FROM events WHERE global_position >= $2 GROUP BY stream_id
), target AS (
    SELECT c.stream_id, c.version AS old_version, f.version - 1 AS new_version
    FROM first AS f
    JOIN checkpoints AS c ON c.projection = $1 AND c.stream_id = f.stream_id
    WHERE c.version >= f.version
), moved AS (
    UPDATE checkpoints AS c SET version = t.new_version, updated_at = clock_timestamp()
    FROM target AS t
    WHERE c.projection = $1 AND c.stream_id = t.stream_id
    RETURNING t.old_version - t.new_version AS events
)
SELECT count(*) AS streams, coalesce(sum(events), 0)::bigint AS events FROM moved;

-- name: republish_watermark
-- Move publication $1's low watermark back to just before the first event (in read_all order) at or after
-- global position $2, unless it is there already: the lag monitor counts, and catch-up reads, from there.
UPDATE projection_status AS s
SET watermark_txid = f.transaction_id, watermark_position = f.global_position - 1, updated_at = clock_timestamp()
FROM (SELECT transaction_id, global_position FROM events WHERE global_position >= $2
      ORDER BY transaction_id, global_position LIMIT 1) AS f
WHERE s.projection = $1
  AND (s.watermark_txid, s.watermark_position) > (f.transaction_id, f.global_position - 1);
