-- The chaos ledger: a test-only read model that counts every event of every stream, so that any event
-- lost or applied twice shows as a count off by one; and the poison list that makes its handler fail.

-- name: ddl
-- Idempotent DDL of the ledger and of the poison list (the harness runs it after migrating).
CREATE TABLE IF NOT EXISTS chaos_ledger (
    stream_id    text   NOT NULL,
    events       bigint NOT NULL,
    last_version bigint NOT NULL,
    CONSTRAINT chaos_ledger_pkey PRIMARY KEY (stream_id)
);
CREATE TABLE IF NOT EXISTS chaos_poison (
    stream_id text    NOT NULL,
    version   bigint  NOT NULL,
    fixed     boolean NOT NULL DEFAULT false,
    CONSTRAINT chaos_poison_pkey PRIMARY KEY (stream_id, version)
);

-- name: ddl_shipments
-- Idempotent DDL of the one-type ledger: OrderShipped events applied per stream.
CREATE TABLE IF NOT EXISTS chaos_shipments (
    stream_id text   NOT NULL,
    events    bigint NOT NULL,
    CONSTRAINT chaos_shipments_pkey PRIMARY KEY (stream_id)
);

-- name: count_shipments
-- Add a batch's shipments to their streams' counts (distinct streams), rows locked in stream order.
INSERT INTO chaos_shipments AS l (stream_id, events)
SELECT u.stream_id, u.events
FROM unnest($1::text[], $2::bigint[]) AS u(stream_id, events)
ORDER BY u.stream_id
ON CONFLICT (stream_id) DO UPDATE SET events = l.events + EXCLUDED.events;

-- name: shipments
-- The one-type ledger.
SELECT stream_id, events FROM chaos_shipments;

-- name: store_shipments
-- OrderShipped events per stream in the store: what the one-type ledger must show.
SELECT stream_id, count(*) AS events FROM events WHERE split_part(event_type, '.v', 1) = 'OrderShipped'
GROUP BY stream_id;

-- name: store_names
-- Events in the store per event name (any version): what each read model must have applied.
SELECT split_part(event_type, '.v', 1) AS name, count(*) AS events FROM events GROUP BY 1;

-- name: poisoned
-- How many of the given (stream, version) pairs are poisoned and not yet fixed.
SELECT count(*)
FROM chaos_poison AS p
JOIN unnest($1::text[], $2::bigint[]) AS u(stream_id, version)
    ON p.stream_id = u.stream_id AND p.version = u.version
WHERE NOT p.fixed;

-- name: count_events
-- Add a batch's events to their streams' counts (distinct streams), rows locked in stream order.
INSERT INTO chaos_ledger AS l (stream_id, events, last_version)
SELECT u.stream_id, u.events, u.last_version
FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u(stream_id, events, last_version)
ORDER BY u.stream_id
ON CONFLICT (stream_id) DO UPDATE
    SET events = l.events + EXCLUDED.events, last_version = greatest(l.last_version, EXCLUDED.last_version);

-- name: poison
-- Make the handler fail on one event until it is fixed.
INSERT INTO chaos_poison (stream_id, version) VALUES ($1, $2) ON CONFLICT DO NOTHING;

-- name: fix
-- The "deployed fix": the handler stops failing on the stream's poisoned events.
UPDATE chaos_poison SET fixed = true WHERE stream_id = $1;

-- name: ledger
-- The whole ledger.
SELECT stream_id, events FROM chaos_ledger;

-- name: store_counts
-- Events per stream in the store: what the ledger must show.
SELECT stream_id, count(*) AS events FROM events GROUP BY stream_id;

-- name: all_events
-- Every event, each stream in version order (the columns record_from_row reads).
SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, transaction_id
FROM events
ORDER BY stream_id, version;
