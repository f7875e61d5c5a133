//! The kill switch and the dead-letter queue in the admin API:
//! `GET /admin/v1/delivery` (admin:read), `POST /admin/v1/destinations/{id}/pause|resume|kill`
//! (admin:write), `GET /admin/v1/dead-letters` (admin:read) and
//! `POST /admin/v1/dead-letters/replay|discard` (admin:write). Every change is audited with the
//! client that made it, and takes effect at once in this gateway.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use handoff_core::auth::Scope;
use handoff_store::operator;
use handoff_store::outbox::{DestinationState, OutboxStore};

use crate::AppState;
use crate::auth_http::require;
use crate::error::ApiError;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/v1/delivery", get(status))
        .route("/admin/v1/destinations/{id}/{action}", post(set_state))
        .route("/admin/v1/dead-letters", get(list))
        .route("/admin/v1/dead-letters/{action}", post(take))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
}

fn store(state: &AppState) -> Result<Arc<OutboxStore>, ApiError> {
    state
        .delivery
        .get()
        .map(|d| d.store.clone())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "delivery.unavailable",
                "delivery is not running in this gateway",
            )
        })
}

fn failed(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "delivery.store",
        e.to_string(),
    )
}

fn known(state: &AppState, id: &str) -> Result<(), ApiError> {
    if state.policy.destinations.iter().any(|d| d.id == id) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "destination.unknown",
            format!("no destination {id:?} is configured"),
        ))
    }
}

async fn status(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require(&state, &headers, Scope::AdminRead)?;
    let store = store(&state)?;
    let mut list = Vec::new();
    for d in &state.policy.destinations {
        let stats = store.stats(&d.id).map_err(failed)?;
        let (s, reason) = store.state(&d.id).map_err(failed)?;
        list.push(json!({
            "destination": d.id, "state": s.as_str(), "reason": reason, "queued": stats.depth,
            "oldest_queued_at_ms": stats.oldest_created_at_ms, "dead_letters": stats.dead_letters,
            "breaker": stats.breaker, "last_error": stats.last_error,
            "last_error_at_ms": stats.last_error_at_ms,
        }));
    }
    Ok(Json(json!({ "destinations": list })).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Reason {
    reason: Option<String>,
}

async fn set_state(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let claims = require(&state, &headers, Scope::AdminWrite)?;
    known(&state, &id)?;
    let (target, default_reason) = match action.as_str() {
        "pause" => (DestinationState::Paused, "paused by an operator"),
        "resume" => (DestinationState::Active, "resumed by an operator"),
        "kill" => (DestinationState::Killed, "killed by an operator"),
        _ => return Err(ApiError::not_found()),
    };
    let reason: Reason = if body.is_empty() {
        Reason::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "request.json.malformed",
                e.to_string(),
            )
        })?
    };
    let reason = reason.reason.unwrap_or_else(|| default_reason.to_owned());
    let store = store(&state)?;
    operator::set_destination_state(
        &store,
        state.auth.state(),
        &format!("client:{}", claims.client_id),
        &id,
        target,
        &reason,
    )
    .map_err(failed)?;
    if let Some(d) = state.delivery.get() {
        d.apply_state(&id, target);
    }
    Ok(
        Json(json!({"destination": id, "state": target.as_str(), "reason": reason}))
            .into_response(),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    destination: Option<String>,
    #[serde(default)]
    after: i64,
    #[serde(default = "page")]
    limit: usize,
}

fn page() -> usize {
    100
}

async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    require(&state, &headers, Scope::AdminRead)?;
    let Query(q) = query?;
    let store = store(&state)?;
    let rows = store
        .dead_letters(q.destination.as_deref(), q.after, q.limit.min(1000))
        .map_err(failed)?;
    let list: Vec<_> = rows.iter().map(operator::dead_letter_json).collect();
    Ok(Json(json!({ "dead_letters": list })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Take {
    destination: String,
    /// Only these; all of the destination's when absent.
    ids: Option<Vec<i64>>,
}

async fn take(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(action): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let claims = require(&state, &headers, Scope::AdminWrite)?;
    let requeue = match action.as_str() {
        "replay" => true,
        "discard" => false,
        _ => return Err(ApiError::not_found()),
    };
    let t: Take = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "request.json.malformed",
            e.to_string(),
        )
    })?;
    known(&state, &t.destination)?;
    let store = store(&state)?;
    let n = operator::take_dead_letters(
        &store,
        state.auth.state(),
        &format!("client:{}", claims.client_id),
        &t.destination,
        t.ids.as_deref(),
        requeue,
    )
    .map_err(failed)?;
    if let Some(d) = state.delivery.get() {
        d.wake(&t.destination);
    }
    Ok(Json(json!({"destination": t.destination, "count": n})).into_response())
}
