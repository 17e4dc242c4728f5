-- The advisory-lock statements of the runtime (workers/locks.py says who takes which key, and why).
-- Keys are text, hashed to Postgres's 64-bit advisory keys.

-- name: share_xact
SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 0));

-- name: take_xact
SELECT pg_advisory_xact_lock(hashtextextended($1, 0));

-- name: try_xact
SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0));

-- name: try_session
-- Held until released explicitly or until the session ends (a killed process's lock goes with it).
SELECT pg_try_advisory_lock(hashtextextended($1, 0));

-- name: release_session
SELECT pg_advisory_unlock(hashtextextended($1, 0));

-- name: held
-- Whether some session holds the advisory lock of key $1 (pg_locks splits the 64-bit key in two oids).
SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND objsubid = 1 AND granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0)
);
