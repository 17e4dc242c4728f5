-- Leased ownership of partitions: worker processes register here with a heartbeat and lease the partitions
-- of the projections they run (workers/projector/leases.py). Exactly-once never depends on these rows (the
-- per-stream checkpoints in each apply transaction decide); they only keep one live consumer per partition.

CREATE TABLE workers (
    worker_id    text        NOT NULL,
    projections  text[]      NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    heartbeat_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at   timestamptz NOT NULL,
    CONSTRAINT workers_pkey PRIMARY KEY (worker_id)
);

CREATE TABLE leases (
    projection  text        NOT NULL,
    partition   integer     NOT NULL,
    owner       text,       -- a worker_id; NULL once released
    expires_at  timestamptz NOT NULL DEFAULT '-infinity',
    acquired_at timestamptz,
    -- Counts owner changes: a handover is visible as a new generation.
    generation  bigint      NOT NULL DEFAULT 0,
    CONSTRAINT leases_pkey PRIMARY KEY (projection, partition)
);

CREATE INDEX leases_owner_idx ON leases (owner);
