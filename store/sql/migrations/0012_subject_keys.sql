-- Per-subject data keys of personal fields (store/subject_keys.py, store/codec/cipher.py). One AES-256 data
-- key per subject, stored wrapped (AES-GCM) by the deployment's key-encryption key kek_id (EVENTFLEET_KEK or
-- EVENTFLEET_KEK_FILE), which never reaches the database. Created on a subject's first personal value
-- (INSERT ... ON CONFLICT DO NOTHING, then read: racing writers agree on one key). Forgetting a subject sets
-- kek_id and wrapped_key to NULL and forgotten_at: the key is gone, so its personal values in events and
-- snapshots decode to their erased values; the row stays as a tombstone, so the subject never gets a new key
-- (and a process's cache may remember "forgotten" for good).

CREATE TABLE subject_keys (
    subject      text        NOT NULL,
    kek_id       text,
    wrapped_key  bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    forgotten_at timestamptz,
    CONSTRAINT subject_keys_pkey PRIMARY KEY (subject),
    CONSTRAINT subject_keys_key_or_tombstone_check CHECK (
        (kek_id IS NULL) = (wrapped_key IS NULL) AND (wrapped_key IS NULL) = (forgotten_at IS NOT NULL))
);
