//! `handoff audit …`, `handoff report …` and `handoff dsr …`: the ledger's answers and
//! data-subject requests from the command line, on the data directory (safe while the gateway
//! runs; vendor erasure calls are made by the running gateway).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};

use handoff_server::privacy::{
    DsrInput, Identity, Privacy, PrivacyError, Report, SubjectQuery, parse_time,
};

use crate::StateArgs;

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub enum ReportFormat {
    Json,
    Csv,
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Walk the ledger's hash chain and signed checkpoints; name the first entry that does
    /// not verify. Exit status 0 when intact, 1 when not.
    Verify {
        /// The ledger's public key (hex), held apart from this machine; without it the key is
        /// derived from the sealed signing key (needs the master key).
        #[arg(long)]
        public_key: Option<String>,
        #[arg(long, value_enum, default_value_t = crate::Format::Text)]
        format: crate::Format,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Print the ledger's public key (hex), to keep somewhere an intruder cannot edit.
    PublicKey {
        #[command(flatten)]
        state: StateArgs,
    },
}

#[derive(clap::Args)]
pub struct Who {
    /// A subject id (sub_…), as reports and requests name them.
    #[arg(long)]
    id: Option<String>,
    #[arg(long)]
    user_id: Option<String>,
    #[arg(long)]
    anonymous_id: Option<String>,
    #[arg(long)]
    email: Option<String>,
}

impl Who {
    fn identity(&self) -> Identity {
        Identity {
            user_id: self.user_id.clone(),
            anonymous_id: self.anonymous_id.clone(),
            email: self.email.clone(),
        }
    }
}

#[derive(Subcommand)]
pub enum ReportCommand {
    /// Everything sent about one person, per vendor.
    Subject {
        #[command(flatten)]
        who: Who,
        #[arg(long, value_enum, default_value_t = ReportFormat::Json)]
        format: ReportFormat,
        #[command(flatten)]
        state: StateArgs,
    },
    /// For an incident at a vendor: the subjects it received data about in a period, with
    /// the categories and fields.
    Exposure {
        #[arg(long)]
        vendor: String,
        /// Start (inclusive): 2026-11-01 or an RFC 3339 time.
        #[arg(long)]
        from: Option<String>,
        /// End (exclusive).
        #[arg(long)]
        to: Option<String>,
        #[arg(long, value_enum, default_value_t = ReportFormat::Json)]
        format: ReportFormat,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Records of processing: handoffs per vendor, purpose and day, with categories.
    Processing {
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        #[arg(long, value_enum, default_value_t = ReportFormat::Json)]
        format: ReportFormat,
        #[command(flatten)]
        state: StateArgs,
    },
}

#[derive(Subcommand)]
pub enum DsrCommand {
    /// File a request (idempotent: the same person's request of a type is returned again).
    File {
        /// access, erasure or opt_out.
        #[arg(long = "type")]
        kind: String,
        #[arg(long)]
        user_id: Option<String>,
        #[arg(long)]
        anonymous_id: Option<String>,
        #[arg(long)]
        email: Option<String>,
        /// Days until it must be complete (default: policy.dsr_deadline_days).
        #[arg(long)]
        deadline_days: Option<u32>,
        /// The configuration (its destinations say how each vendor is told to erase).
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// A request and each vendor's status.
    Status {
        id: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Every request, newest first.
    List {
        #[command(flatten)]
        state: StateArgs,
    },
    /// Mark a vendor's manual part (e.g. Meta) as done.
    Confirm {
        id: String,
        destination: String,
        /// What was done (a ticket number, the vendor's answer), kept in the ledger. One line,
        /// no personal data.
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        state: StateArgs,
    },
}

fn privacy(state: &StateArgs, config: Option<&PathBuf>) -> Result<Privacy> {
    let store = Arc::new(crate::ops::outbox(&state.data_dir)?);
    let auth = crate::cli_auth(state)?;
    let keys = handoff_server::privacy::keys(&auth)?;
    store.set_ledger_signer(keys.ledger);
    store.set_identifier_sealer(keys.sent_ids);
    let (destinations, settings) = match config {
        Some(path) => {
            let config = match crate::load_config(path)? {
                Ok(c) => c,
                Err(errors) => anyhow::bail!("{}: {}", path.display(), errors),
            };
            let mut list = Vec::new();
            for d in config.destinations {
                let c = handoff_connectors::connector::for_destination(&d)?;
                list.push((d, c.into()));
            }
            (list, config.policy)
        }
        None => (Vec::new(), Default::default()),
    };
    Ok(Privacy {
        store,
        data_dir: state.data_dir.clone(),
        subject_key: keys.subjects,
        destinations,
        settings,
        journal_cipher: keys.journal,
        journal: None,
    })
}

fn fail(e: PrivacyError) -> anyhow::Error {
    anyhow::anyhow!("{} ({})", e.message, e.code)
}

fn print_report(report: Report, format: ReportFormat) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match format {
        ReportFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report.json)?)?,
        ReportFormat::Csv => write!(out, "{}", report.to_csv())?,
    }
    Ok(ExitCode::SUCCESS)
}

pub fn audit(cmd: AuditCommand) -> Result<ExitCode> {
    match cmd {
        AuditCommand::PublicKey { state } => {
            let auth = crate::cli_auth(&state)?;
            let keys = handoff_server::privacy::keys(&auth)?;
            println!("{}", handoff_store::ledger::public_key_hex(&keys.ledger));
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify {
            public_key,
            format,
            state,
        } => {
            let store = crate::ops::outbox(&state.data_dir)?;
            let key = match public_key {
                Some(hex) => handoff_store::ledger::parse_public_key(&hex)
                    .context("--public-key is not a hex Ed25519 public key (64 hex digits)")?,
                None => {
                    let auth = crate::cli_auth(&state)?;
                    handoff_server::privacy::keys(&auth)?.ledger.verifying_key()
                }
            };
            let v = handoff_server::privacy::verify(&store, &key)?;
            if format == crate::Format::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                match &v.problem {
                    None => println!(
                        "ledger intact: {} entries, {} signed checkpoints, head {} ({})",
                        v.entries, v.checkpoints, v.head_seq, v.head_hash
                    ),
                    Some(p) => println!(
                        "ledger NOT intact at entry {}: {} ({})",
                        p.seq, p.message, p.code
                    ),
                }
            }
            Ok(if v.problem.is_none() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

pub fn report(cmd: ReportCommand) -> Result<ExitCode> {
    let range = |from: &Option<String>, to: &Option<String>| -> Result<(i64, i64)> {
        Ok((
            from.as_deref()
                .map(parse_time)
                .transpose()
                .map_err(fail)?
                .unwrap_or(0),
            to.as_deref()
                .map(parse_time)
                .transpose()
                .map_err(fail)?
                .unwrap_or(i64::MAX),
        ))
    };
    match cmd {
        ReportCommand::Subject { who, format, state } => {
            let p = privacy(&state, None)?;
            let query = match &who.id {
                Some(id) => SubjectQuery::Id(id.clone()),
                None => SubjectQuery::Identity(who.identity()),
            };
            print_report(p.subject_report(query).map_err(fail)?, format)
        }
        ReportCommand::Exposure {
            vendor,
            from,
            to,
            format,
            state,
        } => {
            let p = privacy(&state, None)?;
            let (from, to) = range(&from, &to)?;
            print_report(p.exposure(&vendor, from, to).map_err(fail)?, format)
        }
        ReportCommand::Processing {
            from,
            to,
            format,
            state,
        } => {
            let p = privacy(&state, None)?;
            let (from, to) = range(&from, &to)?;
            print_report(p.processing(from, to).map_err(fail)?, format)
        }
    }
}

pub fn dsr(cmd: DsrCommand) -> Result<ExitCode> {
    let show = |p: &Privacy, r: &handoff_store::dsr::Request| -> Result<ExitCode> {
        println!(
            "{}",
            serde_json::to_string_pretty(&p.view(r).map_err(fail)?)?
        );
        Ok(ExitCode::SUCCESS)
    };
    match cmd {
        DsrCommand::File {
            kind,
            user_id,
            anonymous_id,
            email,
            deadline_days,
            config,
            state,
        } => {
            if kind == "erasure" && config.is_none() {
                anyhow::bail!(
                    "an erasure needs --config: its destinations say how each vendor is told"
                );
            }
            let p = privacy(&state, config.as_ref())?;
            let input = DsrInput {
                kind,
                identity: Identity {
                    user_id,
                    anonymous_id,
                    email,
                },
                deadline_days,
            };
            let (r, _) = p.file(&input, "cli").map_err(fail)?;
            show(&p, &r)
        }
        DsrCommand::Status { id, state } => {
            let p = privacy(&state, None)?;
            let r = p.get(&id).map_err(fail)?;
            show(&p, &r)
        }
        DsrCommand::List { state } => {
            let p = privacy(&state, None)?;
            let all = p.store.with_reader(handoff_store::dsr::list)?;
            for r in &all {
                println!("{}", serde_json::to_string(&p.view(r).map_err(fail)?)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        DsrCommand::Confirm {
            id,
            destination,
            note,
            state,
        } => {
            let p = privacy(&state, None)?;
            let (r, already) = p
                .confirm(&id, &destination, "cli", note.as_deref())
                .map_err(fail)?;
            if already {
                eprintln!("the {destination} part of {id} was already done; nothing changed");
            }
            show(&p, &r)
        }
    }
}
