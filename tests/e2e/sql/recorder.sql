-- The batch recorder: a test-only read model with one row per applied batch, who applied it and when.

-- name: ddl
CREATE TABLE IF NOT EXISTS batch_recorder (
    id         bigint GENERATED ALWAYS AS IDENTITY,
    partition  integer     NOT NULL,
    pid        integer     NOT NULL,
    events     integer     NOT NULL,
    started_at timestamptz NOT NULL,
    ended_at   timestamptz NOT NULL,
    CONSTRAINT batch_recorder_pkey PRIMARY KEY (id)
);

-- name: record
-- One applied batch: its partitions ($1, one per row), the worker process ($2), its events per partition ($3);
-- from the start of its transaction to now.
INSERT INTO batch_recorder (partition, pid, events, started_at, ended_at)
SELECT p, $2, n, now(), clock_timestamp() FROM unnest($1::integer[], $3::integer[]) AS u(p, n);

-- name: batches
SELECT partition, pid, events, started_at, ended_at FROM batch_recorder ORDER BY partition, started_at;
