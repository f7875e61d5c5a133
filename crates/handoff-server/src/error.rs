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
