-- The projector's checkpoint claim (workers/projector/checkpoints.py), a function of the schema: the costliest
-- statement of a worker's batch. As a statement it was planned anew on most batches (Postgres keeps custom plans
-- while its arrays are short: 264 us of planning on 1,802 of 2,928 calls in bench.pipeline's latency phase, more
-- than its execution), and a generic plan made while the store was small scanned the whole events table on every
-- batch after. Here the plan is made once per session, generic and without sequential scans (the settings
-- below hold inside the function only), the locks the batch takes first (its read models', shared: a rebuild's
-- swap takes one exclusively) are taken in the same call, and a worker group's combined batch claims for all
-- its read models at once: one round trip where there were 1 + one per read model. Each statement of a volatile
-- function reads a snapshot of its own, so the claim sees whatever a swap it waited for committed, as when the
-- lock was a statement of its own.
--
-- lock_keys: advisory keys (workers/locks.py) to take shared, in the order given, before the claim (a batch's, or
-- a worker group's combined batch's: the locks of all its read models, whose claims are this one call).
-- The claim: lock the batch's checkpoint rows in (read model, stream_id) order, so concurrent workers queue in one
-- order and never deadlock, and move each to the newest delivered version the store holds (unless halted or
-- already past it). Input: one row per delivered event and read model (readers, streams, versions, event_ids).
-- A delivered event the store does not hold at its stream and version under the same id is a ghost (published,
-- then lost with a primary by an asynchronous failover, or a store restored from an older backup): it never
-- moves a checkpoint, and its versions are returned (ghosts) for the caller to take from the store instead. The
-- row lock is taken on the latest committed row, also after waiting for another worker's batch, and
-- previous_version records where it was: the caller applies (previous_version, version] in this same
-- transaction, or rolls all of it back. A read model that handles some event names only (its pairs in
-- handled_readers, handled_names: Projection.handled_names(); a read model with none handles every event) has a
-- checkpoint that moves past the events it does not handle without their ever reaching it: for it, each stream's
-- handled store versions in (previous_version, version] are returned (handled), what this transaction must
-- apply, delivered or read from the store as gaps, however far apart they lie (one index range scan per stream).
CREATE FUNCTION claim_checkpoints(lock_keys text[], readers text[], streams text[], versions bigint[],
                                  event_ids uuid[], handled_readers text[], handled_names text[])
    RETURNS TABLE (projection text, stream_id text, previous_version bigint, version bigint, halted_version bigint,
                   ghosts bigint[], handled bigint[])
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
        SELECT d.reader, d.stream_id, d.version, coalesce(e.event_id = d.event_id, false) AS stored
        FROM unnest(readers, streams, versions, event_ids) AS d(reader, stream_id, version, event_id)
        LEFT JOIN events AS e ON e.stream_id = d.stream_id AND e.version = d.version
    ), targets AS (
        SELECT reader, stream_id, coalesce(max(version) FILTER (WHERE stored), -1) AS version,
               array_agg(version ORDER BY version) FILTER (WHERE NOT stored) AS ghosts
        FROM delivered
        GROUP BY reader, stream_id
    ), claimed AS (
        INSERT INTO checkpoints AS c (projection, stream_id, version, previous_version)
        SELECT t.reader, t.stream_id, t.version, -1
        FROM targets AS t
        ORDER BY t.reader, t.stream_id
        ON CONFLICT ON CONSTRAINT checkpoints_pkey DO UPDATE
            SET previous_version = c.version,
                version = CASE WHEN c.halted_version IS NULL THEN greatest(c.version, EXCLUDED.version)
                               ELSE c.version END,
                updated_at = clock_timestamp()
        RETURNING c.projection, c.stream_id, c.previous_version, c.version, c.halted_version
    ), filters AS (
        SELECT f.reader, array_agg(f.name) AS names
        FROM unnest(handled_readers, handled_names) AS f(reader, name)
        GROUP BY f.reader
    )
    SELECT c.projection, c.stream_id, c.previous_version, c.version, c.halted_version, t.ghosts,
           CASE WHEN f.names IS NOT NULL THEN ARRAY(
               SELECT e.version FROM events AS e
               WHERE e.stream_id = c.stream_id AND e.version > c.previous_version AND e.version <= c.version
                 AND split_part(e.event_type, '.v', 1) = ANY(f.names)
               ORDER BY e.version) END AS handled
    FROM claimed AS c
    JOIN targets AS t ON t.reader = c.projection AND t.stream_id = c.stream_id
    LEFT JOIN filters AS f ON f.reader = c.projection;
END;
$fn$;
