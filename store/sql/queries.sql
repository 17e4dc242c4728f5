-- Named queries of the event store. Every table is written {schema}.name: store.queries.bind replaces the
-- marker with the store's validated, quoted schema, once per schema, so no statement depends on the
-- connection's search_path and any asyncpg pool works (EventStore(pool, schema=...)).

-- name: partitions
-- P of the schema, recorded at its first migrate: the store computes each event's partition (store.partitions)
-- and passes it ($7); the same in SQL, a subquery per append, halved the append rate at 8 writers.
-- With it, whether the store's clock is behind its newest stored transaction id (a store restored into another
-- cluster and not migrated since: store/clock.py): one read of the commit-order index's last entry.
SELECT p.partitions,
       coalesce((SELECT max(transaction_id) FROM {schema}.events) >= {schema}.store_xmax(), false) AS clock_behind
FROM {schema}.partitioning AS p;

-- name: clock
-- The newest transaction id the store holds (events, and the projections' watermarks, which name one), the
-- next id the store's clock will hand out, and the clock's shift so far.
SELECT greatest((SELECT max(transaction_id) FROM {schema}.events),
                (SELECT max(watermark_txid) FROM {schema}.projection_status)) AS newest,
       {schema}.store_xmax() AS next,
       (SELECT shift FROM {schema}.transaction_clock) AS shift,
       (SELECT shifted_at FROM {schema}.transaction_clock) AS shifted_at;

-- name: shift_clock
-- Move the store's clock forward by $1 ids (see migration 0009); the newest stored id and the next id as found.
SELECT {schema}.shift_transaction_clock($1::bigint, $2::xid8, $3::xid8);

-- name: append_event
-- Append one event to a stream if the stream is at $2 (-1: no stream), with its outbox row, in one
-- statement. Returns the stream's version before the append and, if it matched, the new position.
-- A NULL event id ($3) means the caller gave none: the database draws it (cheaper than the client).
WITH head AS (
    SELECT coalesce(max(version), -1) AS actual FROM {schema}.events WHERE stream_id = $1
), inserted AS (
    INSERT INTO {schema}.events (event_id, stream_id, version, event_type, data, metadata, partition)
    SELECT coalesce($3::uuid, gen_random_uuid()), $1, $2::bigint + 1, $4, $5, $6,
           $7::integer
    FROM head WHERE head.actual = $2::bigint
    RETURNING global_position
), outboxed AS (
    INSERT INTO {schema}.outbox (global_position) SELECT global_position FROM inserted
)
SELECT head.actual, (SELECT ARRAY[global_position] FROM inserted) AS positions FROM head;

-- name: append_events
-- Append events to one stream if it is at $2 (-1: no stream), with one outbox row each, in one statement.
-- Returns the stream's version before the append and, if it matched, the new global positions.
WITH head AS (
    SELECT coalesce(max(version), -1) AS actual FROM {schema}.events WHERE stream_id = $1
), inserted AS (
    INSERT INTO {schema}.events (event_id, stream_id, version, event_type, data, metadata, partition)
    SELECT coalesce(i.event_id, gen_random_uuid()), $1, $2::bigint + i.ord, i.event_type, i.data, i.metadata,
           $7::integer
    FROM head, unnest($3::uuid[], $4::text[], $5::bytea[], $6::bytea[])
        WITH ORDINALITY AS i(event_id, event_type, data, metadata, ord)
    WHERE head.actual = $2::bigint
    ORDER BY i.ord
    RETURNING global_position
), outboxed AS (
    INSERT INTO {schema}.outbox (global_position) SELECT global_position FROM inserted
)
SELECT head.actual, (SELECT array_agg(global_position ORDER BY global_position) FROM inserted) AS positions
FROM head;

-- name: append_batch
-- Append to many streams, all or nothing: nothing is written unless every stream is at its expected
-- version. Input: one row per event ($3 = its 1-based step within its stream). Returns the positions in
-- input order (rows are inserted in that order, so their identities ascend with it), or NULL.
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::uuid[], $5::text[], $6::bytea[], $7::bytea[],
                         $8::integer[])
        WITH ORDINALITY AS i(stream_id, expected, step, event_id, event_type, data, metadata, partition, ord)
), mismatched AS (
    SELECT 1 FROM input AS i
    WHERE i.step = 1
      AND i.expected <> coalesce(
          (SELECT max(e.version) FROM {schema}.events AS e WHERE e.stream_id = i.stream_id), -1)
), inserted AS (
    INSERT INTO {schema}.events (event_id, stream_id, version, event_type, data, metadata, partition)
    SELECT coalesce(i.event_id, gen_random_uuid()), i.stream_id, i.expected + i.step, i.event_type, i.data,
           i.metadata, i.partition
    FROM input AS i
    WHERE NOT EXISTS (SELECT 1 FROM mismatched)
    ORDER BY i.ord
    RETURNING global_position
), outboxed AS (
    INSERT INTO {schema}.outbox (global_position) SELECT global_position FROM inserted
)
SELECT array_agg(global_position ORDER BY global_position) FROM inserted;

-- name: notify_outbox
-- Wake the relays listening on channel $1 (sent after the appends committed, see store/notify.py).
-- A wake-up needs no durability: its transaction commits without waiting for the WAL flush.
SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, '');

-- name: stream_version
-- The stream's current version, -1 when it has no events. An archived stream's events are gone: its
-- closed_streams row (its tombstone, read only then: coalesce stops at the first non-NULL) keeps its end.
SELECT coalesce(max(version),
                (SELECT c.version FROM {schema}.closed_streams AS c WHERE c.stream_id = $1), -1)
FROM {schema}.events WHERE stream_id = $1;

-- name: stream_closed
-- Whether the stream is closed (store/archive.py).
SELECT EXISTS (SELECT 1 FROM {schema}.closed_streams WHERE stream_id = $1);

-- name: stream_version_at
-- The stream's version as of a time: its last event recorded at or before $2, -1 when there is none.
SELECT coalesce(max(version), -1) FROM {schema}.events WHERE stream_id = $1 AND recorded_at <= $2;

-- name: find_events
-- Where and what the given event ids were stored as, for recognising a retried append.
SELECT event_id, stream_id, version, global_position, event_type, data, metadata
FROM {schema}.events WHERE event_id = ANY($1::uuid[]);

-- name: load_stream
-- A stream's events from a version on, in version order.
SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, transaction_id
FROM {schema}.events
WHERE stream_id = $1 AND version >= $2
ORDER BY version;

-- name: load_streams
-- Every event of several streams, in stream and version order (a reactor's batch prefetches its streams).
SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, transaction_id
FROM {schema}.events
WHERE stream_id = ANY($1::text[])
ORDER BY stream_id, version;

-- name: load_stream_range
-- A stream's events with from <= version <= to, in version order (gap filling, loads up to a version).
SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, transaction_id
FROM {schema}.events
WHERE stream_id = $1 AND version >= $2 AND version <= $3
ORDER BY version;

-- name: read_all
-- Events after the cursor ($1 transaction id, $2 position) in commit-safe order, only from
-- transactions older than every transaction still running, so none can later appear before the cursor.
SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, transaction_id
FROM {schema}.events
WHERE (transaction_id, global_position) > ($1::xid8, $2::bigint)
  AND transaction_id < {schema}.store_xmin()
ORDER BY transaction_id, global_position
LIMIT $3;

-- name: read_partition
-- read_all restricted to one partition ($4): the events of its streams after the cursor, in the same
-- commit-safe order, read along events_partition_idx; at most $3 rows, and only while the bytes (data +
-- metadata) before each are under $5: the event reaching the budget is the last (`reached` true on it), the
-- first comes whatever its size. octet_length reads a TOASTed value's size without fetching it.
SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, transaction_id,
       running >= $5 AS reached
FROM (
    SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at,
           transaction_id, octet_length(data) + octet_length(metadata) AS bytes,
           sum(octet_length(data) + octet_length(metadata))
               OVER (ORDER BY transaction_id, global_position ROWS UNBOUNDED PRECEDING) AS running
    FROM {schema}.events
    WHERE partition = $4
      AND (transaction_id, global_position) > ($1::xid8, $2::bigint)
      AND transaction_id < {schema}.store_xmin()
    ORDER BY transaction_id, global_position
    LIMIT $3
) AS r
WHERE running - bytes < $5
ORDER BY transaction_id, global_position;

-- name: read_partition_of
-- read_partition of the events named $6 (any version: the name is event_type's part before ".v"): per name
-- the first $3 after the cursor, along events_name_idx or events_partition_idx (the planner picks), merged
-- in read_all order; the byte budget $5 as in read_partition. A read model that handles a few types reads
-- its events, not the partition's.
SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, transaction_id,
       running >= $5 AS reached
FROM (
    SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at,
           transaction_id, octet_length(data) + octet_length(metadata) AS bytes,
           sum(octet_length(data) + octet_length(metadata))
               OVER (ORDER BY transaction_id, global_position ROWS UNBOUNDED PRECEDING) AS running
    FROM (
        SELECT e.* FROM unnest($6::text[]) AS n(name)
        CROSS JOIN LATERAL (
            SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at,
                   transaction_id
            FROM {schema}.events
            WHERE split_part(event_type, '.v', 1) = n.name AND partition = $4
              AND (transaction_id, global_position) > ($1::xid8, $2::bigint)
              AND transaction_id < {schema}.store_xmin()
            ORDER BY transaction_id, global_position
            LIMIT $3
        ) AS e
        ORDER BY transaction_id, global_position
        LIMIT $3
    ) AS named
) AS r
WHERE running - bytes < $5
ORDER BY transaction_id, global_position;

-- name: horizon
-- The safe frontier of read_all (the oldest transaction id still running, cluster-wide, on the store's clock:
-- store/clock.py) and the age in
-- seconds of the oldest transaction holding an id, running or prepared (0 when none): it holds every
-- reader back. Other users' sessions are visible to a role with pg_read_all_stats (or pg_monitor).
SELECT {schema}.store_xmin() AS xmin,
       coalesce(extract(epoch FROM clock_timestamp() - least(
           (SELECT min(xact_start) FROM pg_stat_activity
            WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()),
           (SELECT min(prepared) FROM pg_prepared_xacts)))::float8, 0) AS oldest_transaction_age;

-- name: save_snapshot
-- Keep the newest snapshot per stream; an older one never replaces a newer one.
INSERT INTO {schema}.snapshots AS s (stream_id, version, snapshot_type, data)
VALUES ($1, $2, $3, $4)
ON CONFLICT (stream_id) DO UPDATE
    SET version = EXCLUDED.version, snapshot_type = EXCLUDED.snapshot_type, data = EXCLUDED.data,
        created_at = clock_timestamp()
    WHERE s.version < EXCLUDED.version;

-- name: load_snapshot
-- The newest snapshot of a stream.
SELECT version, snapshot_type, data FROM {schema}.snapshots WHERE stream_id = $1;

-- name: load_snapshot_at_or_before
-- The stream's snapshot if it is of version $2 or older (only the newest is kept: see save_snapshot).
SELECT version, snapshot_type, data FROM {schema}.snapshots WHERE stream_id = $1 AND version <= $2;

-- name: count_events_by_type
-- How many events of each type the store holds (summaries for operators and the demo).
SELECT event_type, count(*) AS events FROM {schema}.events GROUP BY event_type ORDER BY event_type;

-- name: subject_keys
-- The wrapped data keys of subjects $1 (kek_id and wrapped_key NULL: forgotten; no row: none yet).
SELECT subject, kek_id, wrapped_key FROM {schema}.subject_keys WHERE subject = ANY($1::text[]);

-- name: create_subject_keys
-- Data keys for subjects that have none; a racing writer's key (or a tombstone) wins: read them back after.
INSERT INTO {schema}.subject_keys (subject, kek_id, wrapped_key)
SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])
ON CONFLICT (subject) DO NOTHING;

-- name: forget_subject
-- Delete a subject's data key and keep its tombstone (a forgotten subject never gets a new key).
INSERT INTO {schema}.subject_keys AS k (subject, kek_id, wrapped_key, forgotten_at)
VALUES ($1, NULL, NULL, now())
ON CONFLICT (subject) DO UPDATE
SET kek_id = NULL, wrapped_key = NULL, forgotten_at = coalesce(k.forgotten_at, excluded.forgotten_at);

-- name: keys_to_rewrap
-- Up to $2 live keys wrapped by another key-encryption key than $1, locked until the rewrap commits.
SELECT subject, kek_id, wrapped_key FROM {schema}.subject_keys
WHERE kek_id <> $1
ORDER BY subject
LIMIT $2
FOR UPDATE SKIP LOCKED;

-- name: rewrap_subject_keys
-- Store keys wrapped again ($1 subjects, $2 their new kek_id, $3 wrapped keys), unless forgotten meanwhile.
UPDATE {schema}.subject_keys AS k SET kek_id = n.kek_id, wrapped_key = n.wrapped_key
FROM unnest($1::text[], $2::text[], $3::bytea[]) AS n(subject, kek_id, wrapped_key)
WHERE k.subject = n.subject AND k.wrapped_key IS NOT NULL;
