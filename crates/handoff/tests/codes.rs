//! Every stable code is user interface: each API error code and each ledger reason code is
//! unique where it is declared and documented for operators. The API codes are collected from
//! the sources of every crate (the places codes are written: `ApiError::new(status, "…")`,
//! `code: "…"` and the `fn code(&self)` of each error enum), so a new code cannot be added
//! without its documentation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The non-test source of every crate: (file, text before its `#[cfg(test)]` module).
fn sources() -> Vec<(String, String)> {
    let mut files = Vec::new();
    for krate in std::fs::read_dir(Path::new(ROOT).join("crates")).unwrap() {
        let src = krate.unwrap().path().join("src");
        if src.is_dir() {
            rust_files(&src, &mut files);
        }
    }
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            // The unit tests' module at the end of a file holds no user-facing codes.
            let text = text
                .split("\n#[cfg(test)]\nmod ")
                .next()
                .unwrap()
                .to_owned();
            let name = f.strip_prefix(ROOT).unwrap_or(&f).display().to_string();
            (name, text)
        })
        .collect()
}

/// Every API error code written in the sources, with the files that write it.
fn api_codes() -> BTreeMap<String, BTreeSet<String>> {
    let code = r#""([a-z0-9_]+(?:\.[a-z0-9_]+)+)""#;
    let written = [
        regex::Regex::new(&format!(
            r"(?:ApiError|Self)::new\(\s*(?:[a-z_]+::)*StatusCode::\w+,\s*{code}"
        ))
        .unwrap(),
        regex::Regex::new(&format!(r"\bcode:\s*{code}")).unwrap(),
    ];
    let code_fn =
        regex::Regex::new(r"(?s)fn code\(&self\) -> &'static str \{(.*?)\n    \}").unwrap();
    let literal = regex::Regex::new(code).unwrap();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, text) in sources() {
        for re in &written {
            for c in re.captures_iter(&text) {
                out.entry(c[1].to_owned()).or_default().insert(file.clone());
            }
        }
        for body in code_fn.captures_iter(&text) {
            for c in literal.captures_iter(&body[1]) {
                out.entry(c[1].to_owned()).or_default().insert(file.clone());
            }
        }
    }
    out
}

/// README and the operator docs.
fn docs() -> String {
    let mut text = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    for entry in std::fs::read_dir(Path::new(ROOT).join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            text.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }
    text
}

fn undocumented<'a>(codes: impl IntoIterator<Item = &'a str>, docs: &str) -> Vec<&'a str> {
    codes
        .into_iter()
        .filter(|c| !docs.contains(&format!("`{c}`")))
        .collect()
}

#[test]
fn every_api_error_code_is_documented() {
    let codes = api_codes();
    // The scan finds the codes of every area (a broken pattern would find none of one).
    for known in [
        "route.not_found",
        "auth.token.expired",
        "message.depth.exceeded",
        "journal.database",
        "dsr.not_found",
        "keys.master.wrong",
        "connector.settings.missing",
    ] {
        assert!(codes.contains_key(known), "{known} not found by the scan");
    }
    let docs = docs();
    let missing = undocumented(codes.keys().map(String::as_str), &docs);
    assert!(
        missing.is_empty(),
        "API error codes missing from README.md and docs/ (write each as `code`): {:?}",
        missing
            .iter()
            .map(|c| format!("{c} ({:?})", codes[*c]))
            .collect::<Vec<_>>()
    );
}

#[test]
fn each_error_enum_owns_its_codes() {
    // A code names one error: two error enums mapping to the same code would make it mean
    // two things. (One code written at several call sites of the same error is fine.)
    let code_fn =
        regex::Regex::new(r"(?s)fn code\(&self\) -> &'static str \{(.*?)\n    \}").unwrap();
    let literal = regex::Regex::new(r#""([a-z0-9_]+(?:\.[a-z0-9_]+)+)""#).unwrap();
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let mut clashes = Vec::new();
    for (file, text) in sources() {
        for (n, body) in code_fn.captures_iter(&text).enumerate() {
            let mut seen = BTreeSet::new();
            for c in literal.captures_iter(&body[1]) {
                let code = c[1].to_owned();
                assert!(
                    seen.insert(code.clone()),
                    "{file}: {code} twice in one enum"
                );
                let here = format!("{file}#{n}");
                if let Some(other) = owner.insert(code.clone(), here.clone()) {
                    clashes.push(format!("{code}: {other} and {here}"));
                }
            }
        }
    }
    assert!(clashes.is_empty(), "{clashes:?}");
    for (name, codes) in [
        (
            "RequestError",
            &handoff_core::ingest::RequestError::CODES[..],
        ),
        (
            "MessageError",
            &handoff_core::ingest::MessageError::CODES[..],
        ),
    ] {
        let unique: BTreeSet<&str> = codes.iter().copied().collect();
        assert_eq!(unique.len(), codes.len(), "{name}::CODES has duplicates");
    }
}

#[test]
fn every_ledger_reason_code_is_unique_and_documented() {
    let reasons: Vec<&str> = handoff_core::policy::REASON_CODES
        .iter()
        .chain(handoff_server::delivery::LEDGER_REASON_CODES)
        .copied()
        .collect();
    let unique: BTreeSet<&str> = reasons.iter().copied().collect();
    assert_eq!(
        unique.len(),
        reasons.len(),
        "duplicate reason codes: {reasons:?}"
    );
    let missing = undocumented(reasons, &docs());
    assert!(
        missing.is_empty(),
        "ledger reason codes missing from the docs: {missing:?}"
    );
}
