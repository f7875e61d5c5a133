//! API errors: an HTTP status, a stable machine-readable code and a message a human can act on,
//! sent as `{"error": {"code": "…", "message": "…"}}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra top-level fields for the body (e.g. `rejected` for batches).
    pub extra: Option<serde_json::Value>,
    /// A `WWW-Authenticate` challenge (RFC 6750) for authentication errors.
    pub challenge: Option<String>,
    /// Seconds for `Retry-After` (rate limits; 503 always says 1).
    pub retry_after: Option<u64>,
}

/// A query string that does not parse into the route's parameters.
impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "request.query.invalid",
            e.body_text(),
        )
    }
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: None,
            challenge: None,
            retry_after: None,
        }
    }

    /// 429 `auth.rate_limited`, to try again after `secs`.
    pub fn rate_limited(secs: u64) -> Self {
        Self {
            retry_after: Some(secs),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "auth.rate_limited",
                format!("too many requests from this client; retry in {secs} s"),
            )
        }
    }

    pub fn with_challenge(mut self, challenge: String) -> Self {
        self.challenge = Some(challenge);
        self
    }

    pub fn with_extra(mut self, extra: serde_json::Value) -> Self {
        self.extra = Some(extra);
        self
    }

    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "route.not_found",
            "no such route; ingest routes are POST /v1/track, /v1/identify, /v1/page, /v1/screen, \
             /v1/group, /v1/alias, /v1/batch and /v1/import",
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "request.method.not_allowed",
            "this route does not take that method; ingest routes take POST",
        )
    }
}

/// Longest part of a framework's plain-text refusal kept in the JSON error's message.
const PLAIN_EXCERPT_CHARS: usize = 300;

/// Rewrites any error response that is not already JSON (an extractor's plain-text refusal:
/// "Failed to buffer the request body", "Failed to deserialize query string", a missing
/// `Content-Type`) into the JSON error format, with a stable code by cause, so every route
/// answers every error the same way: `{"error": {"code", "message"}}`, and on the OAuth
/// endpoints RFC 6749's `{"error": "invalid_request", "error_description"}`, which OAuth clients
/// parse. Successful responses pass through untouched.
pub async fn json_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let oauth = request.uri().path().starts_with("/oauth/");
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    // Framework refusals are a line of text; anything longer is cut, never buffered whole.
    let text = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, 4096))
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    let message: String = text.trim().chars().take(PLAIN_EXCERPT_CHARS).collect();
    let code = plain_code(status, &message);
    let status = if code == "request.body.timeout" {
        StatusCode::REQUEST_TIMEOUT
    } else {
        status
    };
    if oauth {
        let error = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request"
        };
        return (
            status,
            Json(json!({"error": error, "error_description": format!("{code}: {message}")})),
        )
            .into_response();
    }
    let mut error = ApiError::new(
        status,
        code,
        if message.is_empty() {
            status.canonical_reason().unwrap_or("error").to_owned()
        } else {
            message
        },
    );
    if let Some(v) = parts
        .headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
    {
        error.retry_after = v.parse().ok();
    }
    let mut resp = error.into_response();
    for name in [header::WWW_AUTHENTICATE, header::ALLOW] {
        if let Some(v) = parts.headers.get(&name) {
            resp.headers_mut().insert(name, v.clone());
        }
    }
    resp
}

/// The stable code of a framework refusal, by status and the refusal's own words.
fn plain_code(status: StatusCode, message: &str) -> &'static str {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => "request.body.too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "request.content_type.unsupported",
        StatusCode::UNPROCESSABLE_ENTITY => "request.json.invalid",
        StatusCode::REQUEST_TIMEOUT => "request.body.timeout",
        StatusCode::NOT_FOUND => "route.not_found",
        StatusCode::METHOD_NOT_ALLOWED => "request.method.not_allowed",
        StatusCode::BAD_REQUEST if message.contains("request body timed out") => {
            "request.body.timeout"
        }
        StatusCode::BAD_REQUEST if message.starts_with("Failed to deserialize query string") => {
            "request.query.invalid"
        }
        StatusCode::BAD_REQUEST if message.contains("JSON") => "request.json.malformed",
        StatusCode::BAD_REQUEST if message.starts_with("Failed to buffer the request body") => {
            "request.body.unreadable"
        }
        StatusCode::BAD_REQUEST => "request.invalid",
        s if s.is_server_error() => "server.error",
        _ => "request.refused",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if let (Some(serde_json::Value::Object(extra)), Some(obj)) =
            (self.extra, body.as_object_mut())
        {
            obj.extend(extra);
        }
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(challenge) = self.challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        } else if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}
