-- The event types of read models (workers/rebuild/typebook.py): what each read model was built with
-- (read_model_types) and what the code of each worker running it handles (read_model_workers). Arrays of names
-- are sorted; NULL stands for every event.

-- name: insert_types
-- A read model seen for the first time: built with the types of the code registering it ($2), its tables $3.
INSERT INTO read_model_types (projection, handled, tables) VALUES ($1, $2::text[], $3::text[])
ON CONFLICT (projection) DO NOTHING
RETURNING projection;

-- name: lock_types
-- The types a read model was built with, its row locked until the transaction ends (registrations and
-- settlements of one read model take turns).
SELECT handled FROM read_model_types WHERE projection = $1 FOR UPDATE;

-- name: set_types
UPDATE read_model_types SET handled = $2::text[], tables = $3::text[], updated_at = clock_timestamp()
WHERE projection = $1;

-- name: register_worker
-- Worker $1 runs read model $2 with code handling $3.
INSERT INTO read_model_workers AS r (worker_id, projection, handled) VALUES ($1, $2, $3::text[])
ON CONFLICT (worker_id, projection) DO UPDATE SET handled = EXCLUDED.handled, seen_at = clock_timestamp();

-- name: refresh_worker
-- Worker $1 still runs its read models.
UPDATE read_model_workers SET seen_at = clock_timestamp() WHERE worker_id = $1;

-- name: forget_workers
-- Rows of workers gone (no registration left, silent for $1 seconds) whose code handled every type the read
-- model's tables were built with: they cannot have skipped an event the tables claim, so nothing needs them.
DELETE FROM read_model_workers AS r
USING read_model_types AS t
WHERE t.projection = r.projection
  AND r.seen_at < clock_timestamp() - make_interval(secs => $1)
  AND NOT EXISTS (SELECT 1 FROM workers AS w WHERE w.worker_id = r.worker_id)
  AND (r.handled IS NULL OR (t.handled IS NOT NULL AND r.handled @> t.handled));

-- name: since
-- The database's clock $1 seconds ago.
SELECT clock_timestamp() - make_interval(secs => $1);

-- name: other_code
-- The workers running read model $1 with code other than $2 seen after $3, and the registered workers running it
-- that never said what their code handles (a release before these tables: unknown is other).
SELECT r.worker_id, r.handled, false AS unknown FROM read_model_workers AS r
WHERE r.projection = $1 AND r.handled IS DISTINCT FROM $2::text[] AND r.seen_at > $3
UNION ALL
SELECT w.worker_id, NULL, true FROM workers AS w
WHERE $1 = ANY(w.projections)
  AND NOT EXISTS (SELECT 1 FROM read_model_workers AS r WHERE r.worker_id = w.worker_id AND r.projection = $1)
ORDER BY worker_id;

-- name: forget_settled
-- After read model $1 settled at $2: the rows of gone workers of other code, silent since before the rebuild.
DELETE FROM read_model_workers AS r
WHERE r.projection = $1 AND r.seen_at <= $2
  AND NOT EXISTS (SELECT 1 FROM workers AS w WHERE w.worker_id = r.worker_id);

-- name: all_types
-- Every read model's recorded types and tables (status, retire).
SELECT projection, handled, tables FROM read_model_types ORDER BY projection;

-- name: live_codes
-- What the code of each live worker handles, per read model (status): workers silent for less than $1 seconds.
SELECT DISTINCT r.projection, r.handled FROM read_model_workers AS r
WHERE r.seen_at > clock_timestamp() - make_interval(secs => $1)
ORDER BY r.projection;

-- name: built
-- The recorded types of read models $1.
SELECT projection, handled FROM read_model_types WHERE projection = ANY($1::text[]);
