-- Named queries of closing and archiving streams (store/archive.py, migration 0013). Tables are written
-- {schema}.name: store.queries.bind writes the store's schema in.

-- name: close_stream
-- Mark a stream closed at version $2 (its StreamClosed event, appended in the same transaction just before).
INSERT INTO {schema}.closed_streams (stream_id, version) VALUES ($1, $2);

-- name: lock_closed_stream
-- The closed stream's last version, its row locked until the archival commits (archivals of it queue here).
SELECT version FROM {schema}.closed_streams WHERE stream_id = $1 FOR UPDATE;

-- name: archive_entry
-- The stream's archive_log row, if it was archived.
SELECT archive_id, stream_id, archived_by, reason, archived_at, events, first_position, last_position,
       last_version
FROM {schema}.archive_log WHERE stream_id = $1;

-- name: unpublished_events
-- How many of the stream's events still wait in the outbox for the relay.
SELECT count(*) FROM {schema}.outbox AS o
JOIN {schema}.events AS e ON e.global_position = o.global_position
WHERE e.stream_id = $1;

-- name: halting_projections
-- The projections holding the stream halted at a parked event (their dead letter would find nothing to re-drive).
SELECT projection FROM {schema}.checkpoints WHERE stream_id = $1 AND halted_version IS NOT NULL ORDER BY projection;

-- name: log_archive
-- Write the archival's audit row: who ($2), why ($3) and what the stream holds now. Its transaction id is
-- what lets the events trigger delete the stream's events in this transaction, and in no other.
INSERT INTO {schema}.archive_log (stream_id, archived_by, reason, events, first_position, last_position,
                                  last_version)
SELECT $1, $2, $3, count(*), min(global_position), max(global_position), max(version)
FROM {schema}.events WHERE stream_id = $1
HAVING count(*) > 0
RETURNING archive_id, stream_id, archived_by, reason, archived_at, events, first_position, last_position,
          last_version;

-- name: move_to_archive
-- Move the stream's events to events_archive under archive $2, in one statement; the number moved.
WITH moved AS (
    DELETE FROM {schema}.events WHERE stream_id = $1
    RETURNING global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at,
              transaction_id, partition
), archived AS (
    INSERT INTO {schema}.events_archive (global_position, event_id, stream_id, version, event_type, data,
                                         metadata, recorded_at, transaction_id, partition, archive_id)
    SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at,
           transaction_id, partition, $2::bigint
    FROM moved
    RETURNING 1
)
SELECT count(*) FROM archived;

-- name: drop_snapshot
-- An archived stream's snapshot goes with its events: it is state the live table no longer holds.
DELETE FROM {schema}.snapshots WHERE stream_id = $1;

-- name: load_archived
-- An archived stream's events, in version order (read back for an audit or an export).
SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, transaction_id
FROM {schema}.events_archive
WHERE stream_id = $1
ORDER BY version;

-- name: archive_preview
-- What archiving the stream would do now: whether it is closed, archived, how many events it holds, how many
-- of them wait in the outbox and which projections hold it halted (`eventfleet archive` without --yes).
SELECT EXISTS (SELECT 1 FROM {schema}.closed_streams WHERE stream_id = $1) AS closed,
       EXISTS (SELECT 1 FROM {schema}.archive_log WHERE stream_id = $1) AS archived,
       (SELECT count(*) FROM {schema}.events WHERE stream_id = $1) AS events,
       (SELECT count(*) FROM {schema}.outbox AS o
        JOIN {schema}.events AS e ON e.global_position = o.global_position
        WHERE e.stream_id = $1) AS unpublished,
       ARRAY(SELECT projection FROM {schema}.checkpoints
             WHERE stream_id = $1 AND halted_version IS NOT NULL ORDER BY projection) AS halting;
