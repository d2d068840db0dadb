//! What `webshop bench` fills its topic with: orders of 500 customers, every tenth a refund.

use std::time::{Duration, SystemTime};

use sluice_worker::{Record, Workload};

/// The shop's events, made up.
pub struct Orders;

impl Workload for Orders {
    fn records(
        &self,
        seed: u64,
        n: u64,
        live: Option<Duration>,
    ) -> Box<dyn Iterator<Item = Record> + Send> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let start = live.map_or(1_790_000_000, |_| now);
        Box::new((0..n).map(move |i| {
            let x = (i ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20;
            let (customer, kind) = (x % 500, if i % 10 == 9 { "refund" } else { "order" });
            let value = format!(
                r#"{{"type":"{kind}","order_id":"o{}","customer":"c{customer}","at":{},"items":{},"cents":{},"currency":"{}"}}"#,
                i - i % 10 / 9, start + i / 1000, 1 + x % 3, x % 9000, ["EUR", "USD", "GBP"][(x % 3) as usize]
            );
            Record { key: Some(format!("c{customer}").into_bytes()), value: value.into_bytes(), headers: Vec::new() }
        }))
    }
}
