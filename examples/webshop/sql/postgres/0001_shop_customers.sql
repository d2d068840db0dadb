-- What each customer has ordered, refunded and spent (in euro cents).
CREATE TABLE IF NOT EXISTS shop_customers (
    customer        TEXT PRIMARY KEY,
    orders          BIGINT NOT NULL DEFAULT 0,
    refunds         BIGINT NOT NULL DEFAULT 0,
    spent_eur_cents BIGINT NOT NULL DEFAULT 0,
    first_order_at  TIMESTAMPTZ,
    last_order_at   TIMESTAMPTZ
);
