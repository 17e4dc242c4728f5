-- How many deadlines each reactor has fired, for `eventfleet status`: a fired deadline is deleted, so its row
-- cannot be counted afterwards. Added to in the transaction that fires them (workers/sql/deadlines.sql).
ALTER TABLE projection_status ADD COLUMN deadlines_fired bigint NOT NULL DEFAULT 0;
