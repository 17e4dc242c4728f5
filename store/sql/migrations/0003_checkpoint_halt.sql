-- Checkpoint columns of the projection workers.
-- halted_version: a halted stream's checkpoint row carries the version a poison event stopped it at. The
-- worker reads it under the same row lock as the version, so halting and releasing a stream serialize
-- with the batches that touch it; the lag watermark may pass a halted stream's events (they are counted
-- separately), which keeps lag cheap while a stream waits for a fix.
-- previous_version: the version a batch found when it claimed the row (one statement locks the row and
-- moves it ahead; RETURNING shows only new values, and this one survives waiting for another worker).
ALTER TABLE checkpoints ADD COLUMN halted_version bigint;
ALTER TABLE checkpoints ADD COLUMN previous_version bigint NOT NULL DEFAULT -1;

CREATE INDEX checkpoints_halted_idx ON checkpoints (projection) WHERE halted_version IS NOT NULL;
