//! The built-in OAuth 2.0 authorization server (client credentials) and bearer-token checks.
//!
//! Access tokens are JWTs in the RFC 9068 profile (`typ: at+jwt`), signed with Ed25519. Signing
//! keys rotate; every key still inside a token lifetime keeps verifying. Private keys are sealed
//! under the master key (see `keys`). Client secrets are stored only as argon2id hashes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use base64::Engine;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use handoff_core::auth::{Scope, Scopes};
use handoff_store::StoreError;
use handoff_store::state::{ClientRecord, SigningKeyRecord, StateStore};

use crate::keys::{KeyError, KeyRing};

/// Default lifetime of an access token: short, so a leaked token is worth little.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(300);
/// The JWT `typ` of access tokens (RFC 9068 §2.1).
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub jti: String,
    pub scope: String,
    pub client_id: String,
    /// Private claim: the source an `events:write` token sends events as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Keys(#[from] KeyError),
    #[error("the signing key could not be used: {0}")]
    Signing(String),
    #[error("{0}")]
    Invalid(String),
}

/// Longest client name: names are for people reading lists and logs.
pub const MAX_CLIENT_NAME_CHARS: usize = 128;

/// Why a bearer token was refused. Each is a 401 except `Scope` (403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("send an access token: Authorization: Bearer <token> (get one at /oauth/token)")]
    Missing,
    #[error("the access token is not a JWT")]
    Malformed,
    #[error("the access token's signature, algorithm, type or key id is not valid here")]
    Invalid,
    #[error("the access token has expired; get a new one")]
    Expired,
    #[error("the access token was issued for another audience")]
    Audience,
    #[error(
        "the access token was issued by another authorization server (its iss is not this gateway's issuer)"
    )]
    Issuer,
    #[error("the access token, or its client, has been revoked")]
    Revoked,
    #[error("the access token lacks the scope {0}")]
    Scope(&'static str),
}

impl TokenRejection {
    pub fn code(&self) -> &'static str {
        match self {
            TokenRejection::Missing => "auth.token.missing",
            TokenRejection::Malformed => "auth.token.malformed",
            TokenRejection::Invalid => "auth.token.invalid",
            TokenRejection::Expired => "auth.token.expired",
            TokenRejection::Audience => "auth.token.audience",
            TokenRejection::Issuer => "auth.token.issuer",
            TokenRejection::Revoked => "auth.token.revoked",
            TokenRejection::Scope(_) => "auth.scope.insufficient",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// `iss` of every token, and the base of the metadata's URLs.
    pub issuer: String,
    /// `aud` of every token: the identifier of this gateway's APIs.
    pub audience: String,
    pub token_ttl: Duration,
}

struct Verifier {
    /// Public keys by kid.
    keys: HashMap<String, DecodingKey>,
    /// Revoked token ids with their expiry (seconds); swept as they expire.
    revoked_tokens: HashMap<String, i64>,
    revoked_clients: HashSet<String>,
    /// `PRAGMA data_version` when this was loaded: reload when another process changed state.
    version: i64,
}

struct Signer {
    kid: String,
    key: EncodingKey,
}

pub struct Auth {
    /// Permits for argon2 verifications (see [`ARGON2_CONCURRENCY`]).
    pub argon2_permits: tokio::sync::Semaphore,
    state: Arc<StateStore>,
    keys: KeyRing,
    config: AuthConfig,
    verifier: RwLock<Verifier>,
    signer: RwLock<Option<Signer>>,
}

impl Auth {
    /// A secret of this installation (sealed under the master key in the state store),
    /// created from `make` on first use.
    pub fn installation_secret(
        &self,
        name: &str,
        make: impl FnOnce() -> Vec<u8>,
    ) -> Result<Vec<u8>, AuthError> {
        if let Some(sealed) = self.state.secret(name)? {
            return Ok(self.keys.open(&sealed)?);
        }
        let sealed = self.keys.seal(name, &make());
        self.state
            .put_secret_if_absent(&sealed, now_secs() * 1000)?;
        let stored = self.state.secret(name)?.unwrap_or(sealed);
        Ok(self.keys.open(&stored)?)
    }
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn random_token(bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

/// A new client's id and its secret, shown once.
#[derive(Serialize)]
pub struct NewClient {
    pub client_id: String,
    pub client_secret: String,
    pub scopes: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl std::fmt::Debug for NewClient {
    // Written by hand so the secret never reaches a log line through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewClient")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("scopes", &self.scopes)
            .field("source", &self.source)
            .finish()
    }
}

/// Argon2id verifications allowed at once (19 MiB and tens of milliseconds each): a burst of
/// token requests queues instead of taking all memory and both cores.
pub const ARGON2_CONCURRENCY: usize = 2;

impl Auth {
    /// Opens the authorization server; creates a first signing key if there is none.
    pub fn open(
        state: Arc<StateStore>,
        keys: KeyRing,
        config: AuthConfig,
    ) -> Result<Self, AuthError> {
        let auth = Self {
            argon2_permits: tokio::sync::Semaphore::new(ARGON2_CONCURRENCY),
            state,
            keys,
            config,
            verifier: RwLock::new(Verifier {
                keys: HashMap::new(),
                revoked_tokens: HashMap::new(),
                revoked_clients: HashSet::new(),
                version: -1,
            }),
            signer: RwLock::new(None),
        };
        if auth.state.signing_keys()?.is_empty() {
            auth.rotate_signing_key("system")?;
        }
        auth.reload()?;
        Ok(auth)
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    pub fn state(&self) -> &StateStore {
        &self.state
    }

    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    /// Creates a new signing key that signs from now on; older keys keep verifying until tokens
    /// they signed have expired, then are pruned.
    pub fn rotate_signing_key(&self, actor: &str) -> Result<String, AuthError> {
        let signing = ed25519_dalek::SigningKey::from_bytes(&rand::random());
        let kid = random_token(12);
        let der = signing
            .to_pkcs8_der()
            .map_err(|e| AuthError::Signing(e.to_string()))?;
        let secret_name = format!("signing-key/{kid}");
        let sealed = self.keys.seal(&secret_name, der.as_bytes());
        let now_ms = now_secs() * 1000;
        self.state.insert_signing_key(
            &SigningKeyRecord {
                kid: kid.clone(),
                public_key: signing.verifying_key().to_bytes().to_vec(),
                secret_name,
                created_at_ms: now_ms,
            },
            &sealed,
        )?;
        // A replaced key must verify for as long as any token it signed can live. The CLI does
        // not know the gateway's configured lifetime, so always keep it for the longest allowed.
        let keep_for = handoff_core::config::MAX_TOKEN_TTL_SECS * 1000 + 60_000;
        self.state.prune_signing_keys(now_ms - keep_for)?;
        self.state.audit(
            now_ms,
            actor,
            "signing_key.rotated",
            &serde_json::json!({ "kid": kid }).to_string(),
        )?;
        // This process's own writes do not change `data_version`: switch the signer now.
        self.reload()?;
        Ok(kid)
    }

    /// Re-reads keys and revocations from the store. The verifier stays write-locked while the
    /// store is read, so a revocation made meanwhile (which takes the same lock) is either in
    /// what is read or added after: never overwritten by an older snapshot.
    fn reload(&self) -> Result<(), AuthError> {
        let mut verifier = self.verifier.write().unwrap_or_else(|e| e.into_inner());
        let version = self.state.data_version()?;
        let records = self.state.signing_keys()?;
        let keys = records
            .iter()
            .map(|k| (k.kid.clone(), DecodingKey::from_ed_der(&k.public_key)))
            .collect();
        let revoked_tokens = self
            .state
            .revoked_tokens(now_secs() * 1000)?
            .into_iter()
            .map(|(jti, exp_ms)| (jti, exp_ms / 1000))
            .collect();
        let revoked_clients = self
            .state
            .clients()?
            .into_iter()
            .filter(|c| c.revoked_at_ms.is_some())
            .map(|c| c.id)
            .collect();
        *verifier = Verifier {
            keys,
            revoked_tokens,
            revoked_clients,
            version,
        };
        drop(verifier);
        let newest = records
            .first()
            .ok_or_else(|| AuthError::Signing("no signing key".into()))?;
        let current = self
            .signer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|s| s.kid.clone());
        if current.as_deref() != Some(newest.kid.as_str()) {
            let sealed = self.state.secret(&newest.secret_name)?.ok_or_else(|| {
                AuthError::Signing(format!("the private half of key {} is missing", newest.kid))
            })?;
            let der = self.keys.open(&sealed)?;
            *self.signer.write().unwrap_or_else(|e| e.into_inner()) = Some(Signer {
                kid: newest.kid.clone(),
                key: EncodingKey::from_ed_der(&der),
            });
        }
        Ok(())
    }

    /// Reloads when another process (the CLI) changed the state since the last look.
    fn refresh(&self) -> Result<(), AuthError> {
        let seen = self
            .verifier
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .version;
        if self.state.data_version()? != seen {
            self.reload()?;
        }
        Ok(())
    }

    /// Checks a client's credentials (argon2id, constant-time). `None` for an unknown or revoked
    /// client or a wrong secret: the caller cannot tell which.
    pub fn authenticate_client(
        &self,
        client_id: &str,
        secret: &str,
    ) -> Result<Option<ClientRecord>, AuthError> {
        let record = self.state.client(client_id)?;
        // Verify against a dummy hash when the client does not exist, so timing does not reveal
        // which client ids exist.
        let hash = record
            .as_ref()
            .map_or(dummy_hash(), |c| c.secret_hash.as_str());
        let ok = argon2::PasswordHash::new(hash)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(secret.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false);
        Ok(record.filter(|c| ok && c.revoked_at_ms.is_none()))
    }

    /// Issues an access token for `client` with `scopes`, as of `now` (seconds).
    pub fn issue(
        &self,
        client: &ClientRecord,
        scopes: &Scopes,
        audience: &str,
        now: i64,
    ) -> Result<(String, Claims), AuthError> {
        self.refresh()?;
        let claims = Claims {
            iss: self.config.issuer.clone(),
            sub: client.id.clone(),
            aud: audience.to_owned(),
            iat: now,
            exp: now + self.config.token_ttl.as_secs() as i64,
            jti: random_token(16),
            scope: scopes.to_string(),
            client_id: client.id.clone(),
            source: client
                .source
                .clone()
                .filter(|_| scopes.contains(Scope::EventsWrite)),
        };
        let signer = self.signer.read().unwrap_or_else(|e| e.into_inner());
        let signer = signer
            .as_ref()
            .ok_or_else(|| AuthError::Signing("no signing key".into()))?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some(ACCESS_TOKEN_TYP.into());
        header.kid = Some(signer.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &signer.key)
            .map_err(|e| AuthError::Signing(e.to_string()))?;
        Ok((token, claims))
    }

    /// Verifies a token as of `now`: signature with a known key, `typ`, issuer, audience,
    /// expiry, revocation of the token and of its client.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenRejection> {
        if self.refresh().is_err() {
            return Err(TokenRejection::Invalid);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenRejection::Malformed)?;
        if header.alg != Algorithm::EdDSA || header.typ.as_deref() != Some(ACCESS_TOKEN_TYP) {
            return Err(TokenRejection::Invalid);
        }
        let kid = header.kid.ok_or(TokenRejection::Invalid)?;
        let verifier = self.verifier.read().unwrap_or_else(|e| e.into_inner());
        let key = verifier.keys.get(&kid).ok_or(TokenRejection::Invalid)?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        // Expiry is checked below against `now`, with no leeway: tokens are short-lived anyway.
        validation.validate_exp = false;
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidAudience => TokenRejection::Audience,
                ErrorKind::InvalidIssuer => TokenRejection::Issuer,
                ErrorKind::ExpiredSignature => TokenRejection::Expired,
                _ => TokenRejection::Invalid,
            }
        })?;
        let claims = data.claims;
        if claims.exp <= now {
            return Err(TokenRejection::Expired);
        }
        if verifier.revoked_tokens.contains_key(&claims.jti)
            || verifier.revoked_clients.contains(&claims.client_id)
        {
            return Err(TokenRejection::Revoked);
        }
        Ok(claims)
    }

    /// Verifies and checks that the token carries `scope`.
    pub fn authorize(&self, token: &str, scope: Scope, now: i64) -> Result<Claims, TokenRejection> {
        let claims = self.verify(token, now)?;
        let scopes = Scopes::parse(&claims.scope).map_err(|_| TokenRejection::Invalid)?;
        if scopes.contains(scope) {
            Ok(claims)
        } else {
            Err(TokenRejection::Scope(scope.as_str()))
        }
    }

    /// Revokes one token (everywhere at once: the revocation is checked on every request).
    pub fn revoke_token(&self, claims: &Claims, actor: &str) -> Result<(), AuthError> {
        // Store and memory change under the verifier's lock (see `reload`).
        let mut verifier = self.verifier.write().unwrap_or_else(|e| e.into_inner());
        self.state.revoke_token(&claims.jti, claims.exp * 1000)?;
        self.state.audit(
            now_secs() * 1000,
            actor,
            "token.revoked",
            &serde_json::json!({ "jti": claims.jti, "client_id": claims.client_id }).to_string(),
        )?;
        let now = now_secs();
        verifier.revoked_tokens.retain(|_, exp| *exp > now);
        verifier
            .revoked_tokens
            .insert(claims.jti.clone(), claims.exp);
        Ok(())
    }

    /// Creates a client allowed `scopes`; the secret is returned once and stored as argon2id.
    /// Creates a client allowed `scopes` (and, for `events:write`, bound to `source`); the
    /// secret is returned once and stored as argon2id.
    pub fn create_client(
        &self,
        name: &str,
        scopes: &Scopes,
        source: Option<&str>,
        actor: &str,
    ) -> Result<NewClient, AuthError> {
        if name.trim().is_empty() || name.chars().count() > MAX_CLIENT_NAME_CHARS {
            return Err(AuthError::Invalid(format!(
                "give the client a name of 1 to {MAX_CLIENT_NAME_CHARS} characters"
            )));
        }
        if name.chars().any(char::is_control) {
            // A newline or a NUL in a name would fake rows in `clients list` and in logs.
            return Err(AuthError::Invalid(
                "a client name must not contain control characters (newlines, tabs, NUL, escapes)"
                    .into(),
            ));
        }
        if let Some(source) = source {
            handoff_core::SourceId::parse(source)
                .map_err(|why| AuthError::Invalid(format!("source {source:?} {why}")))?;
        }
        match (scopes.contains(Scope::EventsWrite), source) {
            (true, None) => {
                return Err(AuthError::Invalid(
                    "an events:write client needs a source (--source ID): its events are sent as that source".into(),
                ));
            }
            (false, Some(_)) => {
                return Err(AuthError::Invalid(
                    "a source only applies to a client with events:write".into(),
                ));
            }
            _ => {}
        }
        let client_id = format!("hc_{}", random_token(12));
        let client_secret = random_token(32);
        // argon2id with the crate's defaults (OWASP's 19 MiB, 2 passes) and a random salt.
        let secret_hash = Argon2::default()
            .hash_password(client_secret.as_bytes())
            .map_err(|e| AuthError::Signing(e.to_string()))?
            .to_string();
        let now_ms = now_secs() * 1000;
        self.state.insert_client(&ClientRecord {
            id: client_id.clone(),
            name: name.to_owned(),
            secret_hash,
            scopes: scopes.to_string(),
            source: source.map(str::to_owned),
            created_at_ms: now_ms,
            revoked_at_ms: None,
        })?;
        self.state.audit(
            now_ms,
            actor,
            "client.created",
            &serde_json::json!({ "client_id": client_id, "name": name, "scopes": scopes.to_string(), "source": source }).to_string(),
        )?;
        Ok(NewClient {
            client_id,
            client_secret,
            scopes: scopes.iter().map(Scope::as_str).collect(),
            source: source.map(str::to_owned),
        })
    }

    /// Revokes a client: its secret stops working and every token it holds is refused at once.
    pub fn revoke_client(&self, client_id: &str, actor: &str) -> Result<bool, AuthError> {
        // Store and memory change under the verifier's lock (see `reload`).
        let mut verifier = self.verifier.write().unwrap_or_else(|e| e.into_inner());
        let now_ms = now_secs() * 1000;
        let revoked = self.state.revoke_client(client_id, now_ms)?;
        if revoked {
            self.state.audit(
                now_ms,
                actor,
                "client.revoked",
                &serde_json::json!({ "client_id": client_id }).to_string(),
            )?;
            verifier.revoked_clients.insert(client_id.to_owned());
        }
        Ok(revoked)
    }

    /// The public keys as a JSON Web Key Set (RFC 7517, OKP keys per RFC 8037).
    pub fn jwks(&self) -> Result<serde_json::Value, AuthError> {
        let keys: Vec<serde_json::Value> = self
            .state
            .signing_keys()?
            .into_iter()
            .map(|k| {
                serde_json::json!({
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "use": "sig",
                    "alg": "EdDSA",
                    "kid": k.kid,
                    "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&k.public_key),
                })
            })
            .collect();
        Ok(serde_json::json!({ "keys": keys }))
    }
}

/// An argon2id hash of a random value nobody knows, verified against when a client id is unknown
/// so that unknown and known ids cost the same time. Made once, on first use.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        Argon2::default()
            .hash_password(random_token(32).as_bytes())
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
}
