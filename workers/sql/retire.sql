-- The statements of `eventfleet retire NAME` (workers/admin/retire.py): a read model removed from the code, its
-- bookkeeping deleted. {schema}, {table} stand for names retire.py validated with store.names and double-quoted.

-- name: known
-- What the deployment keeps of read model $1: its status row, checkpoints, recorded types (with its tables),
-- parked and resolved dead letters, deadlines and refusals (a reactor's), leases.
SELECT EXISTS (SELECT 1 FROM projection_status WHERE projection = $1) AS status,
       (SELECT count(*) FROM checkpoints WHERE projection = $1) AS checkpoints,
       (SELECT tables FROM read_model_types WHERE projection = $1) AS tables,
       (SELECT count(*) FROM dead_letters WHERE projection = $1) AS dead_letters,
       (SELECT count(*) FROM deadlines WHERE reactor = $1) AS deadlines,
       (SELECT count(*) FROM reactor_refusals WHERE reactor = $1) AS refusals,
       (SELECT count(*) FROM leases WHERE projection = $1) AS leases;

-- name: running
-- The workers that run read model $1 now: registered and unexpired, or said so within $2 seconds.
SELECT worker_id FROM workers WHERE $1 = ANY(projections) AND expires_at > clock_timestamp()
UNION
SELECT worker_id FROM read_model_workers
WHERE projection = $1 AND seen_at > clock_timestamp() - make_interval(secs => $2)
ORDER BY worker_id;

-- name: other_tables
-- The tables other read models record as theirs (never dropped with this one).
SELECT DISTINCT unnest(tables) AS table_name FROM read_model_types WHERE projection <> $1;

-- name: table_exists
SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = $2);

-- name: forget
-- Everything of read model $1 in the deployment's bookkeeping tables.
WITH c AS (DELETE FROM checkpoints WHERE projection = $1),
     s AS (DELETE FROM projection_status WHERE projection = $1),
     d AS (DELETE FROM dead_letters WHERE projection = $1),
     l AS (DELETE FROM leases WHERE projection = $1),
     t AS (DELETE FROM read_model_types WHERE projection = $1),
     w AS (DELETE FROM read_model_workers WHERE projection = $1),
     dl AS (DELETE FROM deadlines WHERE reactor = $1),
     r AS (DELETE FROM reactor_refusals WHERE reactor = $1)
SELECT 1;

-- name: lock_timeout
SET LOCAL lock_timeout = '10s';

-- name: drop_table
DROP TABLE IF EXISTS {schema}.{table};

-- name: drop_schema
DROP SCHEMA IF EXISTS {schema} CASCADE;

-- name: shadows
-- Of the names $1 (the read model's rebuild shadow and verify scratch schemas), those that exist and are not a
-- deployment themselves.
SELECT n.nspname AS name FROM pg_namespace AS n
WHERE n.nspname = ANY($1::text[])
  AND NOT EXISTS (SELECT 1 FROM pg_class AS c WHERE c.relnamespace = n.oid AND c.relname = 'schema_migrations')
ORDER BY n.nspname;
