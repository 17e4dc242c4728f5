-- The projector's checkpoint claim (workers/projector/checkpoints.py), a function of the schema: the costliest
-- statement of a worker's batch. As a statement it was planned anew on most batches (Postgres keeps custom plans
-- while its arrays are short: 264 us of planning on 1,802 of 2,928 calls in bench.pipeline's latency phase, more
-- than its execution), and a generic plan made while the store was small scanned the whole events table on every
-- batch after. Here the plan is made once per session, generic and without sequential scans (the settings
-- below hold inside the function only), and the lock the batch takes first (its read model's, shared: a rebuild's
-- swap takes it exclusively) is taken in the same call: one round trip for both. Each statement of a volatile
-- function reads a snapshot of its own, so the claim sees whatever a swap it waited for committed, as when the
-- lock was a statement of its own.
--
-- lock_keys: advisory keys (workers/locks.py) to take shared, in the order given, before the claim (the first
-- claim of a transaction takes its batch's; the others none).
-- The claim: lock the batch's checkpoint rows in stream_id order, so concurrent workers queue in one order and
-- never deadlock, and move each to the newest delivered version the store holds (unless halted or already past
-- it). Input: one row per delivered event (delivered_streams, delivered_versions, delivered_ids). A delivered
-- event the store does not hold at its stream and version under the same id is a ghost (published, then lost
-- with a primary by an asynchronous failover, or a store restored from an older backup): it never moves a
-- checkpoint, and its versions are returned (ghosts) for the caller to take from the store instead. The row lock
-- is taken on the latest committed row, also after waiting for another worker's batch, and previous_version
-- records where it was: the caller applies (previous_version, version] in this same transaction, or rolls all of
-- it back. A read model that handles the event names handled_names only (Projection.handled_names(); NULL: every
-- event) has a checkpoint that moves past the events it does not handle without their ever reaching it: for it,
-- each stream's handled store versions in (previous_version, version] are returned (handled), what this
-- transaction must apply, delivered or read from the store as gaps, however far apart they lie (one index range
-- scan per stream).
CREATE FUNCTION claim_checkpoints(lock_keys text[], reader text, delivered_streams text[], delivered_versions bigint[],
                                  delivered_ids uuid[], handled_names text[])
    RETURNS TABLE (stream_id text, previous_version bigint, version bigint, halted_version bigint, ghosts bigint[],
                   handled bigint[])
    LANGUAGE plpgsql VOLATILE
    SET search_path FROM CURRENT
    SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off
AS $fn$
#variable_conflict use_column
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtextextended(k, 0))
    FROM unnest(lock_keys) WITH ORDINALITY AS u(k, i)
    ORDER BY i;
    RETURN QUERY
    WITH delivered AS (
        SELECT d.stream_id, d.version, coalesce(e.event_id = d.event_id, false) AS stored
        FROM unnest(delivered_streams, delivered_versions, delivered_ids) AS d(stream_id, version, event_id)
        LEFT JOIN events AS e ON e.stream_id = d.stream_id AND e.version = d.version
    ), targets AS (
        SELECT stream_id, coalesce(max(version) FILTER (WHERE stored), -1) AS version,
               array_agg(version ORDER BY version) FILTER (WHERE NOT stored) AS ghosts
        FROM delivered
        GROUP BY stream_id
    ), claimed AS (
        INSERT INTO checkpoints AS c (projection, stream_id, version, previous_version)
        SELECT reader, t.stream_id, t.version, -1
        FROM targets AS t
        ORDER BY t.stream_id
        ON CONFLICT ON CONSTRAINT checkpoints_pkey DO UPDATE
            SET previous_version = c.version,
                version = CASE WHEN c.halted_version IS NULL THEN greatest(c.version, EXCLUDED.version)
                               ELSE c.version END,
                updated_at = clock_timestamp()
        RETURNING c.stream_id, c.previous_version, c.version, c.halted_version
    )
    SELECT c.stream_id, c.previous_version, c.version, c.halted_version, t.ghosts,
           CASE WHEN handled_names IS NOT NULL THEN ARRAY(
               SELECT e.version FROM events AS e
               WHERE e.stream_id = c.stream_id AND e.version > c.previous_version AND e.version <= c.version
                 AND split_part(e.event_type, '.v', 1) = ANY(handled_names)
               ORDER BY e.version) END AS handled
    FROM claimed AS c
    JOIN targets AS t USING (stream_id);
END;
$fn$;
