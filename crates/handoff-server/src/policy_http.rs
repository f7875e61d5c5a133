//! The policy in the admin API: the vendor registry, the destinations, and `POST
//! /admin/v1/plan`, which answers exactly what `handoff plan` prints (the same function).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use handoff_core::auth::Scope;
use handoff_core::consent::SubjectState;
use handoff_core::ingest::{MAX_MESSAGE_BYTES, RequestSignals};
use handoff_core::policy::model::Destination;
use handoff_core::policy::{self, PolicySettings, Vendor};

use crate::AppState;
use crate::auth_http::require;
use crate::error::ApiError;

/// The policy the gateway runs with: `[policy]`, `[[vendors]]`, `[[destinations]]`.
#[derive(Debug, Default)]
pub struct PolicyConfig {
    pub settings: PolicySettings,
    pub vendors: Vec<Vendor>,
    pub destinations: Vec<Destination>,
}

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/v1/vendors", get(vendors))
        .route("/admin/v1/destinations", get(destinations))
        .route("/admin/v1/plan", post(plan))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_MESSAGE_BYTES))
}

fn date(d: Option<time::Date>) -> serde_json::Value {
    d.map_or(serde_json::Value::Null, |d| json!(d.to_string()))
}

async fn vendors(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require(&state, &headers, Scope::AdminRead)?;
    let list: Vec<_> = state
        .policy
        .vendors
        .iter()
        .map(|v| {
            json!({
                "id": v.id, "legal_name": v.legal_name, "country": v.country,
                "dpa_signed": date(v.dpa_signed), "certifications": v.certifications,
                "last_assessment": date(v.last_assessment), "risk_tier": format!("{:?}", v.risk_tier).to_lowercase(),
                "transfer_mechanism": format!("{:?}", v.transfer_mechanism).to_lowercase(),
                "sub_processors": v.sub_processors, "notes": v.notes,
            })
        })
        .collect();
    Ok(Json(json!({ "vendors": list })).into_response())
}

async fn destinations(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require(&state, &headers, Scope::AdminRead)?;
    let list: Vec<_> = state
        .policy
        .destinations
        .iter()
        .map(|d| {
            json!({
                "id": d.id, "name": d.name, "vendor": d.vendor.id, "connector": d.connector,
                "enabled": d.enabled, "purposes": d.purposes, "legal_basis": d.legal_basis,
                "sale_or_sharing": d.sale_or_sharing,
                "event_types": d.event_types.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
                "allow": d.allow.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                "transforms": d.transforms.iter().map(|t| json!({"op": t.op(), "field": t.field().as_str()})).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(json!({ "destinations": list })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanQuery {
    /// Decide as if the message came with `Sec-GPC: 1`.
    #[serde(default)]
    gpc: bool,
}

async fn plan(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<PlanQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    require(&state, &headers, Scope::AdminRead)?;
    let Query(q) = query?;
    let p = &state.policy;
    let now = time::OffsetDateTime::now_utc();
    let mut plan = policy::plan_message(
        &p.settings,
        &p.destinations,
        &body,
        RequestSignals { gpc: q.gpc },
        now,
        SubjectState::default(),
    )
    .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code, e.message))?;
    handoff_connectors::connector::apply_wire(&mut plan, &p.destinations, now);
    Ok(Json(plan).into_response())
}
