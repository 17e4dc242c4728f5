-- Leases of partitions (workers/projector/leases.py). Unqualified names resolve in the deployment's schema.
-- Every tick of every worker runs in one transaction holding the schema's lease lock, so the fair shares
-- are computed from one consistent view and two workers never claim the same free partition at once.

-- name: heartbeat
-- Register or refresh this worker ($1) running projections $2; its registration lives $3 seconds.
INSERT INTO workers AS w (worker_id, projections, expires_at)
VALUES ($1, $2::text[], clock_timestamp() + make_interval(secs => $3))
ON CONFLICT (worker_id) DO UPDATE
    SET projections = EXCLUDED.projections, heartbeat_at = clock_timestamp(), expires_at = EXCLUDED.expires_at;

-- name: forget_dead
-- Registrations expired longer than a lease ago: their leases have expired too, and they hold no share.
DELETE FROM workers WHERE expires_at < clock_timestamp() - make_interval(secs => $1);

-- name: live_workers
-- The live workers running projection $1, in the order the shares are dealt.
SELECT worker_id FROM workers
WHERE $1 = ANY(projections) AND expires_at > clock_timestamp()
ORDER BY started_at, worker_id;

-- name: renew
-- Extend this worker's ($1) unexpired leases of projection $2 by $3 seconds; return the partitions held.
UPDATE leases SET expires_at = clock_timestamp() + make_interval(secs => $3)
WHERE owner = $1 AND projection = $2 AND expires_at > clock_timestamp()
RETURNING partition;

-- name: claim
-- Take up to $4 partitions of projection $2 (P = $5) that nobody holds (never leased, released, or expired)
-- for worker $1, for $3 seconds; return them with their new generation.
WITH wanted AS (
    SELECT p AS partition FROM generate_series(0, $5 - 1) AS p
    WHERE NOT EXISTS (SELECT 1 FROM leases AS l
                      WHERE l.projection = $2 AND l.partition = p
                        AND l.owner IS NOT NULL AND l.expires_at > clock_timestamp())
    ORDER BY p
    LIMIT $4
)
INSERT INTO leases AS l (projection, partition, owner, expires_at, acquired_at, generation)
SELECT $2, partition, $1, clock_timestamp() + make_interval(secs => $3), clock_timestamp(), 1 FROM wanted
ON CONFLICT (projection, partition) DO UPDATE
    SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at, acquired_at = EXCLUDED.acquired_at,
        generation = l.generation + 1, held = NULL
RETURNING partition, generation;

-- name: release
-- Give up this worker's ($1) leases of projection $2 on partitions $3: free for the others at once.
UPDATE leases SET owner = NULL, expires_at = '-infinity', held = NULL
WHERE owner = $1 AND projection = $2 AND partition = ANY($3::integer[]);

-- name: release_all
-- A worker leaving: free every lease it holds and end its registration.
WITH freed AS (
    UPDATE leases SET owner = NULL, expires_at = '-infinity', held = NULL WHERE owner = $1 RETURNING 1
)
DELETE FROM workers WHERE worker_id = $1;

-- name: hold
-- Why this worker ($1) holds partition $3 of projection $2 still (an event newer than its code): for status.
UPDATE leases SET held = $4 WHERE owner = $1 AND projection = $2 AND partition = $3;

-- name: owners
-- Every lease with its owner and whether it is live (status), and why its owner holds it, if it does.
SELECT l.projection, l.partition, l.owner, l.expires_at > clock_timestamp() AS live, l.generation, l.held,
       CASE WHEN l.owner IS NULL THEN 0
            ELSE extract(epoch FROM l.expires_at - clock_timestamp())::float8 END AS expires_in_seconds
FROM leases AS l
ORDER BY l.projection, l.partition;

-- name: registered
-- Every registered worker with its heartbeat's age and whether it is live (status).
SELECT worker_id, projections, extract(epoch FROM clock_timestamp() - heartbeat_at)::float8 AS heartbeat_age_seconds,
       expires_at > clock_timestamp() AS live
FROM workers
ORDER BY started_at, worker_id;

-- name: groups
-- The worker groups whose partitions were leased (leases.projection 'group:<name>', workers.broker.group_lease).
SELECT DISTINCT substr(projection, 7) AS grp FROM leases WHERE starts_with(projection, 'group:') ORDER BY 1;
