-- Closing and archiving streams (store/archive.py). A closed stream takes no more events: its last event is
-- StreamClosed, and a row here makes every later insert into it fail (SQLSTATE EF001, errors.StreamIsClosed),
-- whichever path appends. Archiving a closed stream moves its events to events_archive in one transaction
-- that first writes its archive_log row; the events trigger lets a DELETE through only in that transaction.
-- The closed_streams row stays for good: it is the stream's tombstone (its end, so stream_version still
-- answers it and appends are still refused).

CREATE TABLE closed_streams (
    stream_id text        NOT NULL,
    version   bigint      NOT NULL,  -- the StreamClosed event's version: the stream's last
    closed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT closed_streams_pkey PRIMARY KEY (stream_id)
);

-- One row per archived stream: who, when, why and what moved. Written before the events move, in the same
-- transaction (transaction_id: the trigger below checks it), so no event leaves the live table unaudited.
CREATE TABLE archive_log (
    archive_id     bigint      GENERATED ALWAYS AS IDENTITY,
    stream_id      text        NOT NULL,
    archived_by    text        NOT NULL,
    reason         text        NOT NULL,
    archived_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    events         bigint      NOT NULL,
    first_position bigint      NOT NULL,
    last_position  bigint      NOT NULL,
    last_version   bigint      NOT NULL,
    transaction_id xid8        NOT NULL DEFAULT pg_current_xact_id(),
    CONSTRAINT archive_log_pkey PRIMARY KEY (archive_id),
    CONSTRAINT archive_log_stream_id_key UNIQUE (stream_id)
);

-- The events table's columns, as they were, and the archival that moved them.
CREATE TABLE events_archive (
    global_position bigint      NOT NULL,
    event_id        uuid        NOT NULL,
    stream_id       text        NOT NULL,
    version         bigint      NOT NULL,
    event_type      text        NOT NULL,
    data            bytea       NOT NULL,
    metadata        bytea       NOT NULL,
    recorded_at     timestamptz NOT NULL,
    transaction_id  xid8        NOT NULL,
    partition       integer,
    archive_id      bigint      NOT NULL,
    CONSTRAINT events_archive_pkey PRIMARY KEY (global_position),
    CONSTRAINT events_archive_stream_version_key UNIQUE (stream_id, version),
    CONSTRAINT events_archive_archive_id_fkey FOREIGN KEY (archive_id) REFERENCES archive_log (archive_id)
);

-- Events stay immutable. Two changes are allowed: filling the partition of an event that has none (0005),
-- and deleting a closed stream's events in the transaction that logged its archival (the rows it deletes
-- are inserted into events_archive by the same statement). The archive itself is immutable.
CREATE OR REPLACE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'events' THEN
        IF OLD.partition IS NULL AND NEW.partition IS NOT NULL
           AND (NEW.global_position, NEW.event_id, NEW.stream_id, NEW.version, NEW.event_type, NEW.data,
                NEW.metadata, NEW.recorded_at, NEW.transaction_id)
               IS NOT DISTINCT FROM
               (OLD.global_position, OLD.event_id, OLD.stream_id, OLD.version, OLD.event_type, OLD.data,
                OLD.metadata, OLD.recorded_at, OLD.transaction_id) THEN
            RETURN NEW;
        END IF;
    END IF;
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'events'
       AND EXISTS (SELECT 1 FROM closed_streams AS c WHERE c.stream_id = OLD.stream_id)
       AND EXISTS (SELECT 1 FROM archive_log AS a
                   WHERE a.stream_id = OLD.stream_id AND a.transaction_id = pg_current_xact_id()) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'events are immutable: % refused on %', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END;
$$;

CREATE TRIGGER events_archive_immutable_rows BEFORE UPDATE OR DELETE ON events_archive
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();
CREATE TRIGGER events_archive_immutable_table BEFORE TRUNCATE ON events_archive
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- Appends to a closed stream fail, whatever path inserts (the store's three append statements, a reactor's
-- follow-up, plain SQL). Once per statement, over the rows it inserted: a row trigger (a primary-key probe of
-- closed_streams per event) cost single appends 8% and batches 15% of their rate; while no stream is closed
-- this one costs one look at an empty table per statement.
CREATE FUNCTION events_refuse_closed() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    closed text;
BEGIN
    IF EXISTS (SELECT 1 FROM closed_streams) THEN
        SELECT i.stream_id INTO closed FROM inserted AS i JOIN closed_streams AS c USING (stream_id) LIMIT 1;
        IF closed IS NOT NULL THEN
            RAISE EXCEPTION 'stream % is closed: it takes no more events', quote_literal(closed)
                USING ERRCODE = 'EF001', DETAIL = closed;
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_refuse_closed AFTER INSERT ON events REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_closed();
