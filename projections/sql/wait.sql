-- Named queries of projections.wait (read-after-write). Tables are written {schema}.name and bound to the
-- caller's schema (store.queries.bind): wait_for takes any asyncpg pool, whatever its search_path.

-- name: checkpoint_version
-- How far a projection has applied one stream, and the version it is halted at (no row: nothing yet).
SELECT version, halted_version FROM {schema}.checkpoints WHERE projection = $1 AND stream_id = $2;

-- name: projections
-- The deployment's projections and reactors (migrate gives each a status row), by name.
SELECT projection FROM {schema}.projection_status ORDER BY projection;

-- name: halting_dead_letter
-- The parked dead letter a stream of a projection is halted at (its version), if any.
SELECT id, error FROM {schema}.dead_letters
WHERE projection = $1 AND stream_id = $2 AND version = $3 AND status = 'parked'
ORDER BY id DESC LIMIT 1;
