-- Least-privilege group roles of one deployment (store/roles.py). The blocks hold identifier
-- placeholders in braces: {schema}, {role}, {table}. roles.py substitutes only identifiers it has
-- validated with store.names and double-quoted; no value is ever formatted into these statements.
-- Every role is NOLOGIN: grant it to a LOGIN role per service (GRANT "<schema>_writer" TO app_writer).
-- A worker that runs reactors logs in as a member of <schema>_reactor, which is a member of <schema>_worker:
-- it has the worker's rights (the read models' too, regranted after a rebuild) and the reactor's own.
-- Not granted on purpose: USAGE on the identity sequences (an identity column needs only INSERT on
-- its table), CREATE on the schema (migrate and rebuild run as the owner), anything on
-- schema_migrations; archive_log and events_archive (archiving is the owner's command). UPDATE, DELETE and
-- TRUNCATE on events are refused to everyone by its triggers (DELETE but in an archival's transaction).

-- name: lock
-- The migrate lock of the schema: roles are granted after, never during, a migration.
SELECT pg_advisory_xact_lock(hashtextextended($1, 0));

-- name: role_exists
-- Whether a role of this name exists (cluster-wide).
SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1);

-- name: create_role
-- A group role: it cannot log in; logins are granted membership.
CREATE ROLE {role} NOLOGIN;

-- name: grant_writer
-- Appends events with their outbox rows, reads streams, keeps snapshots, creates and forgets subject keys.
-- closed_streams: the events trigger refusing appends to a closed stream reads it with the appender's rights.
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT, INSERT ON TABLE {schema}.events TO {role};
GRANT INSERT ON TABLE {schema}.outbox TO {role};
GRANT SELECT, INSERT, UPDATE ON TABLE {schema}.snapshots TO {role};
GRANT SELECT ON TABLE {schema}.partitioning TO {role};
GRANT SELECT, INSERT, UPDATE ON TABLE {schema}.subject_keys TO {role};
GRANT SELECT ON TABLE {schema}.closed_streams TO {role};

-- name: grant_relay
-- Reads the outbox and its events, deletes published rows. Claiming rows FOR UPDATE SKIP LOCKED needs
-- UPDATE on at least one column; created_at is the one whose change would harm nothing.
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT, DELETE ON TABLE {schema}.outbox TO {role};
GRANT UPDATE (created_at) ON TABLE {schema}.outbox TO {role};
GRANT SELECT ON TABLE {schema}.events TO {role};
GRANT SELECT ON TABLE {schema}.partitioning TO {role};

-- name: grant_worker
-- Reads events, P, subject keys and closed streams (a reactor's follow-up passes the closed-stream trigger); writes
-- checkpoints, projection status and dead letters, its registration and leases, and the event types its read
-- models were built with and its code handles (read_model_types, read_model_workers: `status` reads them).
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT ON TABLE {schema}.events, {schema}.partitioning, {schema}.subject_keys, {schema}.closed_streams
    TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {schema}.checkpoints, {schema}.projection_status,
    {schema}.dead_letters, {schema}.workers, {schema}.leases, {schema}.read_model_types,
    {schema}.read_model_workers TO {role};

-- name: grant_reactor
-- A worker running reactors (projections/reactor.py, workers/projector/deadlines.py): the worker's rights
-- through membership, plus appending follow-ups (events with their outbox rows, as the writer), deadlines
-- (scheduled and moved by INSERT .. ON CONFLICT DO UPDATE, taken FOR UPDATE SKIP LOCKED, deleted when
-- fired, cancelled or parked) and refusals (INSERT .. ON CONFLICT DO NOTHING, whose conflict target needs
-- SELECT). No snapshots: a reactor's repository neither reads nor writes them. A follow-up with personal fields
-- of a new subject makes its data key (INSERT on subject_keys; reading them is the worker's).
GRANT {group} TO {role};
GRANT INSERT ON TABLE {schema}.events, {schema}.outbox, {schema}.subject_keys TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {schema}.deadlines TO {role};
GRANT SELECT, INSERT ON TABLE {schema}.reactor_refusals TO {role};

-- name: grant_worker_read_model
-- Writes one read-model table of a registered projection.
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {schema}.{table} TO {role};
