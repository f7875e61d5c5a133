//! `handoff destinations …` and `handoff dead-letters …`: the kill switch and the dead-letter
//! queue, from the command line. They work on the data directory while the gateway runs (it
//! re-reads destination states every 250 ms), and every change is written to the audit log.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::json;

use handoff_store::operator;
use handoff_store::outbox::{DestinationState, OutboxStore};
use handoff_store::sqlite::now_ms;
use handoff_store::state::StateStore;

#[derive(clap::Args)]
pub struct DataDir {
    #[arg(long, default_value = handoff_core::config::DEFAULT_DATA_DIR, env = "HANDOFF_DATA_DIR")]
    pub data_dir: PathBuf,
}

#[derive(Subcommand)]
pub enum DestinationsCommand {
    /// Every destination the gateway has run (healthy ones too): state, circuit breaker, queue
    /// depth and age, dead letters and the last error, one JSON line each.
    Status {
        /// The gateway's configuration, to list destinations that have not run yet too.
        #[arg(long, short, env = "HANDOFF_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Stop sending to a destination; its queue is kept and keeps filling.
    Pause {
        id: String,
        #[arg(long, default_value = "paused by an operator")]
        reason: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Send again (after a pause, a kill, or refused credentials that are now fixed).
    Resume {
        id: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Stop sending and stop deciding: new events are not queued for this destination.
    Kill {
        id: String,
        #[arg(long, default_value = "killed by an operator")]
        reason: String,
        #[command(flatten)]
        dir: DataDir,
    },
}

#[derive(Subcommand)]
pub enum DeadLettersCommand {
    /// Dead letters as JSON lines, oldest first.
    List {
        #[arg(long)]
        destination: Option<String>,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Put dead letters back at the end of their destination's queue: every destination's
    /// without --destination.
    Replay {
        #[arg(long)]
        destination: Option<String>,
        /// Only these (ids from `list`; needs --destination); all of the destination's without.
        #[arg(long = "id", requires = "destination")]
        ids: Vec<i64>,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Delete dead letters for good (one destination at a time: --destination is required).
    Discard {
        #[arg(long)]
        destination: String,
        #[arg(long = "id")]
        ids: Vec<i64>,
        #[command(flatten)]
        dir: DataDir,
    },
}

/// The outbox of an existing data directory (a mistyped `--data-dir` is an error, not a new,
/// empty directory).
pub fn outbox(dir: &Path) -> Result<OutboxStore> {
    crate::require_data_dir(dir)?;
    let path = dir.join(handoff_store::outbox::OUTBOX_FILE);
    if !path.exists() {
        anyhow::bail!(
            "no outbox at {} (is --data-dir right? it is created when `handoff serve` runs with destinations)",
            path.display()
        );
    }
    Ok(OutboxStore::open(dir)?)
}

fn audit_log(dir: &Path) -> Result<StateStore> {
    StateStore::open(dir).context("cannot open the state to audit the change")
}

pub fn destinations(cmd: DestinationsCommand) -> Result<ExitCode> {
    match cmd {
        DestinationsCommand::Status { config, dir } => {
            let store = outbox(&dir.data_dir)?;
            let mut ids = store.destinations()?;
            if let Some(path) = &config {
                match crate::load_config(path)? {
                    Ok(c) => ids.extend(c.destinations.iter().map(|d| d.id.to_string())),
                    Err(errors) => anyhow::bail!("{}: {}", path.display(), errors),
                }
            }
            ids.sort();
            ids.dedup();
            let mut out = std::io::stdout().lock();
            for d in ids {
                let stats = store.stats(&d)?;
                let (state, reason) = store.state(&d)?;
                let age = stats
                    .oldest_created_at_ms
                    .map(|t| (now_ms() - t).max(0) / 1000);
                writeln!(
                    out,
                    "{}",
                    json!({"destination": d, "state": state.as_str(), "reason": reason,
                           "breaker": stats.breaker, "queued": stats.depth, "oldest_age_secs": age,
                           "dead_letters": stats.dead_letters, "last_error": stats.last_error,
                           "last_error_at_ms": stats.last_error_at_ms})
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        DestinationsCommand::Pause { id, reason, dir } => {
            set(&dir.data_dir, &id, DestinationState::Paused, &reason)
        }
        DestinationsCommand::Resume { id, dir } => set(
            &dir.data_dir,
            &id,
            DestinationState::Active,
            "resumed by an operator",
        ),
        DestinationsCommand::Kill { id, reason, dir } => {
            set(&dir.data_dir, &id, DestinationState::Killed, &reason)
        }
    }
}

fn set(dir: &Path, id: &str, state: DestinationState, reason: &str) -> Result<ExitCode> {
    let store = outbox(dir)?;
    operator::set_destination_state(&store, &audit_log(dir)?, "cli", id, state, reason)?;
    println!("{id}: {}", state.as_str());
    Ok(ExitCode::SUCCESS)
}

pub fn dead_letters(cmd: DeadLettersCommand) -> Result<ExitCode> {
    match cmd {
        DeadLettersCommand::List { destination, dir } => {
            let store = outbox(&dir.data_dir)?;
            let mut out = std::io::stdout().lock();
            let mut after = 0;
            loop {
                let page = store.dead_letters(destination.as_deref(), after, 500)?;
                let Some(last) = page.last() else { break };
                after = last.id;
                for d in &page {
                    writeln!(out, "{}", operator::dead_letter_json(d))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DeadLettersCommand::Replay {
            destination: Some(destination),
            ids,
            dir,
        } => take(&dir.data_dir, &destination, &ids, true),
        DeadLettersCommand::Replay {
            destination: None,
            dir,
            ..
        } => {
            let store = outbox(&dir.data_dir)?;
            for destination in store.destinations()? {
                if store.stats(&destination)?.dead_letters > 0 {
                    take(&dir.data_dir, &destination, &[], true)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DeadLettersCommand::Discard {
            destination,
            ids,
            dir,
        } => take(&dir.data_dir, &destination, &ids, false),
    }
}

/// Replays (`requeue`) or discards dead letters of `destination`: those in `ids`, or all.
fn take(dir: &Path, destination: &str, ids: &[i64], requeue: bool) -> Result<ExitCode> {
    let store = outbox(dir)?;
    let chosen = (!ids.is_empty()).then_some(ids);
    let n = operator::take_dead_letters(
        &store,
        &audit_log(dir)?,
        "cli",
        destination,
        chosen,
        requeue,
    )?;
    let done = if requeue { "queued again" } else { "discarded" };
    println!("{n} dead letter(s) of {destination} {done}");
    Ok(ExitCode::SUCCESS)
}
