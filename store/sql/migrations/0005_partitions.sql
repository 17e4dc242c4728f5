-- Partitions: every stream belongs to one of P partitions, by a stable hash of its id. P is fixed when the
-- schema is first migrated (store.migrate records it here) and every event carries its partition, so one
-- partition's backlog is one index range. store/partitions.py computes the same function in Python.

CREATE TABLE partitioning (
    singleton     boolean     NOT NULL DEFAULT true,
    partitions    integer     NOT NULL,
    configured_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT partitioning_pkey PRIMARY KEY (singleton),
    CONSTRAINT partitioning_singleton_check CHECK (singleton),
    CONSTRAINT partitioning_partitions_check CHECK (partitions BETWEEN 1 AND 4096)
);

-- The first 32 bits of the md5 of the id's UTF-8 bytes, as an unsigned integer, modulo P.
CREATE FUNCTION stream_partition(stream_id text, partitions integer) RETURNS integer
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT (('x' || substr(md5(stream_id), 1, 8))::bit(32)::bigint % partitions)::integer $$;

-- NULL only for events written before this migration, until store.migrate has filled them in (in batches,
-- while writers go on). The index that reads one partition in read_all order is made after that, concurrently.
ALTER TABLE events ADD COLUMN partition integer;

-- Events stay immutable; the one change allowed is filling the partition of an event that has none.
CREATE OR REPLACE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF OLD.partition IS NULL AND NEW.partition IS NOT NULL
           AND (NEW.global_position, NEW.event_id, NEW.stream_id, NEW.version, NEW.event_type, NEW.data,
                NEW.metadata, NEW.recorded_at, NEW.transaction_id)
               IS NOT DISTINCT FROM
               (OLD.global_position, OLD.event_id, OLD.stream_id, OLD.version, OLD.event_type, OLD.data,
                OLD.metadata, OLD.recorded_at, OLD.transaction_id) THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION 'events are immutable: % refused on %', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END;
$$;
