-- The event types each read model's tables and checkpoints were built with, and the types the code of each
-- worker running it handles (workers/rebuild/typebook.py). A release that adds a type to a read model finds the
-- read model's past events of that type behind its checkpoints, never applied: the read model is rebuilt from
-- the store with the new code once no worker of other code runs it, and only then records the new types.

CREATE TABLE read_model_types (
    projection text        NOT NULL,
    -- The event names (any version) every event of which behind the checkpoints was applied; NULL: every event.
    handled    text[],
    -- The read-model tables of the code that last registered it: `retire --drop-tables` drops these.
    tables     text[]      NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT read_model_types_pkey PRIMARY KEY (projection)
);

-- One row per worker process and read model it runs: the names its code handles (NULL: every event), when it
-- started and when it last said it runs (refreshed every few seconds). Kept after the worker stops, until a
-- rebuild with other code has settled without it: a worker that applied the read model with fewer types while
-- the rebuild ran must not go unnoticed.
CREATE TABLE read_model_workers (
    worker_id  text        NOT NULL,
    projection text        NOT NULL,
    handled    text[],
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    seen_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT read_model_workers_pkey PRIMARY KEY (worker_id, projection)
);

CREATE INDEX read_model_workers_projection_idx ON read_model_workers (projection, seen_at);
