-- The relay's own reads besides the outbox's (store/sql/outbox.sql). Unqualified: the deployment's schema.

-- name: partitions
-- P of the schema (recorded at its first migrate): the partition queues the relay declares and routes to.
SELECT partitions FROM partitioning;
