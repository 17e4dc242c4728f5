-- Named queries of projections.wait (read-after-write). Tables are written {schema}.name and bound to the
-- caller's schema (store.queries.bind): wait_for takes any asyncpg pool, whatever its search_path.

-- name: checkpoint_version
-- How far a projection has applied one stream (NULL: nothing yet).
SELECT version FROM {schema}.checkpoints WHERE projection = $1 AND stream_id = $2;
