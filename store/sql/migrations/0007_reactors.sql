-- Reactors (projections/reactor.py): workers that act. Their follow-up events go to the store's own tables;
-- these hold what they scheduled and what the domain refused them.

-- A reactor's pending deadlines, one per (reactor, key): scheduling a key again moves it. Fired (and deleted)
-- in one transaction with the reactor's deadline handler by the worker holding the partition of the key.
CREATE TABLE deadlines (
    reactor        text        NOT NULL,
    key            text        NOT NULL,
    partition      integer     NOT NULL,
    due_at         timestamptz NOT NULL,
    -- Derived from the scheduling event and the key: the cause of the deadline handler's follow-ups.
    deadline_id    uuid        NOT NULL,
    payload        bytea       NOT NULL,
    correlation_id text,
    scheduled_by   uuid,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT deadlines_pkey PRIMARY KEY (reactor, key)
);

CREATE INDEX deadlines_due_idx ON deadlines (reactor, partition, due_at);

-- Commands the domain refused a reactor (an outcome, not a failure: the reactor moved on).
CREATE TABLE reactor_refusals (
    id         bigint GENERATED ALWAYS AS IDENTITY,
    reactor    text        NOT NULL,
    cause_id   uuid        NOT NULL,
    stream_id  text        NOT NULL,
    error      text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT reactor_refusals_pkey PRIMARY KEY (id),
    CONSTRAINT reactor_refusals_cause_key UNIQUE (reactor, cause_id, stream_id)
);
