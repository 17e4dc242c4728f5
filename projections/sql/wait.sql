-- Named queries of projections.wait (read-after-write).

-- name: checkpoint_version
-- How far a projection has applied one stream (NULL: nothing yet).
SELECT version FROM checkpoints WHERE projection = $1 AND stream_id = $2;
