-- The outbox is a queue: every row is deleted within moments of its insert. Postgres's default autovacuum
-- trigger (20% of the table dead) lets dead rows pile up at the head of its index between vacuums, and every
-- claim walks them. Vacuum and analyze it after a fixed number of changes instead, whatever its size.
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 1000
);
