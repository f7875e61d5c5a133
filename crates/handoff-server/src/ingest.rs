//! The ingest routes: Segment's HTTP Tracking API.
//!
//! Order of work per request: read the body within the endpoint's limit, inflate gzip (bounded),
//! find the source from the write key, parse and normalise (pure, in `handoff-core`), append to
//! the journal and wait until it is durable, then answer.

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;
use tower_http::cors::{Any, CorsLayer};

use handoff_core::SourceId;
use handoff_core::auth::Scope;
use handoff_core::ids::MessageKind;
use handoff_core::ingest::{self, Endpoint, Parsed, RequestError, RequestSignals};
use handoff_core::time_fmt::unix_millis;
use handoff_store::{NewEvent, QuarantineEntry};

use crate::AppState;
use crate::error::ApiError;

/// The two bytes every gzip stream starts with. A JSON body cannot start with them, so a body
/// that does is gzip even when a client forgot `Content-Encoding`.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// How long a client may take to send its body (every route's bound, see `listener`). Bounds
/// what a slow or stalled client holds, and how long a graceful shutdown can wait for it.
use crate::listener::BODY_TIMEOUT;
/// Segment's answer to an accepted single message.
const SUCCESS_BODY: &str = r#"{"success":true}"#;

pub fn routes() -> Router<Arc<AppState>> {
    let mut router = Router::new();
    for kind in MessageKind::ALL {
        let path = format!("/v1/{}", kind.as_str());
        router = router.route(
            &path,
            post(move |state, headers, body| handle(state, Endpoint::Single(kind), headers, body)),
        );
    }
    router
        .route(
            "/v1/batch",
            post(|s, h, b| handle(s, Endpoint::Batch, h, b)),
        )
        .route(
            "/v1/import",
            post(|s, h, b| handle(s, Endpoint::Batch, h, b)),
        )
        // Browsers post straight to the ingest API (analytics.js does), so allow any origin: the
        // write key is public by design and grants nothing but sending events.
        .layer(
            CorsLayer::new()
                .allow_origin(Any)
                .allow_methods(Any)
                .allow_headers(Any),
        )
}

async fn handle(
    State(state): State<Arc<AppState>>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = match ingest(&state, endpoint, &headers, body).await {
        Ok(resp) => resp,
        Err(err) => {
            if err.code.starts_with("auth.") {
                state.metrics.auth_failure(err.code);
            }
            if err.status.is_client_error()
                && !err.code.starts_with("message.")
                && err.code != "batch.rejected"
            {
                // Message-level refusals were counted per message already.
                state.metrics.reject(err.code, 1);
            }
            tracing::debug!(
                endpoint = endpoint.name(),
                code = err.code,
                "request refused"
            );
            err.into_response()
        }
    };
    state
        .metrics
        .request(endpoint.name(), response.status().as_u16());
    response
}

async fn ingest(
    state: &AppState,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let limit = endpoint.body_limit();
    // Refuse bad credentials before reading the body, when the header carries them.
    let header_source = match credential(headers)? {
        Some(Credential::WriteKey(key)) => Some(lookup(state, &key)?),
        Some(Credential::Bearer(token)) => Some(token_source(state, &token)?),
        None => None,
    };

    let body = read_body(body, headers, limit).await?;
    let received_at = time::OffsetDateTime::now_utc();
    let mut new_id = || uuid::Uuid::new_v4().to_string();
    // Sec-GPC (Global Privacy Control): "1" is the only value the specification defines.
    let signals = RequestSignals {
        gpc: headers
            .get("sec-gpc")
            .is_some_and(|v| v.as_bytes().trim_ascii() == b"1"),
    };
    let parsed: Parsed =
        ingest::parse_with_signals(endpoint, &body, received_at, signals, &mut new_id).map_err(
            |e| {
                let status = match e {
                    RequestError::WriteKeyInvalid => StatusCode::UNAUTHORIZED,
                    RequestError::TooManyMessages
                    | RequestError::ExpansionTooLarge { .. }
                    | RequestError::EnvelopeTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                    _ => StatusCode::BAD_REQUEST,
                };
                ApiError::new(status, e.code(), e.to_string())
            },
        )?;

    let source = match header_source {
        Some(source) => source,
        None => match &parsed.write_key {
            Some(key) => lookup(state, key)?,
            None => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "auth.write_key.missing",
                    "send the source's write key as the HTTP Basic user name (or as \"writeKey\" in the body)",
                ));
            }
        },
    };

    let received_at_ms = unix_millis(received_at);
    let total = parsed.accepted.len() + parsed.rejected.len();
    for r in &parsed.rejected {
        state.metrics.reject(r.error.code(), 1);
    }
    let rejected = rejected_list(&parsed.rejected);
    if endpoint == Endpoint::Batch && refused_whole(parsed.rejected.len(), total) {
        // Mostly refused: nothing of it is stored, not even in quarantine, so a request of
        // bad entries costs one answer, not a row each.
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "batch.rejected",
            format!(
                "{} of {total} messages were rejected, so the batch was refused whole and nothing \
                 of it was stored; see \"rejected\" for the first reasons",
                parsed.rejected.len()
            ),
        )
        .with_extra(json!({ "rejected": rejected, "rejected_count": parsed.rejected.len() })));
    }
    let events: Vec<NewEvent> = parsed
        .accepted
        .into_iter()
        .map(|a| NewEvent {
            source: source.clone(),
            message_id: a.message_id,
            received_at_ms,
            payload: a.payload,
        })
        .collect();
    let quarantine: Vec<QuarantineEntry> = parsed
        .rejected
        .into_iter()
        .map(|r| QuarantineEntry {
            source: source.clone(),
            received_at_ms,
            index: r.index as u32,
            code: r.error.code(),
            message: r.error.to_string(),
            raw: r.raw,
        })
        .collect();
    let first_error = quarantine.first().map(|q| (q.code, q.message.clone()));
    let quarantined = quarantine.len();
    let n_events = events.len();

    let started = Instant::now();
    let outcome = state
        .journal
        .append(events, quarantine)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, code = e.code(), "journal append failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "journal.unavailable",
                "the events could not be stored durably; nothing was accepted, retry the request",
            )
        })?;
    state
        .metrics
        .commit_seconds
        .observe(started.elapsed().as_secs_f64());
    let counters = state.metrics.source(&source);
    counters.accepted.inc_by(outcome.stored as u64);
    if outcome.duplicates > 0 {
        counters.duplicates.inc_by(outcome.duplicates as u64);
    }

    if n_events == 0 {
        // Nothing usable: the request fails, and what was sent is kept in quarantine.
        let (code, message) = first_error.unwrap_or(("batch.rejected", String::new()));
        return Err(match endpoint {
            Endpoint::Single(_) => ApiError::new(StatusCode::BAD_REQUEST, code, message),
            Endpoint::Batch => ApiError::new(
                StatusCode::BAD_REQUEST,
                "batch.rejected",
                format!(
                    "all {total} messages were rejected; see \"rejected\" for each one's reason"
                ),
            )
            .with_extra(json!({ "rejected": rejected, "rejected_count": quarantined })),
        });
    }

    let mut body = json!({"success": true});
    match endpoint {
        Endpoint::Single(_) if outcome.duplicates == 0 => {
            // The common answer, without building a JSON value per request.
            return Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                SUCCESS_BODY,
            )
                .into_response());
        }
        Endpoint::Single(_) => body["duplicate"] = json!(true),
        Endpoint::Batch => {
            body["accepted"] = json!(outcome.stored);
            body["duplicates"] = json!(outcome.duplicates);
            if quarantined > 0 {
                body["rejected"] = json!(rejected);
                body["rejected_count"] = json!(quarantined);
            }
        }
    }
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// Most refused messages a response lists (the count is always given): the answer to a request
/// must stay small whatever the request holds.
pub const MAX_REJECTED_LISTED: usize = 100;
/// Batches up to this size keep their good messages however many are refused (a small batch
/// with a bad message or two from a buggy client); larger ones that are mostly refused are
/// refused whole.
pub const SMALL_BATCH: usize = 10;

/// `true` when a batch is refused whole: more than half of its messages refused, in a batch
/// larger than [`SMALL_BATCH`].
fn refused_whole(rejected: usize, total: usize) -> bool {
    total > SMALL_BATCH && rejected * 2 > total
}

/// The response's list of refused messages: the first [`MAX_REJECTED_LISTED`].
fn rejected_list(rejected: &[ingest::Rejected]) -> Vec<serde_json::Value> {
    rejected
        .iter()
        .take(MAX_REJECTED_LISTED)
        .map(|r| json!({"index": r.index, "code": r.error.code(), "message": r.error.to_string()}))
        .collect()
}

fn lookup(state: &AppState, key: &str) -> Result<SourceId, ApiError> {
    state.sources.lookup(key).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "auth.write_key.unknown",
            "the write key does not belong to any source; check the key in your SDK's settings",
        )
    })
}

/// The source an `events:write` access token sends events as (its client's source, a signed
/// claim of the token); the source must be one this gateway serves.
fn token_source(state: &AppState, token: &str) -> Result<SourceId, ApiError> {
    let claims = state
        .auth
        .authorize(token, Scope::EventsWrite, crate::oauth::now_secs())
        .map_err(|r| crate::auth_http::rejected(state, r))?;
    let source = claims
        .source
        .as_deref()
        .and_then(|s| SourceId::parse(s).ok())
        .filter(|s| state.sources.contains(s));
    source.ok_or_else(|| {
        state.metrics.auth_failure("auth.token.source_unknown");
        ApiError::new(
            StatusCode::FORBIDDEN,
            "auth.token.source_unknown",
            "the token's client is not bound to a source this gateway serves",
        )
    })
}

enum Credential {
    /// `Authorization: Basic base64(writeKey:)`.
    WriteKey(String),
    /// `Authorization: Bearer <access token with events:write>`.
    Bearer(String),
}

/// The credential in the Authorization header, if there is one.
fn credential(headers: &HeaderMap) -> Result<Option<Credential>, ApiError> {
    if let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
    {
        return Ok(Some(Credential::Bearer(token.to_owned())));
    }
    Ok(basic_auth_user(headers)?.map(Credential::WriteKey))
}

/// The write key from `Authorization: Basic base64(writeKey:)`, if the header is there.
fn basic_auth_user(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "auth.header.malformed",
            "the Authorization header must be \"Basic \" followed by base64 of \"<writeKey>:\", or \"Bearer <access token>\"",
        )
    };
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, encoded) = value.trim().split_once(' ').ok_or_else(malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(malformed());
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| malformed())?;
    let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
    let user = decoded
        .split_once(':')
        .map_or(decoded.as_str(), |(user, _)| user);
    if user.is_empty() {
        return Ok(None);
    }
    Ok(Some(user.to_owned()))
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request.body.too_large",
        format!("the body exceeds this endpoint's limit of {limit} bytes (after decompression)"),
    )
}

/// Reads the body within `limit` bytes and inflates it if it is gzip, also within `limit`.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    let declared_gzip = match headers.get(header::CONTENT_ENCODING).map(|v| v.to_str()) {
        None => false,
        Some(Ok(v)) if v.eq_ignore_ascii_case("gzip") || v.eq_ignore_ascii_case("x-gzip") => true,
        Some(Ok(v)) if v.eq_ignore_ascii_case("identity") => false,
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "request.encoding.unsupported",
                "Content-Encoding must be gzip or identity",
            ));
        }
    };
    let declared_len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared_len.is_some_and(|len| len > limit) {
        return Err(too_large(limit));
    }
    let timed_out = || {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request.body.timeout",
            format!(
                "the body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )
    };
    let collected = tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect())
        .await
        .map_err(|_| timed_out())?;
    let raw = collected
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                too_large(limit)
            } else if crate::listener::is_body_timeout(e.as_ref()) {
                timed_out()
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "request.body.unreadable",
                    "the request body could not be read to its end",
                )
            }
        })?
        .to_bytes();
    if declared_gzip || raw.starts_with(&GZIP_MAGIC) {
        let mut out = Vec::with_capacity((raw.len() * 4).min(limit + 1));
        flate2::read::MultiGzDecoder::new(&raw[..])
            .take(limit as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "request.gzip.invalid",
                    format!("the body is not valid gzip: {e}"),
                )
            })?;
        if out.len() > limit {
            return Err(too_large(limit));
        }
        Ok(out.into())
    } else {
        Ok(raw)
    }
}
