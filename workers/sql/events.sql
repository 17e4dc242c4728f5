-- Reads of the store's events that the runtime makes on its own connections, inside its own transactions
-- (the store's API reads on connections of its own): unqualified, the connection's search_path names the
-- deployment's schema (a rebuild's names the shadow first, which holds no events).

-- name: load_ranges
-- Events of several streams, each from first to last version inclusive, in stream and version order (gaps).
SELECT e.global_position, e.event_id, e.stream_id, e.version, e.event_type, e.data, e.metadata,
       e.recorded_at, e.transaction_id
FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS r(stream_id, first_version, last_version)
JOIN events AS e ON e.stream_id = r.stream_id AND e.version BETWEEN r.first_version AND r.last_version
ORDER BY e.stream_id, e.version;

-- name: load_ranges_of
-- load_ranges of the events named $4 only (any version): a read model's gap holds the events it handles.
SELECT e.global_position, e.event_id, e.stream_id, e.version, e.event_type, e.data, e.metadata,
       e.recorded_at, e.transaction_id
FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS r(stream_id, first_version, last_version)
JOIN events AS e ON e.stream_id = r.stream_id AND e.version BETWEEN r.first_version AND r.last_version
WHERE split_part(e.event_type, '.v', 1) = ANY($4::text[])
ORDER BY e.stream_id, e.version;
