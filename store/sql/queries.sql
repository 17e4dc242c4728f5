-- Named queries of the event store. Every name resolves through the connection's search_path,
-- which db.connect_kwargs sets to the deployment's schema.

-- name: append_stream
-- Append events to one stream if it is at $2 (-1: no stream), with one outbox row each, in one statement.
-- Returns the stream's version before the append and, if it matched, the new global positions.
WITH head AS (
    SELECT coalesce(max(version), -1) AS actual FROM events WHERE stream_id = $1
), inserted AS (
    INSERT INTO events (event_id, stream_id, version, event_type, data, metadata)
    SELECT i.event_id, $1, $2::bigint + i.ord, i.event_type, i.data, i.metadata
    FROM head, unnest($3::uuid[], $4::text[], $5::bytea[], $6::bytea[])
        WITH ORDINALITY AS i(event_id, event_type, data, metadata, ord)
    WHERE head.actual = $2::bigint
    ORDER BY i.ord
    RETURNING global_position
), outboxed AS (
    INSERT INTO outbox (global_position) SELECT global_position FROM inserted
)
SELECT (SELECT actual FROM head) AS actual,
       (SELECT array_agg(global_position ORDER BY global_position) FROM inserted) AS positions;

-- name: append_streams
-- Append to many streams, all or nothing: nothing is written unless every stream is at its expected
-- version. One row per input event, in input order: its stream's version before and its position.
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::uuid[], $5::text[], $6::bytea[], $7::bytea[])
        WITH ORDINALITY AS i(stream_id, expected, step, event_id, event_type, data, metadata, ord)
), heads AS (
    SELECT s.stream_id, s.expected,
           coalesce((SELECT max(e.version) FROM events e WHERE e.stream_id = s.stream_id), -1) AS actual
    FROM (SELECT DISTINCT stream_id, expected FROM input) AS s
), inserted AS (
    INSERT INTO events (event_id, stream_id, version, event_type, data, metadata)
    SELECT i.event_id, i.stream_id, i.expected + i.step, i.event_type, i.data, i.metadata
    FROM input AS i
    WHERE NOT EXISTS (SELECT 1 FROM heads AS h WHERE h.actual <> h.expected)
    ORDER BY i.ord
    RETURNING global_position, event_id
), outboxed AS (
    INSERT INTO outbox (global_position) SELECT global_position FROM inserted
)
SELECT h.actual, ins.global_position
FROM input AS i
JOIN heads AS h ON h.stream_id = i.stream_id
LEFT JOIN inserted AS ins ON ins.event_id = i.event_id
ORDER BY i.ord;

-- name: stream_version
-- The stream's current version, -1 when it has no events.
SELECT coalesce(max(version), -1) FROM events WHERE stream_id = $1;

-- name: find_events
-- Where the given event ids were stored, for recognising a retried append.
SELECT event_id, stream_id, version, global_position FROM events WHERE event_id = ANY($1::uuid[]);

-- name: load_stream
-- A stream's events from a version on, in version order.
SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, transaction_id
FROM events
WHERE stream_id = $1 AND version >= $2
ORDER BY version;

-- name: load_stream_range
-- A stream's events with from <= version <= to, in version order (gap filling).
SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, transaction_id
FROM events
WHERE stream_id = $1 AND version >= $2 AND version <= $3
ORDER BY version;

-- name: read_all
-- Events after the cursor ($1 transaction id, $2 position) in commit-safe order, only from
-- transactions older than every transaction still running, so none can later appear before the cursor.
SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, transaction_id
FROM events
WHERE (transaction_id, global_position) > ($1::xid8, $2::bigint)
  AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY transaction_id, global_position
LIMIT $3;

-- name: horizon
-- The safe frontier of read_all: the oldest running transaction id, and the age in seconds of the
-- oldest transaction still open (0 when none), which holds every reader back.
SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin,
       coalesce((SELECT extract(epoch FROM clock_timestamp() - min(xact_start))::float8
                 FROM pg_stat_activity
                 WHERE backend_xid IS NOT NULL OR backend_xmin IS NOT NULL), 0) AS oldest_transaction_age;

-- name: save_snapshot
-- Keep the newest snapshot per stream; an older one never replaces a newer one.
INSERT INTO snapshots AS s (stream_id, version, snapshot_type, data)
VALUES ($1, $2, $3, $4)
ON CONFLICT (stream_id) DO UPDATE
    SET version = EXCLUDED.version, snapshot_type = EXCLUDED.snapshot_type, data = EXCLUDED.data,
        created_at = clock_timestamp()
    WHERE s.version < EXCLUDED.version;

-- name: load_snapshot
-- The newest snapshot of a stream.
SELECT version, snapshot_type, data FROM snapshots WHERE stream_id = $1;
