-- Projection bookkeeping: per-stream checkpoints, per-projection status and parked failures.

CREATE TABLE checkpoints (
    projection text        NOT NULL,
    stream_id  text        NOT NULL,
    version    bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT checkpoints_pkey PRIMARY KEY (projection, stream_id)
);

CREATE TABLE projection_status (
    projection        text        NOT NULL,
    state             text        NOT NULL DEFAULT 'live',
    applied           bigint      NOT NULL DEFAULT 0,
    -- Low watermark in read_all order: every event at or before it is applied (or parked and skipped).
    watermark_txid    xid8        NOT NULL DEFAULT '0',
    watermark_position bigint     NOT NULL DEFAULT 0,
    updated_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT projection_status_pkey PRIMARY KEY (projection),
    CONSTRAINT projection_status_state_check CHECK (state IN ('live', 'rebuilding', 'backfilling'))
);

CREATE TABLE dead_letters (
    id              bigint GENERATED ALWAYS AS IDENTITY,
    projection      text        NOT NULL,
    stream_id       text,
    version         bigint,
    global_position bigint,
    event_id        uuid,
    event_type      text,
    error           text        NOT NULL,
    traceback       text        NOT NULL DEFAULT '',
    attempts        integer     NOT NULL DEFAULT 1,
    -- The raw message for undecodable input, so nothing received is ever thrown away.
    body            bytea,
    status          text        NOT NULL DEFAULT 'parked',
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    resolved_at     timestamptz,
    CONSTRAINT dead_letters_pkey PRIMARY KEY (id),
    CONSTRAINT dead_letters_status_check CHECK (status IN ('parked', 'retried', 'skipped'))
);

CREATE INDEX dead_letters_parked_idx ON dead_letters (projection, stream_id) WHERE status = 'parked';
