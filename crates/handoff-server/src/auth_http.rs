//! HTTP for the authorization server (`/oauth/*`, metadata, JWKS), bearer-token checks for the
//! admin API, and the admin API itself (`/admin/v1/*`).
//!
//! The OAuth endpoints answer errors in RFC 6749 form (`{"error": "invalid_client",
//! "error_description": "…"}`) because OAuth client libraries expect it; every other route uses
//! Handoff's `{"error": {"code", "message"}}`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use handoff_core::auth::{Role, Scope, Scopes};
use handoff_store::state::ClientRecord;

use crate::AppState;
use crate::error::ApiError;
use crate::oauth::{Claims, TokenRejection, now_secs};

/// Largest form body the OAuth endpoints read.
const MAX_FORM_BYTES: usize = 8 * 1024;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/oauth/token", post(token))
        .route("/oauth/revoke", post(revoke))
        .route("/oauth/introspect", post(introspect))
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/admin/v1/clients", get(list_clients).post(create_client))
        .route("/admin/v1/clients/{id}", delete(revoke_client))
        .route("/admin/v1/audit", get(audit))
        .route("/admin/v1/keys/rotate-signing", post(rotate_signing))
        // Bodies here are small forms and JSON; refuse anything larger before a handler runs.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM_BYTES))
}

// ---------------------------------------------------------------- OAuth endpoints

/// An RFC 6749 §5.2 error.
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
    basic_challenge: bool,
    retry_after: Option<u64>,
}

impl OAuthError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            error,
            description: description.into(),
            basic_challenge: false,
            retry_after: None,
        }
    }

    /// 429: RFC 6749 has no code for it; `temporarily_unavailable` is the closest, and
    /// `Retry-After` says when to come back.
    fn rate_limited(wait: std::time::Duration) -> Self {
        let secs = crate::limits::retry_after_secs(wait);
        Self {
            retry_after: Some(secs),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                format!("too many requests; retry in {secs} s"),
            )
        }
    }

    fn invalid_client(basic: bool) -> Self {
        Self {
            basic_challenge: basic,
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "client authentication failed (unknown client, wrong secret, or revoked client)",
            )
        }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            [(header::CACHE_CONTROL, "no-store")],
            Json(json!({"error": self.error, "error_description": self.description})),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.basic_challenge {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"handoff\""),
            );
        }
        resp
    }
}

fn form(body: &Bytes) -> Result<Vec<(String, String)>, OAuthError> {
    if body.len() > MAX_FORM_BYTES {
        return Err(OAuthError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            "the form is too large",
        ));
    }
    Ok(form_urlencoded::parse(body).into_owned().collect())
}

fn param<'a>(form: &'a [(String, String)], name: &str) -> Result<Option<&'a str>, OAuthError> {
    let mut values = form
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str());
    let first = values.next();
    if values.next().is_some() {
        // RFC 6749 §3.2: parameters must not be repeated.
        return Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{name} is repeated"),
        ));
    }
    Ok(first)
}

/// Client credentials from `client_secret_basic` or `client_secret_post` (not both).
fn client_credentials(
    headers: &HeaderMap,
    form: &[(String, String)],
) -> Result<(String, String, bool), OAuthError> {
    let basic = match headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        Some(value) => {
            let (scheme, encoded) = value.trim().split_once(' ').unwrap_or(("", ""));
            if !scheme.eq_ignore_ascii_case("basic") {
                return Err(OAuthError::invalid_client(true));
            }
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .ok_or_else(|| OAuthError::invalid_client(true))?;
            let (id, secret) = decoded
                .split_once(':')
                .ok_or_else(|| OAuthError::invalid_client(true))?;
            // RFC 6749 §2.3.1: both parts are form-urlencoded before being joined.
            let unescape = |s: &str| {
                form_urlencoded::parse(format!("v={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
            };
            Some((
                unescape(id).unwrap_or_default(),
                unescape(secret).unwrap_or_default(),
            ))
        }
        None => None,
    };
    let posted = match (param(form, "client_id")?, param(form, "client_secret")?) {
        (Some(id), Some(secret)) => Some((id.to_owned(), secret.to_owned())),
        (None, None) => None,
        _ => return Err(OAuthError::invalid_client(false)),
    };
    match (basic, posted) {
        (Some((id, secret)), None) => Ok((id, secret, true)),
        (None, Some((id, secret))) => Ok((id, secret, false)),
        (Some(_), Some(_)) => Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "use one client authentication method, not both",
        )),
        (None, None) => Err(OAuthError::invalid_client(true)),
    }
}

/// The limit on all OAuth endpoints together, checked before any work.
fn oauth_limit(state: &AppState) -> Result<(), OAuthError> {
    state.limits.oauth().map_err(|wait| {
        state.metrics.auth_failure("oauth.rate_limited");
        OAuthError::rate_limited(wait)
    })
}

/// What every OAuth endpoint does first: the endpoints' rate limit, then the form, then the
/// client's credentials.
async fn oauth_request(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Vec<(String, String)>, ClientRecord), OAuthError> {
    oauth_limit(state)?;
    let form = form(body)?;
    let client = authenticate(state, headers, &form).await?;
    Ok((form, client))
}

/// Authenticates the client of an OAuth request (argon2 runs off the async threads).
async fn authenticate(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    form: &[(String, String)],
) -> Result<ClientRecord, OAuthError> {
    let (id, secret, basic) = client_credentials(headers, form)?;
    // Only ids that exist are tracked, so guessing ids cannot grow the limiter's table.
    let known = state.auth.state().client(&id).ok().flatten().is_some();
    if known && let Err(wait) = state.limits.client_auth(&id) {
        state.metrics.auth_failure("oauth.rate_limited");
        return Err(OAuthError::rate_limited(wait));
    }
    let _permit = state.auth.argon2_permits.acquire().await.map_err(|_| {
        OAuthError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "shutting down",
        )
    })?;
    let auth = state.auth.clone();
    let found = tokio::task::spawn_blocking(move || auth.authenticate_client(&id, &secret))
        .await
        .map_err(|_| {
            OAuthError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "authentication failed to run",
            )
        })?
        .map_err(|e| {
            OAuthError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                e.to_string(),
            )
        })?;
    match found {
        Some(client) => Ok(client),
        None => {
            state.metrics.auth_failure("oauth.invalid_client");
            tracing::warn!("OAuth client authentication failed");
            Err(OAuthError::invalid_client(basic))
        }
    }
}

async fn token(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let (form, client) = oauth_request(&state, &headers, &body).await?;
    match param(&form, "grant_type")? {
        Some("client_credentials") => {}
        Some(other) => {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                format!("grant_type {other:?} is not supported; use client_credentials"),
            ));
        }
        None => {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "grant_type is missing",
            ));
        }
    }
    let audience = &state.auth.config().audience;
    for target in ["resource", "audience"] {
        if let Some(asked) = param(&form, target)?
            && asked != audience
        {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_target",
                format!("this server issues tokens for {audience:?} only"),
            ));
        }
    }
    let allowed = Scopes::parse(&client.scopes).map_err(|e| {
        OAuthError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            e.to_string(),
        )
    })?;
    let requested = param(&form, "scope")?
        .map(Scopes::parse)
        .transpose()
        .map_err(|e| OAuthError::new(StatusCode::BAD_REQUEST, "invalid_scope", e.to_string()))?;
    let granted = Scopes::grant(requested.as_ref(), &allowed).map_err(|excess| {
        OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            format!("this client may not have: {excess}"),
        )
    })?;
    if granted.is_empty() {
        return Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "this client has no scopes",
        ));
    }
    let (token, claims) = state
        .auth
        .issue(&client, &granted, audience, now_secs())
        .map_err(|e| {
            OAuthError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                e.to_string(),
            )
        })?;
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": claims.exp - claims.iat,
            "scope": claims.scope,
        })),
    )
        .into_response())
}

async fn revoke(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let (form, client) = oauth_request(&state, &headers, &body).await?;
    let token = param(&form, "token")?.ok_or_else(|| {
        OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "token is missing",
        )
    })?;
    // RFC 7009 §2.2: an invalid, expired or unknown token is not an error.
    if let Ok(claims) = state.auth.verify(token, now_secs()) {
        if claims.client_id != client.id {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the token was not issued to this client",
            ));
        }
        state
            .auth
            .revoke_token(&claims, &format!("client:{}", client.id))
            .map_err(|e| {
                OAuthError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    e.to_string(),
                )
            })?;
    }
    Ok(StatusCode::OK.into_response())
}

async fn introspect(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let (form, caller) = oauth_request(&state, &headers, &body).await?;
    // A client learns about its own tokens only, unless it may read the administration.
    let sees_all = Scopes::parse(&caller.scopes).is_ok_and(|s| s.contains(Scope::AdminRead));
    let token = param(&form, "token")?.ok_or_else(|| {
        OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "token is missing",
        )
    })?;
    let body = match state.auth.verify(token, now_secs()) {
        Ok(c) if sees_all || c.client_id == caller.id => json!({
            "active": true, "scope": c.scope, "client_id": c.client_id, "sub": c.sub, "aud": c.aud,
            "iss": c.iss, "exp": c.exp, "iat": c.iat, "jti": c.jti, "token_type": "Bearer",
        }),
        _ => json!({"active": false}),
    };
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response())
}

async fn metadata(State(state): State<Arc<AppState>>) -> Response {
    let iss = &state.auth.config().issuer;
    Json(json!({
        "issuer": iss,
        "token_endpoint": format!("{iss}/oauth/token"),
        "revocation_endpoint": format!("{iss}/oauth/revoke"),
        "introspection_endpoint": format!("{iss}/oauth/introspect"),
        "jwks_uri": format!("{iss}/.well-known/jwks.json"),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "scopes_supported": Scope::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "response_types_supported": [],
    }))
    .into_response()
}

async fn jwks(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let set = state.auth.jwks().map_err(unavailable)?;
    Ok(Json(set).into_response())
}

// ---------------------------------------------------------------- bearer tokens

/// The API error for a refused bearer token, counted in the metrics: 401 with an RFC 6750
/// challenge, or 403 when only the scope is missing.
pub fn rejected(state: &AppState, rejection: TokenRejection) -> ApiError {
    state.metrics.auth_failure(rejection.code());
    let (status, challenge) = match &rejection {
        TokenRejection::Missing => (
            StatusCode::UNAUTHORIZED,
            "Bearer realm=\"handoff\"".to_owned(),
        ),
        TokenRejection::Scope(s) => (
            StatusCode::FORBIDDEN,
            format!("Bearer realm=\"handoff\", error=\"insufficient_scope\", scope=\"{s}\""),
        ),
        _ => (
            StatusCode::UNAUTHORIZED,
            "Bearer realm=\"handoff\", error=\"invalid_token\"".to_owned(),
        ),
    };
    ApiError::new(status, rejection.code(), rejection.to_string()).with_challenge(challenge)
}

/// Checks the request's bearer token for `scope`: 401 (with an RFC 6750 challenge) when there
/// is no valid token, 403 when it lacks the scope.
pub fn require(state: &AppState, headers: &HeaderMap, scope: Scope) -> Result<Claims, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let result = match token {
        Some(token) => state.auth.authorize(token, scope, now_secs()),
        None => Err(TokenRejection::Missing),
    };
    let claims = result.map_err(|rejection| rejected(state, rejection))?;
    if let Err(wait) = state.limits.admin(&claims.client_id) {
        state.metrics.auth_failure("auth.rate_limited");
        return Err(ApiError::rate_limited(crate::limits::retry_after_secs(
            wait,
        )));
    }
    Ok(claims)
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "state.unavailable",
        format!("the state store failed: {e}"),
    )
}

// ---------------------------------------------------------------- admin API

async fn list_clients(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require(&state, &headers, Scope::AdminRead)?;
    let clients = state.auth.state().clients().map_err(unavailable)?;
    let list: Vec<_> = clients
        .into_iter()
        .map(|c| {
            json!({
                "client_id": c.id, "name": c.name, "scopes": c.scopes.split_whitespace().collect::<Vec<_>>(),
                "source": c.source, "created_at_ms": c.created_at_ms, "revoked_at_ms": c.revoked_at_ms,
            })
        })
        .collect();
    Ok(Json(json!({ "clients": list })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateClient {
    name: String,
    #[serde(default)]
    scopes: Option<String>,
    #[serde(default)]
    role: Option<String>,
    /// For `events:write` clients: the source their events are sent as.
    #[serde(default)]
    source: Option<String>,
}

/// The scopes for a new client from `--scopes "a b"` and/or `--role NAME`.
pub fn scopes_for(scopes: Option<&str>, role: Option<&str>) -> Result<Scopes, String> {
    let mut all: Vec<Scope> = Vec::new();
    if let Some(raw) = scopes {
        all.extend(Scopes::parse(raw).map_err(|e| e.to_string())?.iter());
    }
    if let Some(raw) = role {
        let role = Role::parse(raw).ok_or_else(|| {
            let known: Vec<_> = Role::ALL.iter().map(|r| r.as_str()).collect();
            format!("unknown role {raw:?}; known roles: {}", known.join(", "))
        })?;
        all.extend(role.scopes().iter());
    }
    let scopes: Scopes = all.into_iter().collect();
    if scopes.is_empty() {
        return Err("give the client at least one scope (scopes) or a role".into());
    }
    Ok(scopes)
}

async fn create_client(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let claims = require(&state, &headers, Scope::AdminWrite)?;
    let req: CreateClient = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "request.json.malformed",
            e.to_string(),
        )
    })?;
    if req.name.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "client.name.missing",
            "give the client a name",
        ));
    }
    let scopes = scopes_for(req.scopes.as_deref(), req.role.as_deref())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "client.scopes.invalid", e))?;
    // Through the API a client can hand out only what it holds itself, plus sending events and
    // reading metrics; vault:reveal and dsr:write come from a holder of them (or the CLI).
    let held = Scopes::parse(&claims.scope).unwrap_or_default();
    let beyond: Vec<&str> = scopes
        .iter()
        .filter(|s| !held.contains(*s) && !matches!(s, Scope::EventsWrite | Scope::MetricsRead))
        .map(Scope::as_str)
        .collect();
    if !beyond.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "client.scopes.not_held",
            format!(
                "a client cannot grant scopes it does not hold: {}",
                beyond.join(" ")
            ),
        ));
    }
    if let Some(source) = &req.source {
        let known = handoff_core::SourceId::parse(source)
            .ok()
            .is_some_and(|s| state.sources.contains(&s));
        if !known {
            let ids: Vec<String> = state
                .sources
                .sources()
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect();
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "client.source.unknown",
                format!(
                    "this gateway serves no source {source:?}; its sources are: {}",
                    ids.join(", ")
                ),
            ));
        }
    }
    let auth = state.auth.clone();
    let actor = format!("client:{}", claims.client_id);
    let created = tokio::task::spawn_blocking(move || {
        auth.create_client(&req.name, &scopes, req.source.as_deref(), &actor)
    })
    .await
    .map_err(unavailable)?
    .map_err(|e| match e {
        crate::oauth::AuthError::Invalid(why) => {
            ApiError::new(StatusCode::BAD_REQUEST, "client.invalid", why)
        }
        other => unavailable(other),
    })?;
    Ok((
        StatusCode::CREATED,
        [(header::CACHE_CONTROL, "no-store")],
        Json(created),
    )
        .into_response())
}

async fn revoke_client(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let claims = require(&state, &headers, Scope::AdminWrite)?;
    if state
        .auth
        .revoke_client(&id, &format!("client:{}", claims.client_id))
        .map_err(unavailable)?
    {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "client.not_found",
            format!("no active client {id:?}"),
        ))
    }
}

#[derive(Deserialize)]
struct AuditQuery {
    #[serde(default)]
    after: i64,
    #[serde(default = "default_audit_limit")]
    limit: usize,
}

fn default_audit_limit() -> usize {
    100
}

async fn audit(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Result<Response, ApiError> {
    require(&state, &headers, Scope::AuditRead)?;
    let entries = state
        .auth
        .state()
        .audit_log(q.after, q.limit.min(1000))
        .map_err(unavailable)?;
    let list: Vec<_> = entries
        .into_iter()
        .map(|e| {
            json!({
                "id": e.id, "at_ms": e.at_ms, "actor": e.actor, "action": e.action,
                "detail": serde_json::from_str::<serde_json::Value>(&e.detail).unwrap_or(serde_json::Value::Null),
            })
        })
        .collect();
    Ok(Json(json!({ "entries": list })).into_response())
}

async fn rotate_signing(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let claims = require(&state, &headers, Scope::AdminWrite)?;
    let kid = state
        .auth
        .rotate_signing_key(&format!("client:{}", claims.client_id))
        .map_err(unavailable)?;
    Ok(Json(json!({ "kid": kid })).into_response())
}
