-- Named queries of the operator commands (status, demo).

-- name: known_projections
-- Projections with a status row (some may no longer be registered in this code).
SELECT projection FROM projection_status ORDER BY projection;

-- name: projection_summary
-- State, applied count, parked failures and halted streams of one projection (defaults when new).
SELECT coalesce((SELECT state FROM projection_status WHERE projection = $1), 'live') AS state,
       coalesce((SELECT applied FROM projection_status WHERE projection = $1), 0) AS applied,
       (SELECT count(*) FROM dead_letters WHERE projection = $1 AND status = 'parked') AS parked,
       (SELECT count(*) FROM checkpoints WHERE projection = $1 AND halted_version IS NOT NULL) AS halted;

-- name: lock_held
-- Whether some session holds the advisory lock of key $1 (pg_locks splits the 64-bit key in two oids).
SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND objsubid = 1 AND granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0)
);

-- name: pipeline_counts
-- Events in the store and those not yet published, from one snapshot (an append writes both at once).
SELECT (SELECT count(*) FROM events) AS written, (SELECT count(*) FROM outbox) AS pending;

-- name: covered_events
-- Events a projection's checkpoints cover (each stream's checkpoint counts its versions 0..n).
SELECT coalesce(sum(version + 1), 0) FROM checkpoints WHERE projection = $1;
