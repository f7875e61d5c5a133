//! `handoff`: the gateway binary.

use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

mod ops;
mod plan;
mod privacy_cli;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use serde_json::value::RawValue;

use handoff_core::SourceId;
use handoff_core::config::Config;
use handoff_core::time_fmt::{format_millis, from_unix_millis};
use handoff_server::keys::{KeyRing, KeySource, MASTER_KEY_ENV};
use handoff_server::oauth::{Auth, AuthConfig};
use handoff_server::sources::write_key_digest;
use handoff_server::{AppState, SourceKeys};
use handoff_store::Journal;
use handoff_store::sqlite::{JournalReader, SqliteJournal};
use handoff_store::state::StateStore;

/// mimalloc instead of the system allocator: ingest allocates and frees many small buffers per
/// request, and glibc's malloc showed up as ~15 % of CPU in profiles of `/v1/track`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Id of the source the embedded default creates on first start.
const DEFAULT_SOURCE_ID: &str = "default";

#[derive(Parser)]
#[command(
    name = "handoff",
    version,
    about = "Secure, private and seamless handoff of customer data to third parties"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway. Without --config it runs on the embedded default (SQLite in ./handoff-data).
    Serve(ServeArgs),
    /// Validate a configuration file and print every problem found.
    Check {
        /// The configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show what each destination would receive of a sample event, and why; sends nothing.
    Plan {
        /// The configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// A file with one message as an SDK would send it (JSON; `-` reads stdin).
        #[arg(long, short)]
        event: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Decide as on this day (YYYY-MM-DD), e.g. to see which vendor assessments lapse.
        #[arg(long, value_parser = plan::parse_date)]
        as_of: Option<time::Date>,
        /// Decide as if the request carried `Sec-GPC: 1`.
        #[arg(long)]
        gpc: bool,
    },
    /// Decode consent strings.
    #[command(subcommand)]
    Consent(ConsentCommand),
    /// The kill switch: status, pause, resume or kill a destination (works while serving).
    #[command(subcommand)]
    Destinations(ops::DestinationsCommand),
    /// The dead-letter queue: list, replay or discard (works while serving).
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(ops::DeadLettersCommand),
    /// Look inside the journal (read-only; safe while the server runs).
    #[command(subcommand)]
    Journal(JournalCommand),
    /// Manage OAuth clients (machine credentials for the admin API); safe while the server runs.
    #[command(subcommand)]
    Clients(ClientsCommand),
    /// Manage keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The embedded default's sources: list them, rotate a write key (works while serving).
    #[command(subcommand)]
    Sources(SourcesCommand),
    /// Prove the ledger was not rewritten (`audit verify`).
    #[command(subcommand)]
    Audit(privacy_cli::AuditCommand),
    /// Answers from the ledger: what was sent about a person, an incident's exposure, records
    /// of processing.
    #[command(subcommand)]
    Report(privacy_cli::ReportCommand),
    /// Data-subject requests: access, erasure, opt-out.
    #[command(subcommand)]
    Dsr(privacy_cli::DsrCommand),
}

/// Where the state and the master key are, for commands that change state.
#[derive(clap::Args)]
pub(crate) struct StateArgs {
    #[arg(long, default_value = handoff_core::config::DEFAULT_DATA_DIR, env = "HANDOFF_DATA_DIR")]
    pub(crate) data_dir: PathBuf,
    /// File with the master key (base64 of 32 bytes). HANDOFF_MASTER_KEY wins over it; without
    /// either, DATA_DIR/master.key is used (and created if missing).
    #[arg(long, env = "HANDOFF_MASTER_KEY_FILE")]
    pub(crate) master_key_file: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub(crate) enum Format {
    Text,
    Json,
}

#[derive(Subcommand)]
enum ConsentCommand {
    /// Print what an IAB TCF v2.2 TC string says, as one JSON object per string. Strings come
    /// from the arguments, or one per line on stdin. Exits 1 if any string cannot be decoded.
    Decode { strings: Vec<String> },
}

#[derive(Subcommand)]
enum ClientsCommand {
    /// Create a client; its secret is printed once and stored only as an argon2id hash.
    Create {
        #[arg(long)]
        name: String,
        /// Space-separated scopes, e.g. "admin:read audit:read".
        #[arg(long)]
        scopes: Option<String>,
        /// A role bundling scopes: ingest, viewer, monitor, admin, auditor, privacy, vault (see
        /// docs/security.md for the scopes of each).
        #[arg(long)]
        role: Option<String>,
        /// For events:write clients: the source their events are sent as. It must be one the
        /// gateway serves: one of the config's sources (give --config), or the embedded
        /// default's.
        #[arg(long)]
        source: Option<String>,
        /// The gateway's configuration file, to check --source against its sources.
        #[arg(long, short, env = "HANDOFF_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[command(flatten)]
        state: StateArgs,
    },
    /// List clients (never their secrets).
    List {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Revoke a client: its secret stops working and its tokens are refused at once.
    Revoke {
        client_id: String,
        #[command(flatten)]
        state: StateArgs,
    },
}

#[derive(Subcommand)]
enum SourcesCommand {
    /// The sources the embedded default serves (never their keys).
    List {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[arg(long, default_value = handoff_core::config::DEFAULT_DATA_DIR, env = "HANDOFF_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Give a source a new write key, printed once. The old key is still accepted for
    /// --grace-hours, so SDKs can move over without losing events.
    RotateKey {
        id: String,
        /// Hours (0-720) the old key keeps working; 0 stops it at once.
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(0..=720))]
        grace_hours: u32,
        #[arg(long, default_value = handoff_core::config::DEFAULT_DATA_DIR, env = "HANDOFF_DATA_DIR")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Start signing tokens with a new key; tokens signed by earlier keys verify until they expire.
    RotateSigning {
        #[command(flatten)]
        state: StateArgs,
    },
    /// Replace the master key in its key file by a new one and re-wrap every secret under it,
    /// while gateways keep running (they re-read the file).
    RotateMaster {
        #[command(flatten)]
        state: StateArgs,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The configuration file (TOML). Without it, Handoff starts on the embedded default.
    #[arg(long, short, env = "HANDOFF_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, overriding the config (e.g. 127.0.0.1:8080; port 0 picks a free port).
    #[arg(long, env = "HANDOFF_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory for the journal and state, overriding the config.
    #[arg(long, env = "HANDOFF_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Seconds to keep serving after SIGTERM while /readyz reports 503, overriding the config.
    #[arg(long, env = "HANDOFF_DRAIN_DELAY", value_parser = clap::value_parser!(u64).range(0..=handoff_core::config::MAX_DRAIN_DELAY_SECS as u64))]
    drain_delay: Option<u64>,
    /// File with the master key (base64 of 32 bytes), overriding the config. HANDOFF_MASTER_KEY
    /// wins over both; without any, DATA_DIR/master.key is created (fine for trying Handoff only).
    #[arg(long, env = "HANDOFF_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
    /// Log format on standard error.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "HANDOFF_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum JournalCommand {
    /// Write stored events as JSON lines: {"seq", "receivedAt", "source", "messageId", "event"}.
    /// Payloads are encrypted at rest: this needs the master key.
    Dump {
        #[command(flatten)]
        state: StateArgs,
        /// Only events with a sequence number greater than this (or quarantine ids, with --quarantine).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// List quarantined messages (refused at ingest, with their error code) instead of events.
        #[arg(long)]
        quarantine: bool,
    },
    /// Check the journal's integrity; exit status 1 if a problem is found.
    Verify {
        #[arg(long, default_value = handoff_core::config::DEFAULT_DATA_DIR, env = "HANDOFF_DATA_DIR")]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Check { config } => check(&config),
        Command::Plan {
            config,
            event,
            format,
            as_of,
            gpc,
        } => plan::run(&config, &event, format == Format::Json, as_of, gpc),
        Command::Journal(JournalCommand::Dump {
            state,
            after,
            quarantine,
        }) => dump(&state, after, quarantine),
        Command::Journal(JournalCommand::Verify { data_dir }) => verify(&data_dir),
        Command::Clients(cmd) => clients(cmd),
        Command::Destinations(cmd) => ops::destinations(cmd),
        Command::DeadLetters(cmd) => ops::dead_letters(cmd),
        Command::Consent(ConsentCommand::Decode { strings }) => consent_decode(strings),
        Command::Audit(cmd) => privacy_cli::audit(cmd),
        Command::Report(cmd) => privacy_cli::report(cmd),
        Command::Dsr(cmd) => privacy_cli::dsr(cmd),
        Command::Keys(KeysCommand::RotateSigning { state }) => rotate_signing(&state),
        Command::Sources(cmd) => sources(cmd),
        Command::Keys(KeysCommand::RotateMaster { state }) => rotate_master(&state),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn load_config(
    path: &Path,
) -> Result<std::result::Result<Config, handoff_core::config::ConfigErrors>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let config = match Config::from_toml(&text, &|name| std::env::var(name).ok()) {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    // The files a destination's TLS settings name must load now, not at the first delivery.
    let mut problems = Vec::new();
    for (i, d) in config.destinations.iter().enumerate() {
        if let Err(e) = handoff_connectors::connector::for_destination(d) {
            problems.push(handoff_core::config::ConfigProblem {
                key: format!("destinations[{i}].settings"),
                code: e.code,
                message: e.message,
                line: None,
            });
        }
        if let Err(e) =
            handoff_connectors::http::client(&d.tls, handoff_connectors::http::DEFAULT_TIMEOUT)
        {
            problems.push(handoff_core::config::ConfigProblem {
                key: format!("destinations[{i}].tls"),
                code: e.code(),
                message: e.to_string(),
                line: None,
            });
        }
    }
    if problems.is_empty() {
        Ok(Ok(config))
    } else {
        let mut errors = handoff_core::config::ConfigErrors(problems);
        errors.locate(&text);
        Ok(Err(errors))
    }
}

fn consent_decode(strings: Vec<String>) -> Result<ExitCode> {
    let strings = if strings.is_empty() {
        std::io::stdin()
            .lines()
            .collect::<std::io::Result<Vec<String>>>()
            .context("cannot read stdin")?
    } else {
        strings
    };
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut failed = false;
    for s in strings.iter().filter(|s| !s.trim().is_empty()) {
        let line = match handoff_core::consent::tcf::decode(s) {
            Ok(tc) => serde_json::to_string(&tc)?,
            Err(e) => {
                failed = true;
                json!({"error": {"code": "consent.tcf.malformed", "message": e.to_string()}})
                    .to_string()
            }
        };
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn check(path: &Path) -> Result<ExitCode> {
    match load_config(path)? {
        Ok(config) => {
            let plural = |n: usize| if n == 1 { "" } else { "s" };
            println!(
                "{}: OK ({} source{}, {} vendor{}, {} destination{}, listen {}, data_dir {})",
                path.display(),
                config.sources.len(),
                plural(config.sources.len()),
                config.vendors.len(),
                plural(config.vendors.len()),
                config.destinations.len(),
                plural(config.destinations.len()),
                config.server.listen,
                config.server.data_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            eprintln!("{}: {} problem(s)", path.display(), errors.0.len());
            for p in &errors.0 {
                eprintln!("  {p}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: escape codes in a log file or a journald stream
    // are noise for whoever reads or parses it.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(args: ServeArgs) -> Result<ExitCode> {
    init_logs(args.log_format);
    let (mut config, from_file) = match &args.config {
        Some(path) => match load_config(path)? {
            Ok(c) => (c, true),
            Err(errors) => {
                eprintln!("{}: {} problem(s)", path.display(), errors.0.len());
                for p in &errors.0 {
                    eprintln!("  {p}");
                }
                return Ok(ExitCode::FAILURE);
            }
        },
        None => (Config::embedded_default(), false),
    };
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.server.data_dir = dir;
    }
    if let Some(file) = args.master_key_file {
        config.server.master_key_file = Some(file);
    }
    if let Some(secs) = args.drain_delay {
        config.server.drain_delay = std::time::Duration::from_secs(secs);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(config, from_file))
}

async fn run(config: Config, from_file: bool) -> Result<ExitCode> {
    let data_dir = &config.server.data_dir;
    // The data holds raw personal data: 0700 / 0600 whatever the umask, fixed (and said) if a
    // copy, a restore or an older version left it looser.
    if data_dir.exists() {
        for (path, mode) in handoff_store::files::tighten(data_dir)
            .with_context(|| format!("cannot set the modes in {}", data_dir.display()))?
        {
            tracing::warn!(
                path = %path.display(),
                was = format!("{mode:o}"),
                "readable by other users; tightened to owner-only (0700 directories, 0600 files)"
            );
        }
    }
    handoff_store::files::create_dir(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let fd_limit = handoff_server::listener::raise_fd_limit();
    let connections = handoff_server::listener::ConnectionSettings {
        max_connections: config
            .server
            .max_connections
            .unwrap_or_else(|| handoff_server::listener::default_max_connections(fd_limit)),
        header_timeout: config.server.header_timeout,
        max_in_flight: config.server.max_in_flight,
    };
    tracing::info!(
        fd_limit,
        max_connections = connections.max_connections,
        header_timeout_secs = connections.header_timeout.as_secs(),
        max_in_flight = connections.max_in_flight,
        "connection limits"
    );
    let journal = SqliteJournal::open(data_dir)
        .with_context(|| format!("cannot open the journal in {}", data_dir.display()))?;
    tracing::info!(path = %journal.path().display(), "journal open");

    let mut keys = SourceKeys::new();
    let mut new_key = None;
    if from_file {
        for s in &config.sources {
            keys.insert(&s.write_key, s.id.clone());
        }
    } else {
        if journal.sources()?.is_empty() {
            let key = hex::encode(rand::random::<[u8; 16]>());
            journal.insert_source(DEFAULT_SOURCE_ID, "Default source", &write_key_digest(&key))?;
            new_key = Some(key);
        }
        keys.replace_all(stored_keys(journal.sources()?)?);
    }

    // Delivery: every destination's connector and client are built now, so that unusable
    // settings stop the start with the reason instead of failing at the first event.
    let policy = handoff_server::policy_http::PolicyConfig {
        settings: config.policy.clone(),
        vendors: config.vendors.clone(),
        destinations: config.destinations.clone(),
    };

    // Signal handlers go in before we say we are listening: a SIGTERM that arrives right after
    // must still mean a graceful shutdown, not the default instant death.
    let shutdown = shutdown_signal()?;
    if let Some(tls) = &config.server.tls {
        // Fail before announcing anything when the certificate cannot be used.
        handoff_server::tls::server_config(tls)?;
    }
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if config.server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{addr}");
    let issuer = config.auth.issuer.clone().unwrap_or_else(|| url.clone());
    let auth = open_auth(
        data_dir,
        config.server.master_key_file.as_deref(),
        AuthConfig {
            audience: config
                .auth
                .audience
                .clone()
                .unwrap_or_else(|| issuer.clone()),
            issuer,
            token_ttl: config.auth.token_ttl,
        },
    )?;
    // Subjects and the ledger: identifiers are hashed under, and checkpoints signed with,
    // keys sealed under the master key.
    let privacy_keys = handoff_server::privacy::keys(&auth)?;
    // Payloads are encrypted at rest from here on, before anything is served.
    journal.set_cipher(privacy_keys.journal.clone())?;
    let sqlite_journal = Arc::new(journal);
    let journal: Arc<dyn Journal> = sqlite_journal.clone();
    let outbox = Arc::new(handoff_store::outbox::OutboxStore::open(data_dir)?);
    outbox.set_ledger_signer(privacy_keys.ledger.clone());
    outbox.set_identifier_sealer(privacy_keys.sent_ids.clone());
    outbox.start_checkpointer()?;
    let delivery = Arc::new(handoff_server::delivery::Delivery::new(
        outbox.clone(),
        &policy,
        config.delivery.clone(),
        privacy_keys.subjects.clone(),
        privacy_keys.delivery_ids.clone(),
    )?);
    // Requests call the connectors delivery built.
    let connectors = delivery
        .lanes
        .iter()
        .map(|l| (l.destination.clone(), l.connector.clone()))
        .collect();
    let privacy = Arc::new(handoff_server::privacy::Privacy {
        store: outbox.clone(),
        data_dir: data_dir.clone(),
        subject_key: privacy_keys.subjects.clone(),
        destinations: connectors,
        settings: config.policy.clone(),
        journal_cipher: privacy_keys.journal.clone(),
        journal: Some(journal.clone()),
    });
    {
        let mut out = std::io::stdout().lock();
        if !from_file {
            writeln!(
                out,
                "Handoff is running on the embedded default (data in {}).",
                data_dir.display()
            )?;
            match &new_key {
                Some(key) => {
                    writeln!(
                        out,
                        "Created source \"{DEFAULT_SOURCE_ID}\". Its write key is shown this once; keep it:"
                    )?;
                    writeln!(out, "  write key: {key}")?;
                    writeln!(out, "Try it:")?;
                    writeln!(
                        out,
                        "  curl -u '{key}:' {url}/v1/track -H 'Content-Type: application/json' \\\n    -d '{{\"userId\": \"user-1\", \"event\": \"Hello Handoff\"}}'"
                    )?;
                }
                None => writeln!(
                    out,
                    "Source \"{DEFAULT_SOURCE_ID}\" exists; its write key was shown when it was created."
                )?,
            }
        }
        writeln!(out, "listening on {url}")?;
        out.flush()?;
    }
    tracing::info!(%addr, sources = keys.sources().len(), "listening");

    tracing::info!(
        vendors = policy.vendors.len(),
        destinations = policy.destinations.len(),
        "policy loaded"
    );
    let state = AppState::new(journal.clone(), keys, Arc::new(auth), policy);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The embedded default's sources live in its store: re-read them, so a key rotated with
    // `handoff sources rotate-key` is accepted (and the old one dropped after its grace)
    // without a restart.
    let reload = (!from_file).then(|| {
        let (journal, state) = (sqlite_journal.clone(), state.clone());
        handoff_server::supervisor::supervise(
            "sources-reload",
            state.metrics.task_restarts.clone(),
            move || {
                let (journal, state) = (journal.clone(), state.clone());
                async move {
                    loop {
                        tokio::time::sleep(handoff_server::sources::RELOAD_EVERY).await;
                        let journal = journal.clone();
                        let read = tokio::task::spawn_blocking(move || journal.sources()).await;
                        match read.map_err(anyhow::Error::from).and_then(|r| stored_keys(r?)) {
                            Ok(keys) => state.sources.replace_all(keys),
                            Err(e) => tracing::warn!(error = %e, "cannot re-read the sources; keeping the keys in use"),
                        }
                    }
                }
            },
        )
    });
    // The journal is delivery's queue: an event is needed until the subject stage and every
    // destination's cursor have passed it (what failed is copied into a retry set).
    let lowest_cursor: handoff_server::retention::LowestCursor = if delivery.lanes.is_empty() {
        Arc::new(|| Ok(handoff_store::Seq::MAX))
    } else {
        let store = delivery.store.clone();
        let destinations: Vec<String> = delivery
            .lanes
            .iter()
            .map(|l| l.destination.id.clone())
            .collect();
        Arc::new(move || store.lowest_cursor(&destinations))
    };
    let retention = handoff_server::retention::start(
        journal.clone(),
        handoff_server::retention::Retention {
            events: config.server.retention,
            lowest_cursor,
            quarantine: config.server.quarantine_retention,
        },
        &state.metrics,
    );
    let tasks = delivery.start(journal, state.clone(), stop_rx);
    let _ = state.delivery.set(delivery.clone());
    let _ = state.privacy.set(privacy);
    let _ = state
        .ledger_public_key
        .set(privacy_keys.ledger.verifying_key());
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    handoff_server::serve(
        listener,
        state,
        shutdown,
        config.server.drain_delay,
        config.server.tls.clone(),
        connections,
    )
    .await?;
    // Workers finish the call in flight, within a bound: an unrecorded delivery is sent again
    // on the next start, and the vendor deduplicates it on its delivery id.
    for task in tasks {
        let abort = task.abort_handle();
        if tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    retention.abort();
    if let Some(reload) = reload {
        reload.abort();
    }
    // A signed checkpoint at the head, so a tail cut off while stopped is detected.
    if let Err(e) = outbox.checkpoint_ledger() {
        tracing::error!(error = %e, "cannot sign the closing ledger checkpoint");
    }
    Ok(ExitCode::SUCCESS)
}

/// The write keys of the embedded default's stored sources: each current key, and a replaced
/// key until its grace period ends.
fn stored_keys(
    stored: Vec<handoff_store::sqlite::StoredSource>,
) -> Result<Vec<handoff_server::sources::StoredKey>> {
    use handoff_server::sources::StoredKey;
    let digest = |d: &[u8]| -> Result<[u8; 32]> {
        d.try_into()
            .context("a stored write key digest is not 32 bytes; the sources table is damaged")
    };
    let mut keys = Vec::new();
    for s in stored {
        let source = SourceId::parse(&s.id).map_err(anyhow::Error::msg)?;
        keys.push(StoredKey {
            digest: digest(&s.write_key_sha256)?,
            source: source.clone(),
            until_ms: None,
        });
        if let (Some(old), Some(until)) = (&s.previous_key_sha256, s.previous_until_ms) {
            keys.push(StoredKey {
                digest: digest(old)?,
                source,
                until_ms: Some(until),
            });
        }
    }
    Ok(keys)
}

/// Installs the SIGTERM and SIGINT handlers now and returns a future that completes on either.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// Every command but `serve` works on the data of a gateway that has run: a mistyped
/// `--data-dir` (or a command run in the wrong directory) is an error, never a new, empty data
/// directory with its own master key that the real gateway would not know.
pub(crate) fn require_data_dir(dir: &Path) -> Result<()> {
    let journal = dir.join(handoff_store::sqlite::DB_FILE);
    if !journal.exists() {
        anyhow::bail!(
            "no Handoff data in {} (no {}): is --data-dir (or HANDOFF_DATA_DIR) right? It is \
             created when `handoff serve` first runs",
            dir.display(),
            handoff_store::sqlite::DB_FILE
        );
    }
    Ok(())
}

/// The journal's data key, unsealed with the master key, for reading payloads; creates
/// nothing (no master key file, no secret): `None` when no gateway ever made the key, so no
/// payload is sealed.
fn journal_cipher(
    state: &StateArgs,
) -> Result<Option<Arc<handoff_store::sealed_payloads::PayloadCipher>>> {
    let env = std::env::var(MASTER_KEY_ENV).ok();
    let default_file = state.data_dir.join(handoff_server::keys::DEFAULT_KEY_FILE);
    if env.is_none() && state.master_key_file.is_none() && !default_file.exists() {
        anyhow::bail!(
            "event payloads are encrypted at rest: give the master key (HANDOFF_MASTER_KEY or --master-key-file); {} does not exist",
            default_file.display()
        );
    }
    // A file named explicitly is never created.
    let file = state.master_key_file.clone().unwrap_or(default_file);
    let (keys, _) = KeyRing::load(env, Some(&file), &state.data_dir)?;
    let state_db = state.data_dir.join(handoff_store::state::STATE_FILE);
    if !state_db.exists() {
        anyhow::bail!(
            "{} does not exist: it holds the journal's data key (sealed), without which the payloads cannot be read",
            state_db.display()
        );
    }
    let Some(sealed) =
        StateStore::open(&state.data_dir)?.secret(handoff_server::privacy::JOURNAL_KEY_SECRET)?
    else {
        return Ok(None);
    };
    let key: [u8; 32] = keys
        .open(&sealed)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("the journal's data key is not 32 bytes"))?;
    Ok(Some(Arc::new(handoff_server::privacy::journal_cipher(key))))
}

fn dump(state: &StateArgs, after: u64, quarantine: bool) -> Result<ExitCode> {
    require_data_dir(&state.data_dir)?;
    let reader = JournalReader::open(&state.data_dir)?;
    let reader = match quarantine {
        true => reader,
        false => match journal_cipher(state)? {
            Some(cipher) => reader.with_cipher(cipher),
            None => reader,
        },
    };
    let mut out = BufWriter::new(std::io::stdout().lock());
    let result = if quarantine {
        reader.for_each_quarantined(after, |m| {
            let line = json!({
                "id": m.id,
                "receivedAt": format_millis(from_unix_millis(m.received_at_ms)),
                "source": m.source,
                "index": m.index,
                "code": m.code,
                "message": m.message,
                "raw": m.raw,
            });
            writeln!(out, "{line}")
        })
    } else {
        reader.for_each_event(after, |e| {
            // The stored text is copied as it is, never parsed into numbers or strings: a
            // payload a later stage cannot read (written before ingest refused such input)
            // still dumps, and so does every event after it.
            let quote = |s: &str| serde_json::to_string(s).expect("a string serialises");
            let event = match RawValue::from_string(e.payload.clone()) {
                Ok(raw) => raw.get().to_owned(),
                Err(err) => format!(
                    "null,\"unreadable\":{}",
                    quote(&format!("the stored payload is not JSON: {err}"))
                ),
            };
            writeln!(
                out,
                "{{\"seq\":{},\"receivedAt\":{},\"source\":{},\"messageId\":{},\"event\":{event}}}",
                e.seq,
                quote(&format_millis(from_unix_millis(e.received_at_ms))),
                quote(&e.source),
                quote(&e.message_id),
            )
        })
    };
    match result {
        Err(handoff_store::StoreError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            return Ok(ExitCode::SUCCESS);
        }
        other => {
            other?;
        }
    }
    match out.flush() {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens the state store and the authorization server, loading (or creating) the master key.
fn open_auth(data_dir: &Path, master_key_file: Option<&Path>, config: AuthConfig) -> Result<Auth> {
    let (keys, source) = KeyRing::load(
        std::env::var(MASTER_KEY_ENV).ok(),
        master_key_file,
        data_dir,
    )?;
    let current = keys.current();
    match &source {
        KeySource::Created(path) => tracing::warn!(
            path = %path.display(),
            "no master key configured: created one beside the data. Fine for trying Handoff; for \
             production set HANDOFF_MASTER_KEY or --master-key-file (see docs/security.md)"
        ),
        KeySource::File(path) => {
            tracing::info!(path = %path.display(), key = current.id(), "master key loaded")
        }
        KeySource::Env => tracing::info!(
            key = current.id(),
            "master key loaded from HANDOFF_MASTER_KEY"
        ),
    }
    let state = Arc::new(StateStore::open(data_dir)?);
    Ok(Auth::open(state, keys, config)?)
}

/// The authorization server for CLI commands, which issue no tokens (no issuer needed).
pub(crate) fn cli_auth(args: &StateArgs) -> Result<Auth> {
    require_data_dir(&args.data_dir)?;
    open_auth(
        &args.data_dir,
        args.master_key_file.as_deref(),
        AuthConfig {
            issuer: String::new(),
            audience: String::new(),
            token_ttl: handoff_server::oauth::DEFAULT_TOKEN_TTL,
        },
    )
}

fn clients(cmd: ClientsCommand) -> Result<ExitCode> {
    match cmd {
        ClientsCommand::Create {
            name,
            scopes,
            role,
            source,
            config,
            format,
            state,
        } => {
            let scopes = handoff_server::auth_http::scopes_for(scopes.as_deref(), role.as_deref())
                .map_err(anyhow::Error::msg)?;
            if let Some(source) = source
                .as_ref()
                .filter(|_| scopes.contains(handoff_core::auth::Scope::EventsWrite))
            {
                require_data_dir(&state.data_dir)?;
                let known: Vec<String> = match &config {
                    Some(path) => match load_config(path)? {
                        Ok(c) => c.sources.iter().map(|s| s.id.as_str().to_owned()).collect(),
                        Err(errors) => anyhow::bail!("{}: {}", path.display(), errors),
                    },
                    None => JournalReader::open(&state.data_dir)?
                        .sources()?
                        .into_iter()
                        .map(|s| s.id)
                        .collect(),
                };
                if !known.contains(source) {
                    anyhow::bail!(
                        "no source {source:?} {}",
                        match (&config, known.is_empty()) {
                            (None, true) => "here: this gateway runs from a configuration file; give it with --config to check the source against it".to_owned(),
                            (Some(path), _) => format!("in {}; its sources are: {}", path.display(), known.join(", ")),
                            (None, false) => format!("in the embedded default; its sources are: {}", known.join(", ")),
                        }
                    );
                }
            }
            let created =
                cli_auth(&state)?.create_client(&name, &scopes, source.as_deref(), "cli")?;
            if format == Format::Json {
                println!("{}", serde_json::to_string(&created)?);
            } else {
                println!("client_id:     {}", created.client_id);
                println!("client_secret: {}", created.client_secret);
                println!("scopes:        {}", created.scopes.join(" "));
                if let Some(source) = &created.source {
                    println!("source:        {source}");
                }
                println!("The secret is shown this once and stored only as a hash: keep it now.");
            }
            Ok(ExitCode::SUCCESS)
        }
        ClientsCommand::List { format, state } => {
            let list = cli_auth(&state)?.state().clients()?;
            if format == Format::Json {
                let rows: Vec<_> = list
                    .iter()
                    .map(|c| json!({"client_id": c.id, "name": c.name, "scopes": c.scopes.split_whitespace().collect::<Vec<_>>(), "created_at_ms": c.created_at_ms, "revoked_at_ms": c.revoked_at_ms}))
                    .collect();
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                for c in &list {
                    let status = if c.revoked_at_ms.is_some() {
                        "revoked"
                    } else {
                        "active"
                    };
                    // Escaped, so that no stored name (older versions took any) can fake a row.
                    let name = c.name.escape_debug().to_string();
                    println!("{}  {:<8} {:<24} {}", c.id, status, name, c.scopes);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ClientsCommand::Revoke { client_id, state } => {
            if cli_auth(&state)?.revoke_client(&client_id, "cli")? {
                println!("revoked {client_id}; its tokens are refused from now on");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("no active client {client_id:?}");
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

fn rotate_master(args: &StateArgs) -> Result<ExitCode> {
    let auth = cli_auth(args)?;
    let Some(file) = auth.keys().file().map(Path::to_owned) else {
        anyhow::bail!(
            "the master key comes from HANDOFF_MASTER_KEY, which this command cannot change. Put a new \
             key first (HANDOFF_MASTER_KEY=new,old), restart, run this with a key file, or keep the \
             keys in a file (--master-key-file) to rotate without a restart"
        );
    };
    let r = handoff_server::keys::rotate_master(
        &file,
        auth.state(),
        handoff_server::keys::ROTATION_GRACE,
    )?;
    auth.state().audit(
        handoff_server::oauth::now_secs() * 1000,
        "cli",
        "master_key.rotated",
        &json!({ "from": r.from, "to": r.to, "rewrapped": r.rewrapped }).to_string(),
    )?;
    println!(
        "master key rotated to {} in {}; {} secret(s) re-wrapped. Keep a copy of the new key somewhere safe.",
        r.to,
        file.display(),
        r.rewrapped
    );
    Ok(ExitCode::SUCCESS)
}

fn sources(cmd: SourcesCommand) -> Result<ExitCode> {
    match cmd {
        SourcesCommand::List { format, data_dir } => {
            require_data_dir(&data_dir)?;
            let list = JournalReader::open(&data_dir)?.sources()?;
            let now = handoff_store::sqlite::now_ms();
            let grace = |s: &handoff_store::sqlite::StoredSource| {
                s.previous_until_ms
                    .filter(|until| *until > now)
                    .map(|until| format_millis(from_unix_millis(until)))
            };
            if format == Format::Json {
                let rows: Vec<_> = list
                    .iter()
                    .map(|s| json!({"id": s.id, "name": s.name, "previous_key_valid_until": grace(s)}))
                    .collect();
                println!("{}", serde_json::to_string(&rows)?);
            } else if list.is_empty() {
                println!(
                    "no stored sources: a gateway run from a configuration file has its sources (and keys) there"
                );
            } else {
                for s in &list {
                    let old = grace(s)
                        .map(|t| format!("  (previous key accepted until {t})"))
                        .unwrap_or_default();
                    println!("{:<24} {}{old}", s.id, s.name.escape_debug());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SourcesCommand::RotateKey {
            id,
            grace_hours,
            data_dir,
        } => {
            require_data_dir(&data_dir)?;
            let key = hex::encode(rand::random::<[u8; 16]>());
            let grace_ms = i64::from(grace_hours) * 3_600_000;
            if !handoff_store::sqlite::rotate_source_key(
                &data_dir,
                &id,
                &write_key_digest(&key),
                grace_ms,
            )? {
                anyhow::bail!(
                    "no stored source {id:?} in {} (`handoff sources list` shows them; a gateway run from a configuration file has its keys there)",
                    data_dir.display()
                );
            }
            StateStore::open(&data_dir)?.audit(
                handoff_store::sqlite::now_ms(),
                "cli",
                "source.key_rotated",
                &json!({"source": id, "grace_hours": grace_hours}).to_string(),
            )?;
            println!("new write key for {id} (shown this once; keep it): {key}");
            println!(
                "the previous key is accepted for {grace_hours} more hour(s); a running gateway takes the new key within {} s",
                handoff_server::sources::RELOAD_EVERY.as_secs()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn rotate_signing(args: &StateArgs) -> Result<ExitCode> {
    let kid = cli_auth(args)?.rotate_signing_key("cli")?;
    println!("new signing key {kid}; tokens signed by earlier keys verify until they expire");
    Ok(ExitCode::SUCCESS)
}

fn verify(data_dir: &Path) -> Result<ExitCode> {
    require_data_dir(data_dir)?;
    let reader = JournalReader::open(data_dir)?;
    let problems = reader.verify()?;
    if problems.is_empty() {
        println!("{}: OK", data_dir.display());
        Ok(ExitCode::SUCCESS)
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        Ok(ExitCode::FAILURE)
    }
}
