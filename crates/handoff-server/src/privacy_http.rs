//! Data-subject requests and the ledger's answers over HTTP:
//! `POST /v1/dsr`, `GET /v1/dsr`, `GET /v1/dsr/{id}`, `POST /v1/dsr/{id}/confirm` (dsr:write);
//! `GET /admin/v1/reports/subject|exposure|processing` and `GET /admin/v1/audit/verify`
//! (audit:read). Reports answer JSON, or CSV with `format=csv`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use handoff_core::auth::Scope;

use crate::AppState;
use crate::auth_http::require;
use crate::error::ApiError;
use crate::privacy::{DsrInput, Identity, Privacy, PrivacyError, Report, SubjectQuery, parse_time};

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/dsr", post(file).get(list))
        .route("/v1/dsr/{id}", get(show))
        .route("/v1/dsr/{id}/confirm", post(confirm))
        .route("/admin/v1/reports/{kind}", get(report))
        .route("/admin/v1/audit/verify", get(verify))
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024))
}

fn privacy(state: &AppState) -> Result<Arc<Privacy>, ApiError> {
    state.privacy.get().cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "privacy.unavailable",
            "the subject store and ledger are not open in this gateway",
        )
    })
}

impl From<PrivacyError> for ApiError {
    fn from(e: PrivacyError) -> Self {
        let status = if e.not_found {
            StatusCode::NOT_FOUND
        } else if e.code == "store.error" {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(status, e.code, e.message)
    }
}

/// Runs SQLite work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PrivacyError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "privacy.failed",
                "the request stopped unexpectedly",
            )
        })?
        .map_err(ApiError::from)
}

fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "request.json.malformed",
            e.to_string(),
        )
    })
}

async fn file(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let claims = require(&state, &headers, Scope::DsrWrite)?;
    let input: DsrInput = json_body(&body)?;
    let p = privacy(&state)?;
    let by = format!("client:{}", claims.client_id);
    let (view, new) = blocking(move || {
        let (request, new) = p.file(&input, &by)?;
        if new {
            tracing::info!(dsr = %request.id, kind = %request.kind, subject = %request.subject, "data-subject request filed");
        }
        Ok((p.view(&request)?, new))
    })
    .await?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

async fn show(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require(&state, &headers, Scope::DsrWrite)?;
    let p = privacy(&state)?;
    let view = blocking(move || p.view(&p.get(&id)?)).await?;
    Ok(Json(view).into_response())
}

async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require(&state, &headers, Scope::DsrWrite)?;
    let p = privacy(&state)?;
    let views = blocking(move || {
        let all = p.store.with_reader(handoff_store::dsr::list)?;
        all.iter().map(|r| p.view(r)).collect::<Result<Vec<_>, _>>()
    })
    .await?;
    Ok(Json(json!({ "requests": views })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Confirm {
    destination: String,
    /// What was done (a ticket number, the vendor's answer), for the ledger.
    note: Option<String>,
}

async fn confirm(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let claims = require(&state, &headers, Scope::DsrWrite)?;
    let c: Confirm = json_body(&body)?;
    let p = privacy(&state)?;
    let by = format!("client:{}", claims.client_id);
    let view = blocking(move || {
        let (request, already) = p.confirm(&id, &c.destination, &by, c.note.as_deref())?;
        let mut view = p.view(&request)?;
        if already {
            view["already_done"] = json!(true);
        }
        Ok(view)
    })
    .await?;
    Ok(Json(view).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReportQuery {
    id: Option<String>,
    #[serde(rename = "userId")]
    user_id: Option<String>,
    #[serde(rename = "anonymousId")]
    anonymous_id: Option<String>,
    email: Option<String>,
    vendor: Option<String>,
    from: Option<String>,
    to: Option<String>,
    format: Option<String>,
}

fn respond(report: Report, format: Option<&str>) -> Result<Response, ApiError> {
    match format {
        None | Some("json") => Ok(Json(report.json).into_response()),
        Some("csv") => Ok((
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            report.to_csv(),
        )
            .into_response()),
        Some(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "report.format.unknown",
            format!("format {other:?} is not json or csv"),
        )),
    }
}

fn range(q: &ReportQuery) -> Result<(i64, i64), PrivacyError> {
    let from = q.from.as_deref().map(parse_time).transpose()?.unwrap_or(0);
    let to =
        q.to.as_deref()
            .map(parse_time)
            .transpose()?
            .unwrap_or(i64::MAX);
    Ok((from, to))
}

async fn report(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(kind): Path<String>,
    query: Result<Query<ReportQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    require(&state, &headers, Scope::AuditRead)?;
    let Query(q) = query?;
    let p = privacy(&state)?;
    let format = q.format.clone();
    let report = blocking(move || match kind.as_str() {
        "subject" => p.subject_report(match q.id.clone() {
            Some(id) => SubjectQuery::Id(id),
            None => SubjectQuery::Identity(Identity {
                user_id: q.user_id.clone(),
                anonymous_id: q.anonymous_id.clone(),
                email: q.email.clone(),
            }),
        }),
        "exposure" => {
            let vendor = q.vendor.clone().ok_or_else(|| PrivacyError {
                code: "report.vendor.missing",
                message: "an exposure report needs vendor=ID".into(),
                not_found: false,
            })?;
            let (from, to) = range(&q)?;
            p.exposure(&vendor, from, to)
        }
        "processing" => {
            let (from, to) = range(&q)?;
            p.processing(from, to)
        }
        _ => Err(PrivacyError {
            code: "report.unknown",
            message: format!("no report {kind:?}: subject, exposure or processing"),
            not_found: true,
        }),
    })
    .await?;
    respond(report, format.as_deref())
}

async fn verify(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require(&state, &headers, Scope::AuditRead)?;
    let p = privacy(&state)?;
    let key = state.ledger_public_key.get().copied().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "privacy.unavailable",
            "the ledger key is not loaded",
        )
    })?;
    let v = blocking(move || Ok(crate::privacy::verify(&p.store, &key)?)).await?;
    let status = if v.problem.is_none() {
        StatusCode::OK
    } else {
        StatusCode::CONFLICT
    };
    Ok((status, Json(v)).into_response())
}
