//! Capped exponential backoff with jitter for transient sink failures.

use std::sync::Arc;
use std::time::Duration;

use crate::error::{PipelineError, SinkError};
use crate::lifecycle::Health;

/// How a sink retries transient failures.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Delay before the first retry.
    pub initial_backoff: Duration,
    /// Upper bound of the delay between attempts.
    pub max_backoff: Duration,
    /// Retries after the first attempt; `None` retries without limit (an outage is ridden out).
    pub max_retries: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            max_retries: None,
        }
    }
}

impl RetryPolicy {
    /// Whether another retry is allowed after `retries` retries.
    pub fn allows(&self, retries: u32) -> bool {
        self.max_retries.is_none_or(|max| retries < max)
    }

    /// The delay before retry number `retry` (0-based): doubling from `initial_backoff`, capped
    /// at `max_backoff`, with "equal jitter" (between half and all of it) so that parallel
    /// writers do not retry in lockstep.
    pub fn backoff(&self, retry: u32) -> Duration {
        let base = self
            .initial_backoff
            .saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX))
            .min(self.max_backoff);
        let half = base / 2;
        half + half.mul_f64(jitter_fraction())
    }
}

/// The retry state of one operation of a stage (a sink write, a span-log call): call
/// [`Attempts::failed`] on each error, [`Attempts::succeeded`] once it works.
pub(crate) struct Attempts<'a> {
    stage: &'a Arc<str>,
    what: &'static str,
    policy: &'a RetryPolicy,
    health: &'a Health,
    retries: u32,
}

impl<'a> Attempts<'a> {
    pub(crate) fn new(
        stage: &'a Arc<str>,
        what: &'static str,
        policy: &'a RetryPolicy,
        health: &'a Health,
    ) -> Self {
        Self {
            stage,
            what,
            policy,
            health,
            retries: 0,
        }
    }

    /// Waits the backoff when `err` is transient and the policy allows another retry (the
    /// stage is reported failing meanwhile); otherwise gives up with the error.
    pub(crate) async fn failed(&mut self, err: SinkError) -> Result<(), PipelineError> {
        if !(err.is_transient() && self.policy.allows(self.retries)) {
            return Err(PipelineError::Sink {
                stage: self.stage.clone(),
                attempts: self.retries + 1,
                source: err,
            });
        }
        metrics::counter!(crate::metrics::STAGE_ERRORS, "stage" => self.stage.to_string())
            .increment(1);
        self.health.set_failing_with(self.stage, &err);
        let wait = self.policy.backoff(self.retries);
        tracing::warn!(stage = %self.stage, op = self.what, retry = self.retries + 1, wait_ms = wait.as_millis() as u64, error = %err, "failed; retrying");
        tokio::time::sleep(wait).await;
        self.retries += 1;
        Ok(())
    }

    /// Clears the failing state after retries.
    pub(crate) fn succeeded(self) {
        if self.retries > 0 {
            self.health.set_failing(self.stage, false);
            tracing::info!(stage = %self.stage, op = self.what, retries = self.retries, "succeeded after retries");
        }
    }
}

/// A number in [0, 1) that differs between calls and threads; not for cryptography.
fn jitter_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps_with_jitter_in_upper_half() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_retries: Some(3),
        };
        for (retry, base_ms) in [
            (0, 100u64),
            (1, 200),
            (2, 400),
            (3, 800),
            (4, 1000),
            (40, 1000),
        ] {
            let d = p.backoff(retry);
            let base = Duration::from_millis(base_ms);
            assert!(
                d >= base / 2 && d <= base,
                "retry {retry}: {d:?} not within [{:?}, {base:?}]",
                base / 2
            );
        }
        assert!(p.allows(2));
        assert!(!p.allows(3));
        assert!(RetryPolicy::default().allows(u32::MAX));
    }
}
