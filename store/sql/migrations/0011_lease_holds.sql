-- Why a partition's owner holds it still: an event of a type or version newer than the owner's code (written by
-- a newer release during a rolling upgrade). Set by the owner, cleared when the lease changes hands; `status`
-- shows it. Nothing is parked: the partition waits, unacked, for a worker of the newer release.
ALTER TABLE leases ADD COLUMN held text;
