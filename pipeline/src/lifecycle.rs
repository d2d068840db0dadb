//! Shutdown and readiness: the signals a running pipeline shares between its stages, the HTTP
//! endpoints and the process.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Asks a pipeline to stop: the source stops fetching, every stage flushes, offsets are
/// committed. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A shutdown that has not been requested.
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    /// Requests the shutdown (idempotent).
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether shutdown was requested.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once shutdown is requested.
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail while we hold it.
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// Triggers `shutdown` on the first SIGINT or SIGTERM; a second one exits the process at once
/// (status 130) without flushing or committing.
pub fn shutdown_on_signals(shutdown: Shutdown) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(
            "shutdown requested: stopping fetch, flushing sinks, committing offsets (signal again to exit at once)"
        );
        shutdown.trigger();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without flushing");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the pipeline");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Liveness and readiness of a pipeline, as served on `/health` and `/ready`.
#[derive(Clone, Debug, Default)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Debug, Default)]
struct HealthInner {
    assigned: AtomicBool,
    stopping: AtomicBool,
    /// Failing components and, where known, why (the last error).
    failing: Mutex<BTreeMap<String, Option<String>>>,
}

impl Health {
    /// A new health state: not ready until partitions are assigned.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records whether the source holds partitions.
    pub fn set_assigned(&self, assigned: bool) {
        self.inner.assigned.store(assigned, Ordering::Relaxed);
    }

    /// Records that the pipeline is shutting down.
    pub fn set_stopping(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
    }

    /// Marks a component (a sink, a connection) as failing or recovered.
    pub fn set_failing(&self, component: &str, failing: bool) {
        let mut map = self.inner.failing.lock().unwrap_or_else(|p| p.into_inner());
        if failing {
            if !map.contains_key(component) {
                map.insert(component.to_owned(), None);
            }
        } else {
            map.remove(component);
        }
    }

    /// Marks a component as failing with `error`, which `/ready` shows beside its name (an
    /// operator sees which server refuses, not only which stage waits).
    pub fn set_failing_with(&self, component: &str, error: &dyn std::fmt::Display) {
        let mut map = self.inner.failing.lock().unwrap_or_else(|p| p.into_inner());
        let text = error.to_string();
        match map.get_mut(component) {
            Some(cause) => *cause = Some(text),
            None => {
                map.insert(component.to_owned(), Some(text));
            }
        }
    }

    /// Ready: partitions assigned, every sink reachable, not shutting down.
    pub fn is_ready(&self) -> bool {
        self.not_ready_reasons().is_empty()
    }

    /// Why the pipeline is not ready (empty when it is).
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if !self.inner.assigned.load(Ordering::Relaxed) {
            reasons.push("no partitions assigned".to_owned());
        }
        if self.inner.stopping.load(Ordering::Relaxed) {
            reasons.push("shutting down".to_owned());
        }
        let failing = self.inner.failing.lock().unwrap_or_else(|p| p.into_inner());
        reasons.extend(failing.iter().map(|(c, cause)| match cause {
            Some(cause) => format!("{c} failing: {cause}"),
            None => format!("{c} failing"),
        }));
        reasons
    }
}
