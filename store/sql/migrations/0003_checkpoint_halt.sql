-- A halted stream: the checkpoint row carries the version a poison event stopped it at.
-- The worker reads it under the same row lock as the version, so halting and releasing a stream
-- serialize with the batches that touch it; the lag watermark may pass a halted stream's events
-- (they are counted separately), which keeps lag cheap while a stream waits for a fix.
ALTER TABLE checkpoints ADD COLUMN halted_version bigint;

CREATE INDEX checkpoints_halted_idx ON checkpoints (projection) WHERE halted_version IS NOT NULL;
