-- The statements of `eventfleet teardown` (workers/admin/teardown.py). {schema} and {role} stand for
-- names that teardown.py validated with store.names and double-quoted; no value is formatted into them.

-- name: deployment
-- Whether the schema exists, and whether it is an eventfleet deployment (migrate creates schema_migrations).
SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1) AS present,
       EXISTS (SELECT 1 FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
               WHERE n.nspname = $1 AND c.relname = 'schema_migrations') AS migrated;

-- name: status_projections
-- The projections the deployment keeps a status row for (some may no longer be registered in this code).
SELECT projection FROM {schema}.projection_status ORDER BY projection;

-- name: shadow_candidates
-- Schemas that may be shadows of the deployment: the names $1 (its projections' shadow names, hashed ones
-- included) and every name that starts like an unhashed one ($2: "<schema>_rb_", $3: "<schema>_vf_"). For
-- each: whether it is a deployment itself, and whether it has a rebuild cursor that names its projection.
SELECT n.nspname AS name,
       EXISTS (SELECT 1 FROM pg_class AS c WHERE c.relnamespace = n.oid AND c.relname = 'schema_migrations')
           AS is_deployment,
       EXISTS (SELECT 1 FROM pg_class AS c WHERE c.relnamespace = n.oid AND c.relname = 'rebuild_cursor'
                                            AND c.relkind = 'r') AS has_cursor
FROM pg_namespace AS n
WHERE n.nspname = ANY($1::text[]) OR starts_with(n.nspname, $2) OR starts_with(n.nspname, $3)
ORDER BY n.nspname;

-- name: cursor_projections
-- The projection(s) a shadow's rebuild cursor was started for.
SELECT projection FROM {schema}.rebuild_cursor;

-- name: lock_timeout
-- Fail rather than queue behind a long reader: a waiting DROP blocks every later reader of the tables.
SET LOCAL lock_timeout = '10s';

-- name: drop_schema
DROP SCHEMA IF EXISTS {schema} CASCADE;

-- name: drop_role
DROP ROLE IF EXISTS {role};

-- name: partitions
-- P of the deployment: its partition queues are torn down with it.
SELECT partitions FROM partitioning;

-- name: live_workers
-- Workers whose heartbeat is not expired: they hold (or are about to take) partitions of the deployment.
SELECT worker_id FROM workers WHERE expires_at > clock_timestamp() ORDER BY worker_id;

-- name: relay_sessions
-- Sessions of relays of the deployment ($1: their application_name, workers/relay/session.py), idle or not.
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1 AND pid <> pg_backend_pid()
ORDER BY pid;

-- name: claimed_outbox_rows
-- Outbox rows claimed right now (a relay's FOR UPDATE SKIP LOCKED batch): those a SKIP LOCKED read cannot
-- lock. One statement, one snapshot; the probe's own locks end with its transaction, at once.
SELECT (SELECT count(*) FROM outbox)
       - (SELECT count(*) FROM (SELECT 1 FROM outbox FOR KEY SHARE SKIP LOCKED) AS free) AS claimed;

