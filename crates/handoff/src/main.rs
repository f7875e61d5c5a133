//! `handoff`: the gateway binary.

use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use serde_json::value::RawValue;

use handoff_core::SourceId;
use handoff_core::config::Config;
use handoff_core::time_fmt::{format_millis, from_unix_millis};
use handoff_server::sources::write_key_digest;
use handoff_server::{AppState, SourceKeys};
use handoff_store::Journal;
use handoff_store::sqlite::{JournalReader, SqliteJournal};

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
    /// Look inside the journal (read-only; safe while the server runs).
    #[command(subcommand)]
    Journal(JournalCommand),
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
    Dump {
        #[arg(long, default_value = handoff_core::config::DEFAULT_DATA_DIR, env = "HANDOFF_DATA_DIR")]
        data_dir: PathBuf,
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
        Command::Journal(JournalCommand::Dump {
            data_dir,
            after,
            quarantine,
        }) => dump(&data_dir, after, quarantine),
        Command::Journal(JournalCommand::Verify { data_dir }) => verify(&data_dir),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(
    path: &Path,
) -> Result<std::result::Result<Config, handoff_core::config::ConfigErrors>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Config::from_toml(&text, &|name| std::env::var(name).ok()))
}

fn check(path: &Path) -> Result<ExitCode> {
    match load_config(path)? {
        Ok(config) => {
            println!(
                "{}: OK ({} source{}, listen {}, data_dir {})",
                path.display(),
                config.sources.len(),
                if config.sources.len() == 1 { "" } else { "s" },
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
        let mut stored = journal.sources()?;
        if stored.is_empty() {
            let key = hex::encode(rand::random::<[u8; 16]>());
            journal.insert_source(DEFAULT_SOURCE_ID, "Default source", &write_key_digest(&key))?;
            stored = journal.sources()?;
            new_key = Some(key);
        }
        for s in stored {
            let digest: [u8; 32] =
                s.write_key_sha256.as_slice().try_into().context(
                    "a stored write key digest is not 32 bytes; the state table is damaged",
                )?;
            keys.insert_digest(digest, SourceId::parse(&s.id).map_err(anyhow::Error::msg)?);
        }
    }

    // Signal handlers go in before we say we are listening: a SIGTERM that arrives right after
    // must still mean a graceful shutdown, not the default instant death.
    let shutdown = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
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
    tracing::info!(%addr, sources = keys.sources().count(), "listening");

    let journal: Arc<dyn Journal> = Arc::new(journal);
    let state = AppState::new(journal, keys);
    handoff_server::serve(listener, state, shutdown, config.server.drain_delay).await?;
    Ok(ExitCode::SUCCESS)
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

fn dump(data_dir: &Path, after: u64, quarantine: bool) -> Result<ExitCode> {
    let reader = JournalReader::open(data_dir)?;
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
            let event = RawValue::from_string(e.payload.clone()).map_err(std::io::Error::other)?;
            let line = json!({
                "seq": e.seq,
                "receivedAt": format_millis(from_unix_millis(e.received_at_ms)),
                "source": e.source,
                "messageId": e.message_id,
                "event": event,
            });
            writeln!(out, "{line}")
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

fn verify(data_dir: &Path) -> Result<ExitCode> {
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
