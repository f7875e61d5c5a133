//! The configuration file: a TOML document declaring the server and its sources.
//!
//! [`Config::from_toml`] reads, substitutes `${ENV_NAME}` references, and validates in one go,
//! reporting *every* problem with the key it concerns. A [`Config`] value that exists is valid.
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:8080"
//! data_dir = "./handoff-data"
//!
//! [[sources]]
//! id = "web"
//! name = "Marketing site"
//! write_key = "${HANDOFF_WEB_WRITE_KEY}"
//! ```

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use toml::{Table, Value};

use crate::ids::SourceId;
use crate::policy::model::{self, DeliverySettings, Destination, PolicySettings, Vendor};

/// Where the gateway listens when neither the config nor `--listen` says otherwise: loopback only,
/// so a first run never exposes an unauthenticated port to the network by accident.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Where the embedded store lives by default, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./handoff-data";
/// Longest drain delay accepted: beyond this an orchestrator's own kill timeout would cut it
/// short anyway (Kubernetes' default grace period is 30 s; five minutes leaves room for more).
pub const MAX_DRAIN_DELAY_SECS: i64 = 300;
/// How long refused messages stay in quarantine by default: long enough to debug a client that
/// sends bad events over a month's release cycle, short enough that refused personal data does
/// not pile up.
pub const DEFAULT_QUARANTINE_RETENTION_DAYS: i64 = 30;
/// How long accepted events stay in the journal after every destination has passed them, by
/// default: the window in which they can be replayed (three days covers a vendor's weekend
/// outage). Keeping raw personal data longer than needed is itself a privacy fault.
pub const DEFAULT_RETENTION_HOURS: i64 = 72;
/// Shortest journal retention accepted: the 24 h in which a repeated `messageId` is recognised
/// as a duplicate, and a margin.
pub const MIN_RETENTION_HOURS: i64 = 25;
/// Longest journal retention accepted (one year).
pub const MAX_RETENTION_HOURS: i64 = 366 * 24;
/// Whole requests (body arrived) in handlers at once by default, past which new ones get 503
/// with `Retry-After`.
/// An ingest request holds at most a 500 KB batch (and what it stores is bounded by it), so
/// the default bounds what requests hold to a few hundred MB; the ingest benchmark's 16
/// connections never come near it.
pub const DEFAULT_MAX_IN_FLIGHT: i64 = 512;
/// Longest quarantine retention accepted (one year).
pub const MAX_QUARANTINE_RETENTION_DAYS: i64 = 366;
/// How long a client may take to send a request's header block, counted from the connection's
/// start or the end of the previous response, so it is also how long a keep-alive connection may
/// sit idle. A real client sends its headers in one round trip; SDKs flush every few seconds
/// (analytics-node every 10 s) and reconnect cheaply. 20 s frees a socket held half-open or idle
/// well before it matters, and keeps a connection alive across an SDK's flush interval.
pub const DEFAULT_HEADER_TIMEOUT_SECS: i64 = 20;
/// Longest header timeout accepted.
pub const MAX_CONNECTION_TIMEOUT_SECS: i64 = 3600;
/// Most concurrent connections that can be configured.
pub const MAX_CONNECTIONS_LIMIT: i64 = 1_000_000;
/// Shortest write key accepted: 16 characters, about 80 bits even for hex keys.
pub const MIN_WRITE_KEY_LEN: usize = 16;

/// A valid configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthSettings,
    pub sources: Vec<SourceConfig>,
    /// `[policy]`: settings shared by every destination's decisions.
    pub policy: PolicySettings,
    /// `[[vendors]]`: the vendor registry.
    pub vendors: Vec<Vendor>,
    /// `[[destinations]]`: where events may go, and under which policy.
    pub destinations: Vec<Destination>,
    /// `[delivery]`: retries, dead-lettering, circuit breaker, timeouts.
    pub delivery: DeliverySettings,
}

/// The built-in authorization server.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthSettings {
    /// `iss` of issued tokens; defaults to `http://<listen address>`.
    pub issuer: Option<String>,
    /// `aud` of issued tokens; defaults to the issuer.
    pub audience: Option<String>,
    /// Lifetime of access tokens.
    pub token_ttl: Duration,
}

/// Default access-token lifetime: five minutes, so a leaked token is soon worthless.
pub const DEFAULT_TOKEN_TTL_SECS: i64 = 300;
/// Longest access-token lifetime accepted (one hour).
pub const MAX_TOKEN_TTL_SECS: i64 = 3600;

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// How long a shutting-down gateway keeps serving while `/readyz` reports 503.
    pub drain_delay: Duration,
    /// File holding the master key (base64 of 32 bytes); `HANDOFF_MASTER_KEY` wins over it.
    pub master_key_file: Option<PathBuf>,
    /// `[server.tls]`: terminate TLS here.
    pub tls: Option<TlsSettings>,
    /// How long refused messages stay in quarantine.
    pub quarantine_retention: Duration,
    /// How long accepted events stay in the journal once every destination has passed them.
    pub retention: Duration,
    /// Most whole requests in handlers at once; past it, 503 `server.busy` with `Retry-After`.
    pub max_in_flight: usize,
    /// Most concurrent client connections; `None`: derived from the file-descriptor limit at
    /// start.
    pub max_connections: Option<usize>,
    /// How long a client may take to send a request's headers (also the idle keep-alive
    /// timeout: the time is counted from the end of the previous response).
    pub header_timeout: Duration,
}

/// `[server.tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM file with the certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// Accept TLS 1.2 as well as 1.3 (`min_version = "1.2"`; off by default).
    pub allow_tls12: bool,
}

/// A source: one site, app or server that sends events with its own write key.
#[derive(Clone, PartialEq)]
pub struct SourceConfig {
    pub id: SourceId,
    pub name: String,
    pub write_key: String,
}

impl fmt::Debug for SourceConfig {
    // Written by hand so that a write key never reaches a log line through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceConfig")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("write_key", &"<redacted>")
            .finish()
    }
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The key it concerns, e.g. `sources[1].write_key`; empty for the whole file.
    pub key: String,
    /// Stable code, e.g. `config.key.unknown`.
    pub code: &'static str,
    pub message: String,
    /// The line of the file the key is on (of its table, when the key is missing).
    pub line: Option<usize>,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if self.key.is_empty() {
            write!(f, "{} [{}]", self.message, self.code)
        } else {
            write!(f, "{}: {} [{}]", self.key, self.message, self.code)
        }
    }
}

/// The line of `text` that a problem's key (`destinations[2].pii`, `server.tls.cert_file`) is
/// on: the key itself when the file has it, else the deepest table on the way that it has.
pub fn line_of(text: &str, key: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    if key.is_empty() {
        return None;
    }
    let root = DeTable::parse(text).ok()?;
    let mut found: Option<std::ops::Range<usize>> = None;
    let mut table = root.get_ref();
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (name, index) = match part.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let Some((k, v)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name) else {
            break;
        };
        found = Some(k.span());
        let mut value = v;
        if let Some(i) = index {
            let DeValue::Array(items) = value.get_ref() else {
                break;
            };
            let Some(item) = items.get(i) else { break };
            found = Some(item.span());
            value = item;
        }
        match value.get_ref() {
            DeValue::Table(t) if parts.peek().is_some() => table = t,
            _ => break,
        }
    }
    let start = found?.start;
    Some(text[..start.min(text.len())].matches('\n').count() + 1)
}

impl ConfigErrors {
    /// Sets each problem's line in `text` (the file the problems were found in).
    pub fn locate(&mut self, text: &str) {
        for p in &mut self.0 {
            p.line = p.line.or_else(|| line_of(text, &p.key));
        }
    }
}

/// All problems found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigProblem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, code: &'static str, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            key: key.into(),
            line: None,
            code,
            message: message.into(),
        });
    }

    fn unknown_keys(&mut self, prefix: &str, table: &Table, known: &[&str]) {
        for k in table.keys().filter(|k| !known.contains(&k.as_str())) {
            self.add(
                join(prefix, k),
                "config.key.unknown",
                format!("unknown key; expected one of: {}", known.join(", ")),
            );
        }
    }

    /// Reads an optional string key.
    fn string(&mut self, prefix: &str, table: &Table, key: &str) -> Option<String> {
        match table.get(key) {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                self.add(
                    join(prefix, key),
                    "config.value.type",
                    format!("must be a string, found {}", other.type_str()),
                );
                None
            }
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Replaces every `${NAME}` in the string values of `value` by `env(NAME)`.
fn substitute_env(
    value: &mut Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) {
    match value {
        Value::String(s) if s.contains("${") => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let Some(end) = after.find('}') else {
                    problems.add(path, "config.env.syntax", "\"${\" without a closing \"}\"");
                    return;
                };
                let name = &after[..end];
                let valid =
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    problems.add(
                        path,
                        "config.env.syntax",
                        format!("\"${{{name}}}\" is not a valid environment variable reference"),
                    );
                    return;
                }
                match env(name) {
                    Some(v) => out.push_str(&v),
                    None => {
                        problems.add(
                            path,
                            "config.env.missing",
                            format!("environment variable {name} is not set"),
                        );
                        return;
                    }
                }
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_env(item, &format!("{path}[{i}]"), env, problems);
            }
        }
        Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                substitute_env(v, &join(path, k), env, problems);
            }
        }
        _ => {}
    }
}

impl Config {
    /// The configuration used when Handoff runs without a file: defaults, no sources declared
    /// (the embedded default then creates one in its store).
    pub fn embedded_default() -> Self {
        Config {
            server: ServerConfig {
                listen: DEFAULT_LISTEN
                    .parse()
                    .expect("default listen address parses"),
                data_dir: PathBuf::from(DEFAULT_DATA_DIR),
                drain_delay: Duration::ZERO,
                master_key_file: None,
                tls: None,
                quarantine_retention: Duration::from_secs(
                    DEFAULT_QUARANTINE_RETENTION_DAYS as u64 * 86_400,
                ),
                retention: Duration::from_secs(DEFAULT_RETENTION_HOURS as u64 * 3600),
                max_in_flight: DEFAULT_MAX_IN_FLIGHT as usize,
                max_connections: None,
                header_timeout: Duration::from_secs(DEFAULT_HEADER_TIMEOUT_SECS as u64),
            },
            auth: AuthSettings {
                issuer: None,
                audience: None,
                token_ttl: Duration::from_secs(DEFAULT_TOKEN_TTL_SECS as u64),
            },
            sources: Vec::new(),
            policy: PolicySettings::default(),
            vendors: Vec::new(),
            destinations: Vec::new(),
            delivery: DeliverySettings::default(),
        }
    }

    /// Parses, substitutes environment variables and validates a configuration file, judging
    /// vendor assessments' age against today's date (UTC).
    pub fn from_toml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigErrors> {
        Self::from_toml_on(text, env, time::OffsetDateTime::now_utc().date())
    }

    /// [`Config::from_toml`] as if today were `today`.
    pub fn from_toml_on(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        today: time::Date,
    ) -> Result<Self, ConfigErrors> {
        let mut problems = Problems(Vec::new());
        let mut root: Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                let e: toml::de::Error = e;
                problems.add("", "config.syntax", e.to_string().trim_end().to_owned());
                return Err(ConfigErrors(problems.0));
            }
        };
        for (k, v) in root.iter_mut() {
            substitute_env(v, k, env, &mut problems);
        }
        problems.unknown_keys(
            "",
            &root,
            &[
                "server",
                "auth",
                "sources",
                "policy",
                "vendors",
                "destinations",
                "delivery",
            ],
        );

        let mut config = Config::embedded_default();
        match root.get("server") {
            None => {}
            Some(Value::Table(server)) => {
                problems.unknown_keys(
                    "server",
                    server,
                    &[
                        "listen",
                        "data_dir",
                        "drain_delay_secs",
                        "master_key_file",
                        "tls",
                        "quarantine_retention_days",
                        "retention_hours",
                        "max_connections",
                        "max_in_flight",
                        "header_timeout_secs",
                    ],
                );
                let mut whole =
                    |key: &str, code: &'static str, range: std::ops::RangeInclusive<i64>| {
                        match server.get(key) {
                            None => None,
                            Some(Value::Integer(n)) if range.contains(n) => Some(*n as u64),
                            Some(other) => {
                                problems.add(
                                    format!("server.{key}"),
                                    code,
                                    format!(
                                        "must be a whole number from {} to {}, found {other}",
                                        range.start(),
                                        range.end()
                                    ),
                                );
                                None
                            }
                        }
                    };
                if let Some(days) = whole(
                    "quarantine_retention_days",
                    "config.server.quarantine_retention.invalid",
                    1..=MAX_QUARANTINE_RETENTION_DAYS,
                ) {
                    config.server.quarantine_retention = Duration::from_secs(days * 86_400);
                }
                if let Some(hours) = whole(
                    "retention_hours",
                    "config.server.retention.invalid",
                    MIN_RETENTION_HOURS..=MAX_RETENTION_HOURS,
                ) {
                    config.server.retention = Duration::from_secs(hours * 3600);
                }
                if let Some(n) = whole(
                    "max_in_flight",
                    "config.server.max_in_flight.invalid",
                    1..=MAX_CONNECTIONS_LIMIT,
                ) {
                    config.server.max_in_flight = n as usize;
                }
                if let Some(n) = whole(
                    "max_connections",
                    "config.server.max_connections.invalid",
                    1..=MAX_CONNECTIONS_LIMIT,
                ) {
                    config.server.max_connections = Some(n as usize);
                }
                if let Some(secs) = whole(
                    "header_timeout_secs",
                    "config.server.header_timeout.invalid",
                    1..=MAX_CONNECTION_TIMEOUT_SECS,
                ) {
                    config.server.header_timeout = Duration::from_secs(secs);
                }

                match server.get("tls") {
                    None => {}
                    Some(Value::Table(tls)) => {
                        problems.unknown_keys(
                            "server.tls",
                            tls,
                            &["cert_file", "key_file", "min_version"],
                        );
                        let cert = problems.string("server.tls", tls, "cert_file");
                        let key = problems.string("server.tls", tls, "key_file");
                        for (name, value) in [("cert_file", &cert), ("key_file", &key)] {
                            if value.is_none() && !tls.contains_key(name) {
                                problems.add(
                                    format!("server.tls.{name}"),
                                    "config.server.tls.missing",
                                    "[server.tls] needs cert_file and key_file (PEM)",
                                );
                            }
                        }
                        let allow_tls12 = match problems
                            .string("server.tls", tls, "min_version")
                            .as_deref()
                        {
                            None | Some("1.3") => false,
                            Some("1.2") => true,
                            Some(other) => {
                                problems.add(
                                    "server.tls.min_version",
                                    "config.server.tls.version",
                                    format!("{other:?} is not supported; use \"1.3\" (default) or \"1.2\""),
                                );
                                false
                            }
                        };
                        if let (Some(cert), Some(key)) = (cert, key) {
                            config.server.tls = Some(TlsSettings {
                                cert_file: PathBuf::from(cert),
                                key_file: PathBuf::from(key),
                                allow_tls12,
                            });
                        }
                    }
                    Some(other) => problems.add(
                        "server.tls",
                        "config.value.type",
                        format!("must be a table ([server.tls]), found {}", other.type_str()),
                    ),
                }
                if let Some(file) = problems.string("server", server, "master_key_file") {
                    config.server.master_key_file = Some(PathBuf::from(file));
                }
                match server.get("drain_delay_secs") {
                    None => {}
                    Some(Value::Integer(n)) if (0..=MAX_DRAIN_DELAY_SECS).contains(n) => {
                        config.server.drain_delay = Duration::from_secs(*n as u64);
                    }
                    Some(other) => problems.add(
                        "server.drain_delay_secs",
                        "config.server.drain_delay.invalid",
                        format!("must be a whole number of seconds from 0 to {MAX_DRAIN_DELAY_SECS}, found {other}"),
                    ),
                }
                if let Some(listen) = problems.string("server", server, "listen") {
                    match listen.parse() {
                        Ok(addr) => config.server.listen = addr,
                        Err(_) => problems.add(
                            "server.listen",
                            "config.server.listen.invalid",
                            format!("{listen:?} is not an address like \"127.0.0.1:8080\" or \"[::]:8080\""),
                        ),
                    }
                }
                if let Some(dir) = problems.string("server", server, "data_dir") {
                    if dir.is_empty() {
                        problems.add(
                            "server.data_dir",
                            "config.server.data_dir.empty",
                            "must not be empty",
                        );
                    } else {
                        config.server.data_dir = PathBuf::from(dir);
                    }
                }
            }
            Some(other) => problems.add(
                "server",
                "config.value.type",
                format!("must be a table ([server]), found {}", other.type_str()),
            ),
        }

        match root.get("auth") {
            None => {}
            Some(Value::Table(auth)) => {
                problems.unknown_keys("auth", auth, &["issuer", "audience", "token_ttl_secs"]);
                config.auth.issuer = problems.string("auth", auth, "issuer");
                config.auth.audience = problems.string("auth", auth, "audience");
                match auth.get("token_ttl_secs") {
                    None => {}
                    Some(Value::Integer(n)) if (1..=MAX_TOKEN_TTL_SECS).contains(n) => {
                        config.auth.token_ttl = Duration::from_secs(*n as u64);
                    }
                    Some(other) => problems.add(
                        "auth.token_ttl_secs",
                        "config.auth.token_ttl.invalid",
                        format!("must be a whole number of seconds from 1 to {MAX_TOKEN_TTL_SECS}, found {other}"),
                    ),
                }
            }
            Some(other) => problems.add(
                "auth",
                "config.value.type",
                format!("must be a table ([auth]), found {}", other.type_str()),
            ),
        }

        match root.get("sources") {
            None => problems.add(
                "sources",
                "config.sources.missing",
                "declare at least one [[sources]] entry with id and write_key",
            ),
            Some(Value::Array(items)) => {
                let mut ids = HashSet::new();
                let mut keys = HashSet::new();
                for (i, item) in items.iter().enumerate() {
                    let path = format!("sources[{i}]");
                    let Value::Table(t) = item else {
                        problems.add(&path, "config.value.type", "must be a table ([[sources]])");
                        continue;
                    };
                    problems.unknown_keys(&path, t, &["id", "name", "write_key"]);
                    let id = match problems.string(&path, t, "id") {
                        None if !t.contains_key("id") => {
                            problems.add(
                                join(&path, "id"),
                                "config.source.id.missing",
                                "every source needs an id",
                            );
                            None
                        }
                        None => None,
                        Some(raw) => match SourceId::parse(&raw) {
                            Ok(id) if !ids.insert(id.clone()) => {
                                problems.add(
                                    join(&path, "id"),
                                    "config.source.id.duplicate",
                                    format!("source id {raw:?} is declared more than once"),
                                );
                                None
                            }
                            Ok(id) => Some(id),
                            Err(why) => {
                                problems.add(
                                    join(&path, "id"),
                                    "config.source.id.invalid",
                                    format!("{raw:?} {why}"),
                                );
                                None
                            }
                        },
                    };
                    let name = problems.string(&path, t, "name");
                    if name
                        .as_deref()
                        .is_some_and(|n| n.chars().any(char::is_control))
                    {
                        problems.add(
                            join(&path, "name"),
                            "config.source.name.invalid",
                            "must not contain control characters (newlines, tabs, NUL, escapes): names are printed in lists and logs",
                        );
                    }
                    let write_key = match problems.string(&path, t, "write_key") {
                        None if !t.contains_key("write_key") => {
                            problems.add(
                                join(&path, "write_key"),
                                "config.source.write_key.missing",
                                "every source needs a write_key (use \"${ENV_NAME}\" to keep it out of the file)",
                            );
                            None
                        }
                        None => None,
                        Some(k) if k.chars().count() < MIN_WRITE_KEY_LEN => {
                            problems.add(
                                join(&path, "write_key"),
                                "config.source.write_key.too_short",
                                format!(
                                    "is {} characters; use at least {MIN_WRITE_KEY_LEN} random characters \
                                     (for example the output of `openssl rand -hex 16`)",
                                    k.chars().count()
                                ),
                            );
                            None
                        }
                        Some(k) if k.chars().any(|c| c.is_whitespace() || c == ':') => {
                            problems.add(
                                join(&path, "write_key"),
                                "config.source.write_key.invalid",
                                "must not contain spaces or ':' (it travels as an HTTP Basic user name)",
                            );
                            None
                        }
                        Some(k) if !keys.insert(k.clone()) => {
                            problems.add(
                                join(&path, "write_key"),
                                "config.source.write_key.duplicate",
                                "the same write key is used by another source; give each source its own",
                            );
                            None
                        }
                        Some(k) => Some(k),
                    };
                    if let (Some(id), Some(write_key)) = (id, write_key) {
                        config.sources.push(SourceConfig {
                            name: name.unwrap_or_else(|| id.to_string()),
                            id,
                            write_key,
                        });
                    }
                }
                if items.is_empty() {
                    problems.add(
                        "sources",
                        "config.sources.missing",
                        "declare at least one [[sources]] entry",
                    );
                }
            }
            Some(other) => problems.add(
                "sources",
                "config.value.type",
                format!(
                    "must be an array of tables ([[sources]]), found {}",
                    other.type_str()
                ),
            ),
        }

        let mut found = Vec::new();
        config.policy = model::read_policy(root.get("policy"), &mut found);
        config.vendors = model::read_vendors(root.get("vendors"), &mut found);
        config.delivery = model::read_delivery(root.get("delivery"), &mut found);
        config.destinations = model::read_destinations(
            root.get("destinations"),
            &config.vendors,
            &config.policy,
            today,
            &mut found,
        );
        for (key, code, message) in found {
            problems.add(key, code, message);
        }

        if problems.0.is_empty() {
            Ok(config)
        } else {
            let mut errors = ConfigErrors(problems.0);
            errors.locate(text);
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "WEB_KEY").then(|| "0123456789abcdef0123".to_string())
    }

    #[test]
    fn valid_file_with_env_substitution() {
        let c = Config::from_toml(
            r#"
            [server]
            listen = "0.0.0.0:9000"
            data_dir = "/var/lib/handoff"
            drain_delay_secs = 15
            [[sources]]
            id = "web"
            write_key = "${WEB_KEY}"
            [[sources]]
            id = "app"
            name = "Mobile app"
            write_key = "prefix-${WEB_KEY}"
            "#,
            &env,
        )
        .unwrap();
        assert_eq!(c.server.listen.port(), 9000);
        assert_eq!(c.server.drain_delay, Duration::from_secs(15));
        assert_eq!(c.sources[0].write_key, "0123456789abcdef0123");
        assert_eq!(c.sources[0].name, "web");
        assert_eq!(c.sources[1].write_key, "prefix-0123456789abcdef0123");
        assert!(
            !format!("{c:?}").contains("0123456789abcdef"),
            "Debug must not print keys"
        );
    }

    #[test]
    fn reports_every_problem_with_its_key() {
        let e = Config::from_toml(
            r#"
            colour = "blue"
            [server]
            listen = "localhost"
            port = 8080
            drain_delay_secs = -1
            [[sources]]
            id = "Web Site"
            write_key = "short"
            [[sources]]
            write_key = "${MISSING_VAR}"
            [[sources]]
            id = "a"
            write_key = "0123456789abcdef0123"
            [[sources]]
            id = "a"
            write_key = "0123456789abcdef0123"
            "#,
            &env,
        )
        .unwrap_err();
        let got: Vec<(&str, &str)> = e.0.iter().map(|p| (p.key.as_str(), p.code)).collect();
        for expected in [
            ("sources[1].write_key", "config.env.missing"),
            ("colour", "config.key.unknown"),
            ("server.port", "config.key.unknown"),
            ("server.listen", "config.server.listen.invalid"),
            (
                "server.drain_delay_secs",
                "config.server.drain_delay.invalid",
            ),
            ("sources[0].id", "config.source.id.invalid"),
            ("sources[0].write_key", "config.source.write_key.too_short"),
            ("sources[1].id", "config.source.id.missing"),
            ("sources[3].id", "config.source.id.duplicate"),
            ("sources[3].write_key", "config.source.write_key.duplicate"),
        ] {
            assert!(got.contains(&expected), "missing {expected:?} in {got:?}");
        }
        let text = e.to_string();
        assert!(
            text.contains("environment variable MISSING_VAR is not set"),
            "{text}"
        );
    }

    #[test]
    fn syntax_errors_and_missing_sources() {
        let e = Config::from_toml("[server\n", &env).unwrap_err();
        assert_eq!(e.0[0].code, "config.syntax");
        let e = Config::from_toml("", &env).unwrap_err();
        assert_eq!(e.0[0].code, "config.sources.missing");
        let e = Config::from_toml("sources = 3", &env).unwrap_err();
        assert_eq!(e.0[0].code, "config.value.type");
    }
}
