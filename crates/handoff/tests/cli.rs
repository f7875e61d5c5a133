//! `handoff check`, config files with environment variables, and the embedded default.

mod common;

use std::process::Command;

use common::{BIN, Gateway, client, dump};
use reqwest::StatusCode;

fn check(config: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handoff.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("check").arg("--config").arg(&path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn check_accepts_the_example_config() {
    let example = include_str!("../../../handoff.example.toml");
    let (ok, stdout, stderr) = check(example, common::EXAMPLE_ENV);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("OK (2 sources, 4 vendors, 4 destinations"),
        "{stdout}"
    );
}

#[test]
fn check_reports_every_problem_and_exits_1() {
    let (ok, _, stderr) = check(
        r#"
        [server]
        listen = "everywhere"
        [[sources]]
        id = "web"
        write_key = "${NOT_SET_ANYWHERE}"
        [[sources]]
        id = "web"
        write_key = "short"
        wirte_key = "typo"
        "#,
        &[],
    );
    assert!(!ok);
    // Each with the line it is on.
    for needle in [
        "line 3: server.listen: \"everywhere\" is not an address",
        "line 6: sources[0].write_key: environment variable NOT_SET_ANYWHERE is not set [config.env.missing]",
        "line 8: sources[1].id: source id \"web\" is declared more than once",
        "line 9: sources[1].write_key: is 5 characters",
        "line 10: sources[1].wirte_key: unknown key",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    let (ok, _, stderr) = check("[[sources]\nid = 1", &[]);
    assert!(!ok);
    assert!(stderr.contains("config.syntax"), "{stderr}");

    // An unknown variant names its key, not only its table.
    let example = include_str!("../../../handoff.example.toml");
    let bad = example.replacen("pii = \"redact\"", "pii = \"blok\"", 1);
    assert_ne!(bad, example);
    let line = bad
        .lines()
        .position(|l| l.starts_with("pii = \"blok\""))
        .unwrap()
        + 1;
    let (ok, _, stderr) = check(&bad, common::EXAMPLE_ENV);
    assert!(!ok);
    let needle = format!("line {line}: destinations[");
    assert!(
        stderr.contains(&needle) && stderr.contains("].pii: unknown variant `blok`"),
        "{stderr}"
    );
}

#[test]
fn clients_create_help_lists_every_role() {
    let out = std::process::Command::new(common::BIN)
        .args(["clients", "create", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for role in [
        "ingest", "viewer", "monitor", "admin", "auditor", "privacy", "vault",
    ] {
        assert!(help.contains(role), "{role} missing from:\n{help}");
    }
}

#[test]
fn serve_refuses_an_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[[sources]]\nid = \"web\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("sources[0].write_key: every source needs a write_key")
    );
}

#[tokio::test]
async fn embedded_default_creates_a_source_once_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key = {
        let gw = Gateway::start(&data, &[], &[]);
        let key = gw
            .printed_write_key()
            .expect("the first start prints a write key");
        assert!(
            gw.banner.iter().any(|l| l.contains("curl -u")),
            "a curl line to try: {:?}",
            gw.banner
        );
        let resp = client()
            .post(format!("{}/v1/track", gw.url))
            .basic_auth(&key, Some(""))
            .body(r#"{"userId": "u1", "event": "first start"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        gw.signal("TERM");
        assert!(gw.wait().success());
        key
    };
    let gw = Gateway::start(&data, &[], &[]);
    assert_eq!(gw.printed_write_key(), None, "the key is shown only once");
    let resp = client()
        .post(format!("{}/v1/track", gw.url))
        .basic_auth(&key, Some(""))
        .body(r#"{"userId": "u1", "event": "second start"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "the same key works after a restart"
    );
    let events = dump(&data, &[]);
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["source"], "default");
    // The key itself is not in the database, only its digest.
    let db = std::fs::read(data.join("journal.db")).unwrap();
    assert!(!db.windows(key.len()).any(|w| w == key.as_bytes()));
}

#[test]
fn a_second_gateway_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _first = Gateway::start(&data, &[], &[]);
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another Handoff process is using the data directory"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_embedded_defaults_write_key_rotates_while_serving_with_a_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let gw = Gateway::start(&data, &[], &[]);
    let first = gw.printed_write_key().unwrap();
    let status = |key: String| {
        let url = format!("{}/v1/track", gw.url);
        async move {
            client()
                .post(url)
                .basic_auth(key, Some(""))
                .body(r#"{"userId": "u1", "event": "e"}"#)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let rotate = |grace: &str| {
        let out = std::process::Command::new(common::BIN)
            .args([
                "sources",
                "rotate-key",
                "default",
                "--grace-hours",
                grace,
                "--data-dir",
            ])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines()
            .next()
            .and_then(|l| l.rsplit(' ').next())
            .unwrap()
            .to_owned()
    };
    let second = rotate("1");
    assert_ne!(second, first);
    // Synchronise on the gateway taking the new key (it re-reads its sources every 2 s).
    common::until_async(
        20,
        "the new key accepted",
        || status(second.clone()),
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        status(first.clone()).await,
        StatusCode::OK,
        "the old key is in its grace period"
    );
    let out = std::process::Command::new(common::BIN)
        .args(["sources", "list", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        list.contains("default") && list.contains("previous key accepted until"),
        "{list}"
    );
    assert!(
        !list.contains(&first) && !list.contains(&second),
        "keys are never listed"
    );

    // Without a grace period the replaced key stops at once; the one before is gone too.
    let third = rotate("0");
    common::until_async(
        20,
        "the third key accepted",
        || status(third.clone()),
        StatusCode::OK,
    )
    .await;
    assert_eq!(status(second).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(first).await, StatusCode::UNAUTHORIZED);
}
