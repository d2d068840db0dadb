-- What each customer has ordered, refunded and spent (in euro cents). A customer seen for the
-- first time gets a row with its key alone: every other column has a default.
CREATE TABLE IF NOT EXISTS shop_customers (
    customer        TEXT PRIMARY KEY,
    orders          BIGINT NOT NULL DEFAULT 0,
    refunds         BIGINT NOT NULL DEFAULT 0,
    spent_eur_cents BIGINT NOT NULL DEFAULT 0
);
