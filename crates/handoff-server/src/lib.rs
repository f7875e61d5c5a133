//! Handoff's HTTP server: the ingest API (Segment HTTP Tracking API), health, readiness and
//! metrics. The binary builds an [`AppState`] and calls [`serve`].

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use handoff_store::Journal;

pub mod auth_http;
pub mod delivery;
pub mod delivery_http;
pub mod error;
pub mod ingest;
pub mod keys;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod oauth;
pub mod policy_http;
pub mod privacy;
pub mod privacy_http;
pub mod retention;
pub mod sources;
pub mod supervisor;
pub mod tls;

pub use error::ApiError;
pub use metrics::Metrics;
pub use sources::SourceKeys;

/// Everything a request handler needs.
pub struct AppState {
    pub journal: Arc<dyn Journal>,
    /// The authorization server and bearer-token checks.
    pub auth: Arc<oauth::Auth>,
    /// Rate limits on the authorization server and the admin API.
    pub limits: limits::Limits,
    pub sources: SourceKeys,
    pub metrics: Metrics,
    /// Vendors, destinations and policy settings from the configuration.
    pub policy: policy_http::PolicyConfig,
    /// The delivery engine, once started (the admin API's kill switch and dead letters).
    pub delivery: std::sync::OnceLock<Arc<delivery::Delivery>>,
    /// Subjects, the ledger and data-subject requests, once open.
    pub privacy: std::sync::OnceLock<Arc<privacy::Privacy>>,
    /// Verifies ledger checkpoints (`/admin/v1/audit/verify`).
    pub ledger_public_key: std::sync::OnceLock<ed25519_dalek::VerifyingKey>,
    /// False once shutdown has begun: `/readyz` then tells load balancers to stop sending.
    pub ready: AtomicBool,
}

impl AppState {
    pub fn new(
        journal: Arc<dyn Journal>,
        sources: SourceKeys,
        auth: Arc<oauth::Auth>,
        policy: policy_http::PolicyConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            auth,
            policy,
            delivery: std::sync::OnceLock::new(),
            privacy: std::sync::OnceLock::new(),
            ledger_public_key: std::sync::OnceLock::new(),
            limits: limits::Limits::default(),
            metrics: Metrics::new(&sources.sources()),
            journal,
            sources,
            ready: AtomicBool::new(true),
        })
    }
}

/// The full HTTP API.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(ingest::routes())
        .merge(auth_http::routes())
        .merge(policy_http::routes())
        .merge(delivery_http::routes())
        .merge(privacy_http::routes())
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(axum::middleware::from_fn(error::json_errors))
        .with_state(state)
}

/// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish, and
/// closes the journal once every accepted event is durable.
///
/// With a `drain_delay`, the server first reports not ready (`/readyz` 503) and keeps serving for
/// that long, so load balancers stop sending before the listener closes.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain_delay: std::time::Duration,
    tls: Option<tls::TlsSettings>,
    connections: listener::ConnectionSettings,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let drain_state = state.clone();
    let drained = async move {
        shutdown.await;
        drain_state.ready.store(false, Ordering::SeqCst);
        if !drain_delay.is_zero() {
            tracing::info!(
                seconds = drain_delay.as_secs(),
                "shutting down: reporting not ready, still serving"
            );
            tokio::time::sleep(drain_delay).await;
        }
        tracing::info!("shutting down: no new connections; draining in-flight requests");
    };
    let (live, watcher) = match tls {
        None => (None, None),
        Some(settings) => {
            let config = tls::server_config(&settings).map_err(std::io::Error::other)?;
            let live = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config));
            let watcher = tls::watch(settings, live.clone());
            (Some(live), Some(watcher))
        }
    };
    let metrics = state.metrics.connections.clone();
    listener::serve(listener, app, live, connections, metrics, drained).await;
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    state.journal.close().await;
    tracing::info!("journal closed; bye");
    Ok(())
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if !state.ready.load(Ordering::SeqCst) {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server.shutting_down",
            "the server is shutting down",
        )
        .into_response();
    }
    if !state.journal.accepts_writes() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "journal.unavailable",
            "the journal's writer has stopped; events cannot be stored (see the logs)",
        )
        .into_response();
    }
    match state.journal.stats().await {
        Ok(_) => "ready\n".into_response(),
        Err(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "journal.unavailable",
            format!("the journal cannot be read: {e}"),
        )
        .into_response(),
    }
}

async fn metrics_text(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
) -> Response {
    // Metrics name sources and show volumes: a token with metrics:read is needed (Prometheus
    // fetches one itself with its `oauth2` scrape setting).
    if let Err(e) = auth_http::require(&state, &headers, handoff_core::auth::Scope::MetricsRead) {
        return e.into_response();
    }
    match state.journal.stats().await {
        Ok(stats) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            state.metrics.render(&stats),
        )
            .into_response(),
        Err(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "journal.unavailable",
            format!("the journal cannot be read: {e}"),
        )
        .into_response(),
    }
}
