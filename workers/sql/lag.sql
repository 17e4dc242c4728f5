-- Lag of a projection, exact and cheap: a low watermark in read_all order (transaction id, position)
-- below which every event is applied, skipped or belongs to a halted stream; only the tail after it and
-- the halted streams' unapplied events are counted against the checkpoints.

-- name: advance_watermark
-- Move the watermark over the next $2 events below the read_all horizon up to the first event that is
-- neither applied nor of a halted stream. Events of transactions at or above the horizon may still be
-- joined by a late commit of a smaller id, so the watermark never passes them.
WITH tail AS (
    SELECT e.transaction_id, e.global_position,
           coalesce(c.version >= e.version OR c.halted_version IS NOT NULL, false) AS passable
    FROM events AS e
    LEFT JOIN checkpoints AS c ON c.projection = $1 AND c.stream_id = e.stream_id
    WHERE (e.transaction_id, e.global_position) > (
              coalesce((SELECT watermark_txid FROM projection_status WHERE projection = $1), '0'::xid8),
              coalesce((SELECT watermark_position FROM projection_status WHERE projection = $1), 0))
      AND e.transaction_id < store_xmin()
    ORDER BY e.transaction_id, e.global_position
    LIMIT $2
), blocked AS (
    SELECT transaction_id, global_position FROM tail WHERE NOT passable
    ORDER BY transaction_id, global_position
    LIMIT 1
), target AS (
    SELECT t.transaction_id, t.global_position FROM tail AS t
    WHERE NOT EXISTS (SELECT 1 FROM blocked AS b
                      WHERE (t.transaction_id, t.global_position) >= (b.transaction_id, b.global_position))
    ORDER BY t.transaction_id DESC, t.global_position DESC
    LIMIT 1
), moved AS (
    INSERT INTO projection_status AS s (projection, watermark_txid, watermark_position)
    SELECT $1, transaction_id, global_position FROM target
    ON CONFLICT (projection) DO UPDATE
        SET watermark_txid = EXCLUDED.watermark_txid, watermark_position = EXCLUDED.watermark_position,
            updated_at = clock_timestamp()
        WHERE (s.watermark_txid, s.watermark_position) < (EXCLUDED.watermark_txid, EXCLUDED.watermark_position)
    RETURNING 1
)
SELECT (SELECT count(*) FROM tail) AS scanned,
       (SELECT count(*) FROM blocked) AS blocked,
       (SELECT count(*) FROM moved) AS moved;

-- name: measure_lag
-- Unapplied committed events per partition: the tail after the watermark not covered by its stream's
-- checkpoint, plus the events at or before it of halted streams above their checkpoint; the oldest one's
-- recorded_at. Partitions with nothing unapplied have no row. (Events written before partitions and not yet
-- filled in by migrate count under a NULL partition.)
WITH w AS (
    SELECT coalesce((SELECT watermark_txid FROM projection_status WHERE projection = $1), '0'::xid8) AS txid,
           coalesce((SELECT watermark_position FROM projection_status WHERE projection = $1), 0) AS pos
), tail AS (
    SELECT e.partition, e.recorded_at
    FROM events AS e
    LEFT JOIN checkpoints AS c ON c.projection = $1 AND c.stream_id = e.stream_id
    WHERE (e.transaction_id, e.global_position) > ((SELECT txid FROM w), (SELECT pos FROM w))
      AND (c.version IS NULL OR c.version < e.version)
), halted AS (
    SELECT e.partition, e.recorded_at
    FROM checkpoints AS c
    JOIN events AS e ON e.stream_id = c.stream_id AND e.version > c.version
    WHERE c.projection = $1 AND c.halted_version IS NOT NULL
      AND (e.transaction_id, e.global_position) <= ((SELECT txid FROM w), (SELECT pos FROM w))
), unapplied AS (
    SELECT partition, recorded_at FROM tail
    UNION ALL
    SELECT partition, recorded_at FROM halted
)
SELECT partition, count(*) AS lag_events,
       greatest(coalesce(extract(epoch FROM clock_timestamp() - min(recorded_at))::float8, 0), 0) AS lag_seconds
FROM unapplied
GROUP BY partition;

-- name: advance_watermark_of
-- advance_watermark for a read model that handles the events named $3 only (any version): the tail is the
-- next $2 of those (per name along events_name_idx, merged in read_all order); an event of another name is
-- nothing to it, and the watermark passes it with the next of its own.
WITH mark AS (
    SELECT coalesce((SELECT watermark_txid FROM projection_status WHERE projection = $1), '0'::xid8) AS txid,
           coalesce((SELECT watermark_position FROM projection_status WHERE projection = $1), 0) AS pos
), named AS (
    SELECT e.* FROM unnest($3::text[]) AS n(name)
    CROSS JOIN LATERAL (
        SELECT ev.transaction_id, ev.global_position, ev.stream_id, ev.version
        FROM events AS ev
        WHERE split_part(ev.event_type, '.v', 1) = n.name
          AND (ev.transaction_id, ev.global_position) > ((SELECT txid FROM mark), (SELECT pos FROM mark))
          AND ev.transaction_id < store_xmin()
        ORDER BY ev.transaction_id, ev.global_position
        LIMIT $2
    ) AS e
    ORDER BY e.transaction_id, e.global_position
    LIMIT $2
), tail AS (
    SELECT e.transaction_id, e.global_position,
           coalesce(c.version >= e.version OR c.halted_version IS NOT NULL, false) AS passable
    FROM named AS e
    LEFT JOIN checkpoints AS c ON c.projection = $1 AND c.stream_id = e.stream_id
), blocked AS (
    SELECT transaction_id, global_position FROM tail WHERE NOT passable
    ORDER BY transaction_id, global_position
    LIMIT 1
), target AS (
    SELECT t.transaction_id, t.global_position FROM tail AS t
    WHERE NOT EXISTS (SELECT 1 FROM blocked AS b
                      WHERE (t.transaction_id, t.global_position) >= (b.transaction_id, b.global_position))
    ORDER BY t.transaction_id DESC, t.global_position DESC
    LIMIT 1
), moved AS (
    INSERT INTO projection_status AS s (projection, watermark_txid, watermark_position)
    SELECT $1, transaction_id, global_position FROM target
    ON CONFLICT (projection) DO UPDATE
        SET watermark_txid = EXCLUDED.watermark_txid, watermark_position = EXCLUDED.watermark_position,
            updated_at = clock_timestamp()
        WHERE (s.watermark_txid, s.watermark_position) < (EXCLUDED.watermark_txid, EXCLUDED.watermark_position)
    RETURNING 1
)
SELECT (SELECT count(*) FROM tail) AS scanned,
       (SELECT count(*) FROM blocked) AS blocked,
       (SELECT count(*) FROM moved) AS moved;

-- name: measure_lag_of
-- measure_lag for a read model that handles the events named $2 only (any version): the others are not lag.
WITH w AS (
    SELECT coalesce((SELECT watermark_txid FROM projection_status WHERE projection = $1), '0'::xid8) AS txid,
           coalesce((SELECT watermark_position FROM projection_status WHERE projection = $1), 0) AS pos
), tail AS (
    SELECT e.partition, e.recorded_at
    FROM unnest($2::text[]) AS n(name)
    JOIN events AS e ON split_part(e.event_type, '.v', 1) = n.name
    LEFT JOIN checkpoints AS c ON c.projection = $1 AND c.stream_id = e.stream_id
    WHERE (e.transaction_id, e.global_position) > ((SELECT txid FROM w), (SELECT pos FROM w))
      AND (c.version IS NULL OR c.version < e.version)
), halted AS (
    SELECT e.partition, e.recorded_at
    FROM checkpoints AS c
    JOIN events AS e ON e.stream_id = c.stream_id AND e.version > c.version
    WHERE c.projection = $1 AND c.halted_version IS NOT NULL
      AND split_part(e.event_type, '.v', 1) = ANY($2::text[])
      AND (e.transaction_id, e.global_position) <= ((SELECT txid FROM w), (SELECT pos FROM w))
), unapplied AS (
    SELECT partition, recorded_at FROM tail
    UNION ALL
    SELECT partition, recorded_at FROM halted
)
SELECT partition, count(*) AS lag_events,
       greatest(coalesce(extract(epoch FROM clock_timestamp() - min(recorded_at))::float8, 0), 0) AS lag_seconds
FROM unapplied
GROUP BY partition;

-- name: watermark
-- The projection's low watermark (the start when it has none yet).
SELECT coalesce((SELECT watermark_txid FROM projection_status WHERE projection = $1), '0'::xid8) AS watermark_txid,
       coalesce((SELECT watermark_position FROM projection_status WHERE projection = $1), 0) AS watermark_position;

-- name: oldest_transaction_age
-- The age in seconds of the oldest transaction holding an id, running or prepared (0 when none): it holds
-- every reader of read_all back (the same figure as the store's `horizon` statement).
SELECT coalesce(extract(epoch FROM clock_timestamp() - least(
           (SELECT min(xact_start) FROM pg_stat_activity
            WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()),
           (SELECT min(prepared) FROM pg_prepared_xacts)))::float8, 0) AS oldest_transaction_age;

-- name: recorded_types
-- The event names a read model's tables and checkpoints were built with (read_model_types; NULL: every event,
-- or no row: a read model no worker or migrate has registered).
SELECT handled FROM read_model_types WHERE projection = $1;
