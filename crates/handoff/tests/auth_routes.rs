//! Route-by-route authorization, against the real binary: every protected route refuses a
//! missing, malformed, forged, tampered, expired, wrong-audience, wrong-issuer or revoked token
//! (401), refuses a valid token without the route's scope (403), and serves one with it.

mod common;

use std::process::Command;
use std::sync::Arc;

use base64::Engine;
use common::{BIN, Gateway, client};
use reqwest::StatusCode;
use serde_json::{Value, json};

use handoff_core::auth::Scopes;
use handoff_server::keys::{KeyRing, MasterKey};
use handoff_server::oauth::{Auth, AuthConfig, now_secs};
use handoff_store::state::StateStore;

fn create_client(data_dir: &std::path::Path, scopes: &str) -> (String, String) {
    // events:write clients are bound to a source: the embedded default's.
    let mut args = vec!["--name", "test", "--scopes", scopes];
    if scopes.contains("events:write") {
        args.extend(["--source", "default"]);
    }
    common::create_client(data_dir, &args).unwrap()
}

async fn token(gw: &Gateway, creds: &(String, String), scope: Option<&str>) -> String {
    common::fetch_token(&gw.url, creds, scope).await
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn unb64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .unwrap()
}

/// Replaces part `i` (0 header, 1 claims) of a JWT, keeping the rest (and so the signature).
fn with_part(token: &str, i: usize, edit: impl FnOnce(&mut Value)) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut v: Value = serde_json::from_slice(&unb64(&parts[i])).unwrap();
    edit(&mut v);
    parts[i] = b64(v.to_string().as_bytes());
    parts.join(".")
}

struct Route {
    method: &'static str,
    path: String,
    body: Option<Value>,
    scope: &'static str,
    ok: StatusCode,
}

async fn call(gw: &Gateway, r: &Route, bearer: Option<&str>) -> (StatusCode, Value) {
    let url = format!("{}{}", gw.url, r.path);
    let mut req = match r.method {
        "GET" => client().get(url),
        "POST" => client().post(url),
        "DELETE" => client().delete(url),
        m => panic!("method {m}"),
    };
    if let Some(token) = bearer {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    if let Some(body) = &r.body {
        req = req.json(body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        assert!(
            challenge.is_some_and(|c| c.starts_with("Bearer")),
            "RFC 6750 challenge on {}",
            r.path
        );
    }
    (status, body)
}

#[tokio::test]
async fn every_protected_route_refuses_every_bad_token() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let gw = Gateway::start(&data, &[], &[]);
    let all = create_client(
        &data,
        "admin:read admin:write audit:read dsr:write vault:reveal events:write metrics:read",
    );
    let narrow = create_client(&data, "events:write");
    let victim = create_client(&data, "admin:read");

    // The test's own handle on the same state and master key, to mint tokens the token endpoint
    // would never issue (expired, other audience, other issuer): signed with the real key.
    let state = Arc::new(StateStore::open(&data).unwrap());
    let master =
        MasterKey::from_base64(&std::fs::read_to_string(data.join("master.key")).unwrap()).unwrap();
    let config = AuthConfig {
        issuer: gw.url.clone(),
        audience: gw.url.clone(),
        token_ttl: std::time::Duration::from_secs(300),
    };
    let ring = || KeyRing::from_keys(vec![master.clone()]);
    let minter = Auth::open(state.clone(), ring(), config.clone()).unwrap();
    let record = state.client(&all.0).unwrap().unwrap();
    let every = Scopes::parse(&record.scopes).unwrap();
    let now = now_secs();
    let expired = minter
        .issue(&record, &every, &gw.url, now - 3600)
        .unwrap()
        .0;
    let other_audience = minter
        .issue(&record, &every, "https://elsewhere.example", now)
        .unwrap()
        .0;
    let other_issuer = Auth::open(
        state.clone(),
        ring(),
        AuthConfig {
            issuer: "https://evil.example".into(),
            ..config
        },
    )
    .unwrap()
    .issue(&record, &every, &gw.url, now)
    .unwrap()
    .0;

    // Forged with another key: a second gateway's key, with the kid of ours.
    let elsewhere = tempfile::tempdir().unwrap();
    let (foreign_auth, _) = {
        let st = Arc::new(StateStore::open(elsewhere.path()).unwrap());
        let (mk, _) = KeyRing::load(None, None, elsewhere.path()).unwrap();
        (
            Auth::open(
                st.clone(),
                mk,
                AuthConfig {
                    issuer: gw.url.clone(),
                    audience: gw.url.clone(),
                    token_ttl: std::time::Duration::from_secs(300),
                },
            )
            .unwrap(),
            st,
        )
    };
    let jwks: Value = client()
        .get(format!("{}/.well-known/jwks.json", gw.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let our_kid = jwks["keys"][0]["kid"].as_str().unwrap().to_owned();
    let foreign = foreign_auth.issue(&record, &every, &gw.url, now).unwrap().0;
    let wrong_key = with_part(&foreign, 0, |h| h["kid"] = json!(our_kid));

    let good = token(&gw, &all, None).await;
    let alg_none = {
        let t = with_part(&good, 0, |h| h["alg"] = json!("none"));
        let mut parts: Vec<&str> = t.split('.').collect();
        parts[2] = "";
        parts.join(".")
    };
    let alg_hs256 = with_part(&good, 0, |h| h["alg"] = json!("HS256"));
    let tampered = with_part(&token(&gw, &all, Some("admin:read")).await, 1, |c| {
        c["scope"] = json!("admin:read admin:write audit:read")
    });
    let wrong_typ = with_part(&good, 0, |h| h["typ"] = json!("JWT"));
    let revoked = token(&gw, &all, None).await;
    let resp = client()
        .post(format!("{}/oauth/revoke", gw.url))
        .basic_auth(&all.0, Some(&all.1))
        .form(&[("token", revoked.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let of_revoked_client = token(&gw, &victim, None).await;
    let out = Command::new(BIN)
        .args(["clients", "revoke", &victim.0, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());

    let attacks: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "auth.token.missing"),
        (
            "not a JWT",
            Some("not-a-jwt".into()),
            "auth.token.malformed",
        ),
        ("alg none", Some(alg_none), "auth.token.malformed"),
        (
            "alg switched to HS256",
            Some(alg_hs256),
            "auth.token.invalid",
        ),
        (
            "signed with another key",
            Some(wrong_key),
            "auth.token.invalid",
        ),
        ("unknown kid", Some(foreign), "auth.token.invalid"),
        ("claims tampered", Some(tampered), "auth.token.invalid"),
        ("typ not at+jwt", Some(wrong_typ), "auth.token.invalid"),
        ("expired", Some(expired), "auth.token.expired"),
        (
            "other audience",
            Some(other_audience),
            "auth.token.audience",
        ),
        ("other issuer", Some(other_issuer), "auth.token.issuer"),
        ("revoked token", Some(revoked), "auth.token.revoked"),
        (
            "token of a revoked client",
            Some(of_revoked_client),
            "auth.token.revoked",
        ),
    ];

    let doomed = create_client(&data, "admin:read");
    let routes = vec![
        Route {
            method: "GET",
            path: "/admin/v1/clients".into(),
            body: None,
            scope: "admin:read",
            ok: StatusCode::OK,
        },
        Route {
            method: "POST",
            path: "/admin/v1/clients".into(),
            body: Some(json!({"name": "made by test", "role": "monitor"})),
            scope: "admin:write",
            ok: StatusCode::CREATED,
        },
        Route {
            method: "DELETE",
            path: format!("/admin/v1/clients/{}", doomed.0),
            body: None,
            scope: "admin:write",
            ok: StatusCode::NO_CONTENT,
        },
        Route {
            method: "GET",
            path: "/admin/v1/audit".into(),
            body: None,
            scope: "audit:read",
            ok: StatusCode::OK,
        },
        Route {
            method: "POST",
            path: "/admin/v1/keys/rotate-signing".into(),
            body: None,
            scope: "admin:write",
            ok: StatusCode::OK,
        },
        Route {
            method: "GET",
            path: "/admin/v1/vendors".into(),
            body: None,
            scope: "admin:read",
            ok: StatusCode::OK,
        },
        Route {
            method: "GET",
            path: "/admin/v1/destinations".into(),
            body: None,
            scope: "admin:read",
            ok: StatusCode::OK,
        },
        Route {
            method: "POST",
            path: "/admin/v1/plan".into(),
            body: Some(json!({"type": "track", "event": "Viewed", "userId": "u1"})),
            scope: "admin:read",
            ok: StatusCode::OK,
        },
        Route {
            method: "GET",
            path: "/admin/v1/delivery".into(),
            body: None,
            scope: "admin:read",
            ok: StatusCode::OK,
        },
        Route {
            method: "GET",
            path: "/admin/v1/dead-letters".into(),
            body: None,
            scope: "admin:read",
            ok: StatusCode::OK,
        },
        Route {
            method: "GET",
            path: "/metrics".into(),
            body: None,
            scope: "metrics:read",
            ok: StatusCode::OK,
        },
    ];
    let wrong_scope = token(&gw, &narrow, None).await;
    for route in &routes {
        for (what, bearer, code) in &attacks {
            let (status, body) = call(&gw, route, bearer.as_deref()).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (StatusCode::UNAUTHORIZED, Some(*code)),
                "{} {} with {what}: {body}",
                route.method,
                route.path
            );
        }
        let (status, body) = call(&gw, route, Some(&wrong_scope)).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("auth.scope.insufficient")),
            "{}",
            route.path
        );
        let exact = token(&gw, &all, Some(route.scope)).await;
        let (status, body) = call(&gw, route, Some(&exact)).await;
        assert_eq!(
            status, route.ok,
            "{} {} with its scope: {body}",
            route.method, route.path
        );
    }

    // A token signed before the key rotation (the last route) still verifies until it expires.
    let (status, _) = call(&gw, &routes[0], Some(&good)).await;
    assert_eq!(status, StatusCode::OK);
    // Audit: who did what.
    let audit_token = token(&gw, &all, Some("audit:read")).await;
    let (_, body) = call(&gw, &routes[3], Some(&audit_token)).await;
    let actions: Vec<&str> = body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for expected in [
        "client.created",
        "token.revoked",
        "client.revoked",
        "signing_key.rotated",
    ] {
        assert!(actions.contains(&expected), "{expected} in {actions:?}");
    }
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("handoff_auth_failures_total{code=\"auth.token.expired\"}"),
        "auth failures are counted"
    );
}

#[tokio::test]
async fn token_endpoint_follows_rfc_6749() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let gw = Gateway::start(&data, &[], &[]);
    let c = create_client(&data, "admin:read audit:read");
    let post = |form: Vec<(&'static str, String)>, basic: Option<(String, String)>| {
        let url = format!("{}/oauth/token", gw.url);
        async move {
            let mut req = client().post(url).form(&form);
            if let Some((id, secret)) = basic {
                req = req.basic_auth(id, Some(secret));
            }
            let resp = req.send().await.unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let gt = || ("grant_type", "client_credentials".to_string());
    let basic = Some(c.clone());

    // client_secret_post works, and the granted scope is all the client may have by default.
    let (status, body) = post(
        vec![
            gt(),
            ("client_id", c.0.clone()),
            ("client_secret", c.1.clone()),
        ],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["token_type"].as_str(), body["scope"].as_str()),
        (Some("Bearer"), Some("admin:read audit:read"))
    );
    assert_eq!(body["expires_in"], 300);

    for (form, basic, status, error) in [
        (
            vec![gt(), ("scope", "admin:read admin:write".into())],
            basic.clone(),
            StatusCode::BAD_REQUEST,
            "invalid_scope",
        ),
        (
            vec![gt(), ("scope", "root".into())],
            basic.clone(),
            StatusCode::BAD_REQUEST,
            "invalid_scope",
        ),
        (
            vec![("grant_type", "password".into())],
            basic.clone(),
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        ),
        (
            vec![gt(), ("resource", "https://elsewhere.example".into())],
            basic.clone(),
            StatusCode::BAD_REQUEST,
            "invalid_target",
        ),
        (
            vec![gt()],
            Some((c.0.clone(), "wrong-secret".into())),
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            vec![gt()],
            Some(("hc_nobody".into(), c.1.clone())),
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (vec![gt()], None, StatusCode::UNAUTHORIZED, "invalid_client"),
        (
            vec![
                gt(),
                ("client_id", c.0.clone()),
                ("client_secret", c.1.clone()),
            ],
            basic.clone(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            vec![gt(), gt()],
            basic.clone(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ] {
        let (got, body) = post(form.clone(), basic).await;
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(error)),
            "{form:?}: {body}"
        );
    }

    // Metadata (RFC 8414) points at working endpoints.
    let meta: Value = client()
        .get(format!("{}/.well-known/oauth-authorization-server", gw.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["issuer"], gw.url);
    assert_eq!(meta["token_endpoint"], format!("{}/oauth/token", gw.url));
    let jwks: Value = client()
        .get(meta["jwks_uri"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"][0]["kty"], "OKP");

    // The database holds no client secret and no private key in the clear.
    drop(gw);
    let state_db = [
        std::fs::read(data.join("state.db")).unwrap(),
        std::fs::read(data.join("state.db-wal")).unwrap_or_default(),
    ]
    .concat();
    assert!(
        !state_db.windows(c.1.len()).any(|w| w == c.1.as_bytes()),
        "client secret in the clear"
    );
}

#[tokio::test]
async fn secrets_never_reach_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let log = tmp.path().join("gateway.log");
    let gw = Gateway::start_logging(&data, &[], &[("RUST_LOG", "debug")], Some(&log));
    let write_key = gw.printed_write_key().unwrap();
    let c = create_client(&data, "admin:read");

    // Use every secret, rightly and wrongly.
    let resp = client()
        .post(format!("{}/v1/track", gw.url))
        .basic_auth(&write_key, Some(""))
        .body(r#"{"userId": "u", "event": "e"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let near_miss = format!("{}x", &c.1[..c.1.len() - 1]);
    for secret in [&c.1, &near_miss] {
        let _ = client()
            .post(format!("{}/oauth/token", gw.url))
            .basic_auth(&c.0, Some(secret))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
    }
    let tok = token(&gw, &c, None).await;
    let _ = client()
        .get(format!("{}/admin/v1/clients", gw.url))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    let _ = client()
        .get(format!("{}/admin/v1/audit", gw.url))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    gw.signal("TERM");
    assert!(gw.wait().success());

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("DEBUG") || text.contains("INFO"),
        "the log was captured at debug level"
    );
    let master = std::fs::read_to_string(data.join("master.key")).unwrap();
    for (what, secret) in [
        ("write key", write_key.as_str()),
        ("client secret", c.1.as_str()),
        ("wrong client secret", near_miss.as_str()),
        ("access token", tok.as_str()),
        ("master key", master.trim()),
    ] {
        assert!(!text.contains(secret), "the {what} appears in the log");
    }
}

#[tokio::test]
async fn master_and_signing_keys_rotate_while_the_gateway_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let gw = Gateway::start(&data, &[], &[]);
    let admin = create_client(&data, "admin:read admin:write");
    let before = token(&gw, &admin, None).await;
    let old_master = std::fs::read_to_string(data.join("master.key")).unwrap();

    let out = Command::new(BIN)
        .args(["keys", "rotate-master", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_master = std::fs::read_to_string(data.join("master.key")).unwrap();
    assert_ne!(old_master.trim(), new_master.trim());
    assert_eq!(
        new_master.trim().lines().count(),
        1,
        "the old key is gone from the file"
    );

    // The running gateway seals a new signing key (under the new master key, which it re-reads)
    // and signs with it; the token from before both rotations still works.
    let rotate = Route {
        method: "POST",
        path: "/admin/v1/keys/rotate-signing".into(),
        body: None,
        scope: "admin:write",
        ok: StatusCode::OK,
    };
    let (status, body) = call(&gw, &rotate, Some(&before)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let after = token(&gw, &admin, None).await;
    // The very next token is signed with the new key (no reload from elsewhere needed).
    let header: Value = serde_json::from_slice(&unb64(after.split('.').next().unwrap())).unwrap();
    assert_eq!(
        header["kid"], body["kid"],
        "the gateway switched to the key it just made"
    );
    let list = Route {
        method: "GET",
        path: "/admin/v1/clients".into(),
        body: None,
        scope: "admin:read",
        ok: StatusCode::OK,
    };
    for t in [&before, &after] {
        assert_eq!(call(&gw, &list, Some(t)).await.0, StatusCode::OK);
    }

    // Every secret is now under the new key; the old key opens none of them.
    let state = StateStore::open(&data).unwrap();
    let new_ring = KeyRing::from_keys(vec![MasterKey::from_base64(&new_master).unwrap()]);
    let old_ring = KeyRing::from_keys(vec![MasterKey::from_base64(&old_master).unwrap()]);
    let secrets = state.secrets().unwrap();
    assert!(secrets.len() >= 2);
    for s in &secrets {
        assert!(new_ring.open(s).is_ok(), "{}", s.name);
        assert_eq!(old_ring.open(s).unwrap_err().code(), "keys.master.wrong");
    }

    // A restart with the new key serves the same tokens.
    gw.signal("TERM");
    assert!(gw.wait().success());
    let gw = Gateway::start(&data, &[], &[]);
    let (status, _) = call(&gw, &list, Some(&token(&gw, &admin, None).await)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn guessing_a_clients_secret_is_rate_limited_for_that_client_only() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let gw = Gateway::start(&data, &[], &[]);
    let victim = create_client(&data, "admin:read");
    let bystander = create_client(&data, "admin:read");
    let attempt = |secret: String, id: String| {
        let url = format!("{}/oauth/token", gw.url);
        async move {
            client()
                .post(url)
                .basic_auth(id, Some(secret))
                .form(&[("grant_type", "client_credentials")])
                .send()
                .await
                .unwrap()
        }
    };
    let mut limited = None;
    for i in 0..60 {
        let resp = attempt(format!("guess-{i}"), victim.0.clone()).await;
        match resp.status() {
            StatusCode::UNAUTHORIZED => continue,
            StatusCode::TOO_MANY_REQUESTS => {
                limited = Some((i, resp));
                break;
            }
            other => panic!("unexpected {other}"),
        }
    }
    let (after, resp) = limited.expect("guessing is cut off");
    assert!(
        after >= 20,
        "the first attempts are only refused, not limited ({after})"
    );
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "temporarily_unavailable");
    // Another client is not held back by someone guessing at the victim.
    assert_eq!(
        attempt(bystander.1.clone(), bystander.0.clone())
            .await
            .status(),
        StatusCode::OK
    );
    assert!(
        gw.metrics()
            .await
            .contains("handoff_auth_failures_total{code=\"oauth.rate_limited\"}")
    );
}

#[tokio::test]
async fn introspection_and_grants_follow_least_privilege() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let gw = Gateway::start(&data, &[], &[]);
    let admin = create_client(&data, "admin:read admin:write");
    let ingest = create_client(&data, "events:write");
    let admin_token = token(&gw, &admin, None).await;
    let ingest_token = token(&gw, &ingest, None).await;
    let introspect = |(id, secret): (String, String), t: String| {
        let url = format!("{}/oauth/introspect", gw.url);
        async move {
            let body: Value = client()
                .post(url)
                .basic_auth(id, Some(secret))
                .form(&[("token", t)])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body["active"].as_bool().unwrap()
        }
    };
    // A client without admin:read learns about its own tokens only.
    assert!(introspect(ingest.clone(), ingest_token.clone()).await);
    assert!(!introspect(ingest.clone(), admin_token.clone()).await);
    assert!(introspect(admin.clone(), ingest_token.clone()).await);

    // Through the API, a client grants only what it holds (plus events:write and metrics:read).
    let create = |body: Value| {
        let (url, t) = (format!("{}/admin/v1/clients", gw.url), admin_token.clone());
        async move {
            let resp = client()
                .post(url)
                .bearer_auth(t)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = create(json!({"name": "vault", "role": "vault"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("client.scopes.not_held"))
    );
    let (status, _) = create(json!({"name": "auditor", "scopes": "audit:read"})).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "audit:read is not held by this admin token"
    );
    let (status, body) =
        create(json!({"name": "shop", "role": "ingest", "source": "default"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["source"], "default");
    let (status, body) = create(json!({"name": "ro", "scopes": "admin:read metrics:read"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(format!("{body}").contains("client_secret"));
}
