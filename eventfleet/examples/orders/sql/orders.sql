-- The orders read models. Unqualified names: the search_path picks the live or the shadow schema.

-- name: order_summary_ddl
-- Idempotent DDL of order_summary.
CREATE TABLE IF NOT EXISTS order_summary (
    order_id    text        NOT NULL,
    customer_id text        NOT NULL,
    status      text        NOT NULL,
    item_count  integer     NOT NULL,
    total       numeric     NOT NULL,
    placed_at   timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    CONSTRAINT order_summary_pkey PRIMARY KEY (order_id),
    CONSTRAINT order_summary_status_check CHECK (status IN ('placed', 'paid', 'shipped', 'cancelled'))
);

-- name: customer_stats_ddl
-- Idempotent DDL of customer_stats.
CREATE TABLE IF NOT EXISTS customer_stats (
    customer_id      text    NOT NULL,
    orders_placed    integer NOT NULL DEFAULT 0,
    orders_cancelled integer NOT NULL DEFAULT 0,
    total_spent      numeric NOT NULL DEFAULT 0,
    CONSTRAINT customer_stats_pkey PRIMARY KEY (customer_id)
);

-- name: summary_placed
-- Insert the order's row; a replay of the same event writes the same values.
INSERT INTO order_summary AS s (order_id, customer_id, status, item_count, total, placed_at, updated_at)
VALUES ($1, $2, 'placed', $3, $4, $5, $5)
ON CONFLICT (order_id) DO UPDATE
    SET customer_id = EXCLUDED.customer_id, item_count = EXCLUDED.item_count, total = EXCLUDED.total,
        placed_at = EXCLUDED.placed_at;

-- name: summary_status
-- Move the order to a new status (the events of one stream arrive in version order).
UPDATE order_summary SET status = $2, updated_at = $3 WHERE order_id = $1;

-- name: stats_placed
-- Count a placed order.
INSERT INTO customer_stats AS c (customer_id, orders_placed) VALUES ($1, 1)
ON CONFLICT (customer_id) DO UPDATE SET orders_placed = c.orders_placed + 1;

-- name: stats_cancelled
-- Count a cancelled order.
INSERT INTO customer_stats AS c (customer_id, orders_cancelled) VALUES ($1, 1)
ON CONFLICT (customer_id) DO UPDATE SET orders_cancelled = c.orders_cancelled + 1;

-- name: stats_paid
-- Add a payment to the customer's spending.
INSERT INTO customer_stats AS c (customer_id, total_spent) VALUES ($1, $2)
ON CONFLICT (customer_id) DO UPDATE SET total_spent = c.total_spent + EXCLUDED.total_spent;

-- name: summary_placed_batch
-- summary_placed for many orders at once (distinct order ids), rows locked in order_id order.
INSERT INTO order_summary AS s (order_id, customer_id, status, item_count, total, placed_at, updated_at)
SELECT u.order_id, u.customer_id, 'placed', u.item_count, u.total, u.placed_at, u.placed_at
FROM unnest($1::text[], $2::text[], $3::integer[], $4::numeric[], $5::timestamptz[])
    AS u(order_id, customer_id, item_count, total, placed_at)
ORDER BY u.order_id
ON CONFLICT (order_id) DO UPDATE
    SET customer_id = EXCLUDED.customer_id, item_count = EXCLUDED.item_count, total = EXCLUDED.total,
        placed_at = EXCLUDED.placed_at;

-- name: summary_status_batch
-- summary_status for many orders at once: each order's last new status (distinct order ids).
UPDATE order_summary AS s SET status = u.status, updated_at = u.updated_at
FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS u(order_id, status, updated_at)
WHERE s.order_id = u.order_id;

-- name: stats_batch
-- The increments of a whole batch, summed per customer, in one statement; rows locked in customer_id order
-- so that workers sharing customers never deadlock.
INSERT INTO customer_stats AS c (customer_id, orders_placed, orders_cancelled, total_spent)
SELECT u.customer_id, u.placed, u.cancelled, u.spent
FROM unnest($1::text[], $2::integer[], $3::integer[], $4::numeric[]) AS u(customer_id, placed, cancelled, spent)
ORDER BY u.customer_id
ON CONFLICT (customer_id) DO UPDATE
    SET orders_placed = c.orders_placed + EXCLUDED.orders_placed,
        orders_cancelled = c.orders_cancelled + EXCLUDED.orders_cancelled,
        total_spent = c.total_spent + EXCLUDED.total_spent;
