-- Named queries of the outbox relay. Unqualified names resolve in the deployment's schema: only the relay
-- and `eventfleet status` run them, on connections of db.create_pool / db.connect (search_path = schema).
-- The store's own statements (store/sql/queries.sql) name their schema and need no search_path.

-- name: claim
-- Lock the oldest unclaimed outbox rows (rows another relay holds are skipped, not waited for), at most $1,
-- and return their events in position order while the bytes (data + metadata) before each are under $2:
-- the event reaching the budget is the last one returned, and the first is returned whatever its size.
-- The rows returned are deleted by this same statement, in the caller's transaction: the relay commits once
-- the broker confirmed every message, or rolls back (the rows stay, to be claimed again). Rows locked past the
-- budget stay in the outbox for the next claim (the lock ends with the transaction). One statement, not a
-- claim and a delete: one round trip less per relay batch.
-- Locks only the outbox rows: events rows are immutable. `reached` is true on a row that reached the budget.
-- Each event is fetched by its primary key (the LATERAL ... LIMIT 1 cannot be flattened into a join): with a
-- plain join, stale statistics of the churning outbox (before autovacuum or ANALYZE caught up) made the
-- planner merge or hash join against the whole events table, a claim cost growing with the store's size.
-- The sizes come first (octet_length reads a TOASTed value's size without fetching it), the payloads only
-- for the rows returned. The delete finds its rows by ctid (the rows are locked, so their ctid holds, and
-- nothing updates outbox rows): with the relay's sessions' enable_seqscan off (workers/relay/session.py), a Tid
-- Scan whatever the statistics. Postgres keeps a generic plan of this statement after a few runs, and one planned
-- while the outbox was small would otherwise scan the whole outbox on every claim once a broker outage let a
-- backlog grow (tests/integration/test_outbox_claim.py).
WITH claimed AS (
    SELECT ctid AS row_id, global_position FROM outbox
    ORDER BY global_position
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), sized AS (
    SELECT c.row_id, c.global_position,
           sum(s.bytes) OVER (ORDER BY c.global_position ROWS UNBOUNDED PRECEDING) AS running, s.bytes
    FROM claimed AS c
    CROSS JOIN LATERAL (
        SELECT octet_length(x.data) + octet_length(x.metadata) AS bytes
        FROM events AS x WHERE x.global_position = c.global_position LIMIT 1
    ) AS s
), taken AS (
    DELETE FROM outbox AS o
    USING sized AS z
    WHERE o.ctid = z.row_id AND z.running - z.bytes < $2
    RETURNING o.global_position
)
SELECT e.global_position, e.event_id, e.stream_id, e.version, e.event_type, e.data, e.metadata,
       e.recorded_at, e.transaction_id, e.partition, z.running >= $2 AS reached
FROM taken AS t
JOIN sized AS z USING (global_position)
CROSS JOIN LATERAL (
    SELECT * FROM events AS x WHERE x.global_position = t.global_position LIMIT 1
) AS e
ORDER BY e.global_position;

-- name: pending
-- How many rows wait to be published and the age in seconds of the oldest (0 when none).
-- One scan of the outbox, which the relay keeps short; run every few seconds, not per batch.
SELECT count(*) AS pending,
       coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8 AS oldest_age_seconds
FROM outbox;
