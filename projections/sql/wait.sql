-- Named queries of projections.wait (read-after-write). Tables are written {schema}.name and bound to the
-- caller's schema (store.queries.bind): wait_for takes any asyncpg pool, whatever its search_path.

-- name: checkpoint_version
-- How far a projection has applied one stream, and the version it is halted at (no row: nothing yet).
SELECT version, halted_version FROM {schema}.checkpoints WHERE projection = $1 AND stream_id = $2;

-- name: settled_of
-- For a read model that handles the event names $4 only: whether the store holds version $3 of the stream and no
-- event of those names lies between the read model's checkpoint (-1 without one) and it. Its checkpoint stops at
-- the last event it handles, so an awaited version of another type is settled once everything of its types up
-- to it is applied (a halted stream's parked event is one of its types above the checkpoint: never settled).
WITH c AS (
    SELECT coalesce((SELECT version FROM {schema}.checkpoints WHERE projection = $1 AND stream_id = $2), -1) AS version
)
SELECT EXISTS (SELECT 1 FROM {schema}.events WHERE stream_id = $2 AND version = $3)
       AND NOT EXISTS (SELECT 1 FROM {schema}.events AS e, c
                       WHERE e.stream_id = $2 AND e.version > c.version AND e.version <= $3
                         AND split_part(e.event_type, '.v', 1) = ANY($4::text[]));

-- name: projections
-- The deployment's projections and reactors (migrate gives each a status row), by name.
SELECT projection FROM {schema}.projection_status ORDER BY projection;

-- name: halting_dead_letter
-- The parked dead letter a stream of a projection is halted at (its version), if any.
SELECT id, error FROM {schema}.dead_letters
WHERE projection = $1 AND stream_id = $2 AND version = $3 AND status = 'parked'
ORDER BY id DESC LIMIT 1;

-- name: recorded_types
-- The event names a read model's checkpoints move over the others of (read_model_types; NULL: every event).
SELECT handled FROM {schema}.read_model_types WHERE projection = $1;
