//! The pipeline: decode → amounts in euros (a custom operator) → `shop_orders` in ClickHouse
//! and `shop_customers` in PostgreSQL.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sluice_worker::{
    BoxError, ConfigError, Decoded, KafkaRecord, Operator, Settings, Sourced, TableReducer, Wiring,
    invalid,
};

/// `[shop]`: what one unit of each accepted currency is worth in euros.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Shop {
    euros_per: BTreeMap<String, f64>,
}

impl Settings for Shop {
    const SECTION: &'static str = "shop";

    fn validate(&self) -> Result<(), ConfigError> {
        match self.euros_per.is_empty() {
            true => Err(invalid("shop.euros_per", "names no currency")),
            false => Ok(()),
        }
    }
}

/// An order or a refund as the shop sends it (`type`, `at`), and its row of `shop_orders`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, clickhouse::Row)]
pub struct Order {
    order_id: String,
    customer: String,
    #[serde(rename(deserialize = "type"))]
    kind: String,
    #[serde(rename(deserialize = "at"))]
    placed_at: u32,
    #[serde(default)]
    items: u32,
    /// In `currency`; negative for a refund once decoded.
    cents: i64,
    currency: String,
    /// Set by `ToEuros`.
    #[serde(default)]
    eur_cents: i64,
}

/// The row of a record, or why it has none (a short reason and the detail).
fn decode(record: &KafkaRecord, shop: &Shop) -> Result<Order, (&'static str, String)> {
    let value = record.value.as_deref().unwrap_or_default();
    let mut order: Order =
        serde_json::from_slice(value).map_err(|e| ("invalid_event", e.to_string()))?;
    match order.kind.as_str() {
        "order" => {}
        "refund" => order.cents = -order.cents,
        other => return Err(("unknown_type", format!("type `{other}`"))),
    }
    if !shop.euros_per.contains_key(&order.currency) {
        return Err((
            "unknown_currency",
            format!("no rate for {}", order.currency),
        ));
    }
    Ok(order)
}

/// The custom operator: every amount in euro cents too, at the configured rates.
struct ToEuros(BTreeMap<String, f64>);

impl Operator for ToEuros {
    type In = Sourced<Order>;
    type Out = Sourced<Order>;

    fn process(&mut self, input: Vec<Self::In>, out: &mut Vec<Self::Out>) -> Result<(), BoxError> {
        for mut o in input {
            let rate = self.0.get(&o.item.currency).ok_or("no rate")?;
            o.item.eur_cents = (o.item.cents as f64 * rate).round() as i64;
            out.push(o);
        }
        Ok(())
    }
}

/// A customer's row of `shop_customers` (but the key).
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct Customer {
    orders: i64,
    refunds: i64,
    spent_eur_cents: i64,
}

/// Orders and refunds folded into their customer's row.
struct Customers;

impl TableReducer for Customers {
    type Event = Order;
    type Key = String;
    type State = Customer;
    const TABLE: &'static str = "shop_customers";
    const KEY: &'static str = "customer";

    fn key(&self, order: &Order) -> String {
        order.customer.clone()
    }

    fn fold(&self, c: &mut Customer, order: &Order) {
        let refund = order.kind == "refund";
        c.orders += i64::from(!refund);
        c.refunds += i64::from(refund);
        c.spent_eur_cents += order.eur_cents;
    }
}

/// The graph: decode, euros, then both stores.
pub fn build(w: &mut Wiring<Shop>) -> Result<(), BoxError> {
    let shop = w.settings().clone();
    let mut decoder = w.decode("decode")?;
    let (orders, rows) = decoder.output::<Order>("orders");
    let rates = shop.clone();
    decoder.run(move || {
        let shop = rates.clone();
        move |record: KafkaRecord, out: &mut Decoded| match decode(&record, &shop) {
            Ok(order) => out.push(&orders, order),
            Err((reason, error)) => out.dead_letter(record, "decode", reason, error),
        }
    });
    let rows = rows.apply("to_euros", move || ToEuros(shop.euros_per.clone()));
    let [to_clickhouse, to_postgres] =
        <[_; 2]>::try_from(rows.fan_out("orders.both", 2)).map_err(|_| "two branches")?;
    w.into_clickhouse(to_clickhouse, "shop_orders")?;
    w.reduce_into_postgres(to_postgres, "shop_customers", Customers)?;
    Ok(())
}
