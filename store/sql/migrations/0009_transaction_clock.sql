-- The store's transaction clock. read_all, the lag watermark, catch-up and rebuild order events by the id of
-- the transaction that wrote them (events.transaction_id) and read only below the oldest transaction still
-- running. Those ids are the Postgres cluster's own: a store restored from pg_dump into another cluster (a
-- backup restore, a move, a blue/green by logical replication) keeps the old cluster's ids while new appends
-- get the new cluster's, which may be far lower: every new event would sort before everything restored, and
-- the restored events would sit above the read horizon until the new cluster's counter caught up.
--
-- So the store reads the clock through three functions of its own, and its ids are the cluster's plus a
-- shift that store/clock.py moves forward (under the migrate lock) whenever the newest stored id is not
-- below the next id the cluster will hand out. A store that never moved has a shift of 0 and the functions
-- are exactly the cluster's (SQL functions without FROM are inlined by the planner: no cost per row).
-- shift_transaction_clock() rewrites them with the shift as a constant, so they stay inlinable.

CREATE TABLE transaction_clock (
    singleton  boolean     NOT NULL DEFAULT true,
    shift      bigint      NOT NULL DEFAULT 0,
    shifted_at timestamptz,
    -- The newest stored id and the cluster's next id when the clock was last shifted (for operators).
    found_newest text,
    found_next   text,
    CONSTRAINT transaction_clock_pkey PRIMARY KEY (singleton),
    CONSTRAINT transaction_clock_singleton_check CHECK (singleton),
    CONSTRAINT transaction_clock_shift_check CHECK (shift >= 0)
);

INSERT INTO transaction_clock (singleton) VALUES (true);

-- The id of the current transaction on the store's clock (assigns one if it has none, as pg_current_xact_id).
CREATE FUNCTION store_xact_id() RETURNS xid8 LANGUAGE sql VOLATILE
    AS $$ SELECT pg_current_xact_id() $$;

-- Every transaction below it has ended (the read horizon), on the store's clock.
CREATE FUNCTION store_xmin() RETURNS xid8 LANGUAGE sql STABLE
    AS $$ SELECT pg_snapshot_xmin(pg_current_snapshot()) $$;

-- The first id not yet handed out, on the store's clock.
CREATE FUNCTION store_xmax() RETURNS xid8 LANGUAGE sql STABLE
    AS $$ SELECT pg_snapshot_xmax(pg_current_snapshot()) $$;

ALTER TABLE events ALTER COLUMN transaction_id SET DEFAULT store_xact_id();

-- Move the clock forward by $1 more ids (the caller holds the migrate lock). The shift is a bigint, formatted
-- by Postgres itself into the functions' bodies; the functions are replaced in the schema they live in.
CREATE FUNCTION shift_transaction_clock(more bigint, newest xid8, next xid8) RETURNS bigint
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $fn$
DECLARE
    total bigint;
    here  text := quote_ident(current_schema());
BEGIN
    IF more <= 0 THEN
        RAISE EXCEPTION 'the transaction clock only moves forward (asked to move by %)', more;
    END IF;
    UPDATE transaction_clock SET shift = shift + more, shifted_at = clock_timestamp(),
                                 found_newest = newest::text, found_next = next::text
    RETURNING shift INTO total;
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %s.store_xact_id() RETURNS xid8 LANGUAGE sql VOLATILE
        AS 'SELECT (pg_current_xact_id()::text::bigint + %s)::text::xid8'$f$, here, total);
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %s.store_xmin() RETURNS xid8 LANGUAGE sql STABLE
        AS 'SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::bigint + %s)::text::xid8'$f$, here, total);
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %s.store_xmax() RETURNS xid8 LANGUAGE sql STABLE
        AS 'SELECT (pg_snapshot_xmax(pg_current_snapshot())::text::bigint + %s)::text::xid8'$f$, here, total);
    RETURN total;
END;
$fn$;
