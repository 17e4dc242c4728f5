-- Named queries of the operator commands (status, demo).

-- name: known_projections
-- Projections with a status row (some may no longer be registered in this code).
SELECT projection FROM projection_status ORDER BY projection;

-- name: partitions
-- P of the schema: each projection (or worker group) has one queue per partition, whose depths status sums.
SELECT partitions FROM partitioning;

-- name: projection_summary
-- State, applied count, parked failures and halted streams of one projection (defaults when new).
SELECT coalesce((SELECT state FROM projection_status WHERE projection = $1), 'live') AS state,
       coalesce((SELECT applied FROM projection_status WHERE projection = $1), 0) AS applied,
       (SELECT count(*) FROM dead_letters WHERE projection = $1 AND status = 'parked') AS parked,
       (SELECT count(*) FROM checkpoints WHERE projection = $1 AND halted_version IS NOT NULL) AS halted;

-- name: pipeline_counts
-- From one snapshot: events in the store and those not yet published (an append writes both at once).
SELECT (SELECT count(*) FROM events) AS written,
       (SELECT count(*) FROM outbox) AS pending;

-- name: deadlines_pending
-- Deadlines of every reactor not yet fired or cancelled.
SELECT count(*) FROM deadlines;

-- name: events_named
-- Every event whose type name (without its version) is one of $1, in position order.
SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, transaction_id
FROM events WHERE split_part(event_type, '.', 1) = ANY($1::text[]) ORDER BY global_position;

-- name: refusals
-- Commands reactor $1 was refused.
SELECT count(*) FROM reactor_refusals WHERE reactor = $1;

-- name: reactor_summary
-- Reactor $1's pending deadlines, when the next is due (and in how many seconds: negative when overdue), the
-- deadlines it has fired and the commands it was refused.
SELECT count(d.*) AS pending, min(d.due_at) AS next_due_at,
       extract(epoch FROM min(d.due_at) - clock_timestamp())::float8 AS next_due_seconds,
       coalesce((SELECT deadlines_fired FROM projection_status WHERE projection = $1), 0) AS fired,
       (SELECT count(*) FROM reactor_refusals WHERE reactor = $1) AS refusals
FROM deadlines AS d WHERE d.reactor = $1;
-- name: is_migrated
-- Whether schema $1 holds an eventfleet deployment (migrate creates schema_migrations first).
SELECT EXISTS (SELECT 1 FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
               WHERE n.nspname = $1 AND c.relname = 'schema_migrations');

-- name: projection_groups
-- The worker group of each read model a registered worker of a group runs: the lease names the worker registered
-- (workers.projections: 'group:<name>' for a worker of a group) joined with the read models its code registered
-- (read_model_workers). Several rows for one read model: workers of several groups run it (a move between them).
SELECT DISTINCT r.projection, substr(l.name, 7) AS grp
FROM workers AS w
CROSS JOIN LATERAL unnest(w.projections) AS l(name)
JOIN read_model_workers AS r ON r.worker_id = w.worker_id
WHERE starts_with(l.name, 'group:')
ORDER BY 1, 2;
