-- Named queries of workers.rebuild. They run on a connection whose search_path is
-- "<shadow>", "<schema>": the shadow's own tables (rebuild_checkpoints, rebuild_cursor and the projection's
-- read-model tables) resolve there, everything else (events, checkpoints, projection_status) in the schema.

-- name: schema_exists
-- Whether a schema of this name ($1) exists (a rebuild's shadow, before it creates it).
SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1);

-- name: create_rebuild_tables
-- The rebuild's bookkeeping in the shadow schema (run with the shadow alone on the search_path).
-- Unlogged like the shadow's tables: a server crash empties them all together (the rebuild starts over).
CREATE UNLOGGED TABLE IF NOT EXISTS rebuild_checkpoints (
    stream_id      text   NOT NULL,
    version        bigint NOT NULL,
    -- Set when a handler failed on this version under the "halt" policy (as in checkpoints).
    halted_version bigint,
    CONSTRAINT rebuild_checkpoints_pkey PRIMARY KEY (stream_id)
);
CREATE UNLOGGED TABLE IF NOT EXISTS rebuild_cursor (
    projection      text        NOT NULL,
    fingerprint     text        NOT NULL,
    transaction_id  xid8        NOT NULL DEFAULT '0',
    global_position bigint      NOT NULL DEFAULT 0,
    events          bigint      NOT NULL DEFAULT 0,
    started_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT rebuild_cursor_pkey PRIMARY KEY (projection)
);

-- name: read_cursor
-- Where a rebuild got to, to resume it.
SELECT fingerprint, transaction_id, global_position, events FROM rebuild_cursor WHERE projection = $1;

-- name: start_cursor
-- Start a rebuild at the beginning of the store.
INSERT INTO rebuild_cursor (projection, fingerprint) VALUES ($1, $2);

-- name: advance_cursor
-- Record, with the batch it belongs to, how far the rebuild has read the store.
UPDATE rebuild_cursor
SET transaction_id = $2, global_position = $3, events = events + $4
WHERE projection = $1;

-- name: read_all
-- The store's read_all for a rebuild: events after the cursor ($1 transaction id, $2 position) in commit-safe
-- order, only from transactions older than every one still running; at most $3 rows, and only while the bytes
-- (data + metadata) before each are under $4: the event reaching it is the last (`reached` true on it), the
-- first comes whatever its size. octet_length reads a TOASTed value's size without fetching it.
SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, transaction_id,
       running >= $4 AS reached
FROM (
    SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at,
           transaction_id, octet_length(data) + octet_length(metadata) AS bytes,
           sum(octet_length(data) + octet_length(metadata))
               OVER (ORDER BY transaction_id, global_position ROWS UNBOUNDED PRECEDING) AS running
    FROM events
    WHERE (transaction_id, global_position) > ($1::xid8, $2::bigint)
      AND transaction_id < store_xmin()
    ORDER BY transaction_id, global_position
    LIMIT $3
) AS r
WHERE running - bytes < $4
ORDER BY transaction_id, global_position;

-- name: read_settled
-- Events after a global position, in position order, horizon or not (a store nobody writes to any more);
-- at most $2 rows and the bytes budget $3 as in read_all.
SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, transaction_id,
       running >= $3 AS reached
FROM (
    SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at,
           transaction_id, octet_length(data) + octet_length(metadata) AS bytes,
           sum(octet_length(data) + octet_length(metadata))
               OVER (ORDER BY global_position ROWS UNBOUNDED PRECEDING) AS running
    FROM events
    WHERE global_position > $1
    ORDER BY global_position
    LIMIT $2
) AS r
WHERE running - bytes < $3
ORDER BY global_position;

-- name: read_all_of
-- read_all of the events named $5 (any version: the name is event_type's part before ".v"), for a read model
-- that handles a few types: per name the first $3 after the cursor along events_name_idx, merged in read_all
-- order, so a batch decodes and applies the events it handles only; the byte budget $4 as in read_all. The
-- planner does not know how rare a name from unnest is (it assumes 1/distinct names) and may walk the
-- commit-order index instead, skipping the other names' rows in the index scan (about a microsecond each
-- on a cached store; measured in BENCHMARKS.md "Type filter").
SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, transaction_id,
       running >= $4 AS reached
FROM (
    SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at,
           transaction_id, octet_length(data) + octet_length(metadata) AS bytes,
           sum(octet_length(data) + octet_length(metadata))
               OVER (ORDER BY transaction_id, global_position ROWS UNBOUNDED PRECEDING) AS running
    FROM (
        SELECT e.* FROM unnest($5::text[]) AS n(name)
        CROSS JOIN LATERAL (
            SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at,
                   transaction_id
            FROM events
            WHERE split_part(event_type, '.v', 1) = n.name
              AND (transaction_id, global_position) > ($1::xid8, $2::bigint)
              AND transaction_id < store_xmin()
            ORDER BY transaction_id, global_position
            LIMIT $3
        ) AS e
        ORDER BY transaction_id, global_position
        LIMIT $3
    ) AS named
) AS r
WHERE running - bytes < $4
ORDER BY transaction_id, global_position;

-- name: read_settled_of
-- read_all_of without the horizon (a store nobody writes to any more: every event is committed, so the
-- read_all order holds them all); at most $3 rows, the byte budget $4, the names $5.
SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, transaction_id,
       running >= $4 AS reached
FROM (
    SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at,
           transaction_id, octet_length(data) + octet_length(metadata) AS bytes,
           sum(octet_length(data) + octet_length(metadata))
               OVER (ORDER BY transaction_id, global_position ROWS UNBOUNDED PRECEDING) AS running
    FROM (
        SELECT e.* FROM unnest($5::text[]) AS n(name)
        CROSS JOIN LATERAL (
            SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at,
                   transaction_id
            FROM events
            WHERE split_part(event_type, '.v', 1) = n.name
              AND (transaction_id, global_position) > ($1::xid8, $2::bigint)
            ORDER BY transaction_id, global_position
            LIMIT $3
        ) AS e
        ORDER BY transaction_id, global_position
        LIMIT $3
    ) AS named
) AS r
WHERE running - bytes < $4
ORDER BY transaction_id, global_position;

-- name: count_after_of
-- How many events named $3 lie after the cursor (for the progress line of a read model with few types).
SELECT count(*) FROM events
WHERE split_part(event_type, '.v', 1) = ANY($3::text[])
  AND (transaction_id, global_position) > ($1::xid8, $2::bigint);

-- name: count_after
-- How many events lie after the cursor (for the progress line).
SELECT count(*) FROM events WHERE (transaction_id, global_position) > ($1::xid8, $2::bigint);

-- name: snapshot_xmax
-- The first transaction id not yet assigned: every transaction below it has at least started.
SELECT store_xmax();

-- name: horizon_passed
-- Whether every transaction below $1 has ended, so read_all returns all of their events.
SELECT store_xmin() >= $1::xid8;

-- name: shadow_versions
-- The shadow's checkpoints of some streams. A join on the unnested ids, not `stream_id = ANY($1)`: the table is new
-- and never analyzed, and a generic plan may scan it with `= ANY($1)` as a filter, which compares each row with every
-- id (a parameter's array is not hashed): bench.typefilter at 300,000 events spent 1-1.5 s per batch in that
-- statement (pg_stat_activity), a rebuild of every event 187 s instead of 11. A join is a hash or index join.
SELECT c.stream_id, c.version, c.halted_version
FROM unnest($1::text[]) AS s(stream_id) JOIN rebuild_checkpoints AS c ON c.stream_id = s.stream_id;

-- name: save_shadow_versions
-- Set the shadow's checkpoints of some streams.
INSERT INTO rebuild_checkpoints AS c (stream_id, version, halted_version)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])
ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version, halted_version = EXCLUDED.halted_version;

-- name: park_failure
-- Record an event whose handler failed during a rebuild, unless the live workers parked it already.
INSERT INTO dead_letters (projection, stream_id, version, global_position, event_id, event_type, error,
                          traceback, status)
SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9
WHERE NOT EXISTS (SELECT 1 FROM dead_letters
                  WHERE projection = $1 AND stream_id = $2 AND version = $3 AND status = $9);

-- name: projection_state
-- A projection's state row, if it has one.
SELECT state FROM projection_status WHERE projection = $1;

-- name: set_state
-- Put a projection in a state, creating its status row if needed.
INSERT INTO projection_status AS s (projection, state) VALUES ($1, $2)
ON CONFLICT (projection) DO UPDATE SET state = EXCLUDED.state, updated_at = clock_timestamp();

-- name: live_ahead
-- Streams whose live checkpoint is ahead of the shadow's: the swap applies what the shadow lacks.
SELECT l.stream_id, coalesce(s.version, -1) AS shadow_version, l.version AS live_version
FROM checkpoints AS l
LEFT JOIN rebuild_checkpoints AS s ON s.stream_id = l.stream_id
WHERE l.projection = $1 AND l.version > coalesce(s.version, -1);

-- name: live_ahead_of
-- live_ahead for a read model that handles the events named $4 only: the shadow read every one of those up to
-- its cursor ($2, $3), so only a stream with one after it can lack one the live workers applied. The live
-- checkpoints of the others may be ahead over events of other types, which are nothing to the shadow.
SELECT l.stream_id, coalesce(s.version, -1) AS shadow_version, l.version AS live_version
FROM checkpoints AS l
LEFT JOIN rebuild_checkpoints AS s ON s.stream_id = l.stream_id
WHERE l.projection = $1 AND l.version > coalesce(s.version, -1)
  AND l.stream_id IN (SELECT e.stream_id FROM unnest($4::text[]) AS n(name)
                      JOIN events AS e ON split_part(e.event_type, '.v', 1) = n.name
                      WHERE (e.transaction_id, e.global_position) > ($2::xid8, $3::bigint));

-- name: table_grants
-- The privileges granted on a table to roles other than its owner (grantee NULL: PUBLIC).
SELECT r.rolname AS grantee, a.privilege_type, a.is_grantable
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
CROSS JOIN LATERAL aclexplode(c.relacl) AS a
LEFT JOIN pg_roles AS r ON r.oid = a.grantee
WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind = 'r' AND a.grantee <> c.relowner;

-- name: adopt_shadow_checkpoints
-- Make the shadow's checkpoints the live ones. After the swap the shadow has every event the live workers
-- applied of the types it handles, so a live checkpoint further on is ahead over events of other types only
-- (a read model with a few types reads only those) and stays; only a stream the shadow halted at a failing
-- handler goes back to where the shadow stopped.
INSERT INTO checkpoints AS c (projection, stream_id, version, halted_version)
SELECT $1, stream_id, version, halted_version FROM rebuild_checkpoints
ON CONFLICT (projection, stream_id) DO UPDATE
    SET version = CASE WHEN EXCLUDED.halted_version IS NULL THEN greatest(c.version, EXCLUDED.version)
                       ELSE EXCLUDED.version END,
        halted_version = EXCLUDED.halted_version, updated_at = clock_timestamp()
    WHERE (c.version, c.halted_version) IS DISTINCT FROM
          (CASE WHEN EXCLUDED.halted_version IS NULL THEN greatest(c.version, EXCLUDED.version)
                ELSE EXCLUDED.version END, EXCLUDED.halted_version);

-- name: resolve_dead_letters
-- Settle the parked dead letters of events the shadow got past (run in the swap, with the shadow's
-- rebuild_checkpoints on the path): a handler fixed since then applied them, as `dead-letters retry` would
-- have ('retried'), unless this rebuild skipped them under a "skip" policy ('skipped'). An event whose
-- handler still fails under "halt" stays parked: its stream's shadow checkpoint stops just before it.
UPDATE dead_letters AS d
SET status = CASE WHEN EXISTS (SELECT 1 FROM dead_letters AS k
                               WHERE k.projection = d.projection AND k.stream_id = d.stream_id
                                 AND k.version = d.version AND k.status = 'skipped')
                  THEN 'skipped' ELSE 'retried' END,
    resolved_at = clock_timestamp()
FROM rebuild_checkpoints AS s
WHERE d.projection = $1 AND d.status = 'parked' AND s.stream_id = d.stream_id AND s.version >= d.version
RETURNING d.id, d.status;

-- name: finish_status
-- The rebuilt projection is live; its watermark is the later of the live one and the rebuild's cursor
-- (the shadow applied, skipped or halted every event up to it); applied counts the events its
-- checkpoints cover, as the workers' per-batch sums do for a projection that was never rebuilt.
UPDATE projection_status
SET state = 'live',
    applied = (SELECT coalesce(sum(version + 1), 0) FROM rebuild_checkpoints),
    watermark_txid = CASE WHEN (watermark_txid, watermark_position) < ($2::xid8, $3::bigint)
                          THEN $2::xid8 ELSE watermark_txid END,
    watermark_position = CASE WHEN (watermark_txid, watermark_position) < ($2::xid8, $3::bigint)
                              THEN $3::bigint ELSE watermark_position END,
    updated_at = clock_timestamp()
WHERE projection = $1;
