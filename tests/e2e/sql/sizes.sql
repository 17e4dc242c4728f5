-- The event sizes: a test-only read model with one row per applied event and the size of its data.

-- name: ddl
CREATE TABLE IF NOT EXISTS event_sizes (
    stream_id text    NOT NULL,
    version   bigint  NOT NULL,
    bytes     integer NOT NULL,
    CONSTRAINT event_sizes_pkey PRIMARY KEY (stream_id, version)
);

-- name: record
-- One applied event: its stream ($1), version ($2) and data's size ($3).
INSERT INTO event_sizes (stream_id, version, bytes) VALUES ($1, $2, $3);

-- name: totals
SELECT count(*) AS events, coalesce(sum(bytes), 0) AS bytes FROM event_sizes;
