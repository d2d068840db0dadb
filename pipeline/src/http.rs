//! The worker's HTTP endpoints: `/health` (liveness), `/ready` (partitions assigned and sinks
//! reachable) and `/metrics` (Prometheus text format).

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::lifecycle::Health;
use crate::metrics as m;

/// Installs the process-wide Prometheus recorder (once per process) and returns the handle
/// that renders `/metrics`.
pub fn install_prometheus() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(m::FLUSH_SECONDS.into()),
            m::FLUSH_SECONDS_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(m::SPAN_RECORD_SECONDS.into()),
            m::FLUSH_SECONDS_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Full(m::BATCH_SIZE.into()), m::BATCH_SIZE_BUCKETS)?
        // Summaries (record ages) over the last five minutes, not the exporter's default one.
        .set_bucket_duration(std::time::Duration::from_secs(60))?
        .set_bucket_count(std::num::NonZeroU32::new(5).expect("non-zero"))
        .install_recorder()?;
    // Histograms are folded into their buckets on upkeep; do it regularly.
    let upkeep = handle.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(5));
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

#[derive(Clone)]
struct AppState {
    health: Health,
    metrics: Option<PrometheusHandle>,
}

/// The endpoints as a router (for embedding, or for tests).
pub fn router(health: Health, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .with_state(AppState { health, metrics })
}

async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let reasons = state.health.not_ready_reasons();
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join("; ")),
        )
    }
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    let body = state
        .metrics
        .as_ref()
        .map(PrometheusHandle::render)
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// Serves the endpoints on `addr` in a background task (it keeps answering while the pipeline
/// drains; abort the returned task to stop it). Returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    metrics: Option<PrometheusHandle>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = router(health, metrics);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "health/metrics server failed");
        }
    });
    tracing::info!(%local, "serving /health, /ready and /metrics");
    Ok((local, task))
}
