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
