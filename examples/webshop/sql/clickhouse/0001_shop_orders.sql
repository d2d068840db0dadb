-- One row per order or refund event. Repeated inserts of a batch (after a crash) are dropped
-- by their deduplication token: the table keeps the last 10,000 inserts' tokens.
CREATE TABLE IF NOT EXISTS shop_orders (
    order_id   String,
    customer   String,
    kind       LowCardinality(String),
    placed_at  DateTime,
    items      UInt32,
    cents      Int64,
    currency   LowCardinality(String),
    eur_cents  Int64
) ENGINE = MergeTree
PARTITION BY toYYYYMM(placed_at)
ORDER BY (placed_at, order_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- Revenue per day, kept by a materialised view. Its table deduplicates too: a batch inserted
-- again reaches the view again, and must not count twice.
CREATE TABLE IF NOT EXISTS shop_daily_revenue (
    day        Date,
    orders     UInt64,
    refunds    UInt64,
    eur_cents  Int64
) ENGINE = SummingMergeTree
ORDER BY day
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS shop_daily_revenue_mv TO shop_daily_revenue AS
SELECT toDate(placed_at) AS day, countIf(kind = 'order') AS orders,
       countIf(kind = 'refund') AS refunds, sum(eur_cents) AS eur_cents
FROM shop_orders GROUP BY day;
