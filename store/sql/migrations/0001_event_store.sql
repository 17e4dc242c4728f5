-- The event store: append-only events, the transactional outbox and snapshots.
-- Runs with search_path set to the deployment's schema; every name is unqualified.

CREATE TABLE events (
    global_position bigint GENERATED ALWAYS AS IDENTITY,
    event_id        uuid        NOT NULL,
    stream_id       text        NOT NULL,
    version         bigint      NOT NULL,
    event_type      text        NOT NULL,
    data            bytea       NOT NULL,
    metadata        bytea       NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The writing transaction's id: readers order by (transaction_id, global_position) and read only
    -- below the oldest running transaction, so a late commit of a small position is never skipped.
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    CONSTRAINT events_pkey PRIMARY KEY (global_position),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, version),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_version_check CHECK (version >= 0)
);

CREATE INDEX events_commit_order_idx ON events (transaction_id, global_position);

CREATE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are immutable: % refused on %', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END;
$$;

CREATE TRIGGER events_immutable_rows BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();
CREATE TRIGGER events_immutable_table BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- One row per event still to be published; the relay deletes it once the broker confirmed it.
CREATE TABLE outbox (
    global_position bigint      NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT outbox_pkey PRIMARY KEY (global_position)
);

-- No NOTIFY trigger here: a notifying transaction takes a cluster-wide lock through its commit, which
-- serializes concurrent appends. EventStore notifies channel "<schema>.outbox" after commit (store/notify.py).

CREATE TABLE snapshots (
    stream_id     text        NOT NULL,
    version       bigint      NOT NULL,
    snapshot_type text        NOT NULL,
    data          bytea       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT snapshots_pkey PRIMARY KEY (stream_id)
);
