//! `handoff plan`: what each destination would receive of a sample event, and why.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use time::Date;

use handoff_core::config::Config;
use handoff_core::consent::SubjectState;
use handoff_core::ids::MessageKind;
use handoff_core::ingest::{self, Endpoint, RequestSignals};
use handoff_core::policy;

/// Reads a date given as `YYYY-MM-DD`.
pub fn parse_date(s: &str) -> Result<Date, String> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(s, &fmt).map_err(|_| format!("{s:?} is not a date like 2026-11-25"))
}

/// Reads the event file (`-` for stdin) and normalises it exactly as ingest would.
fn read_event(path: &Path, gpc: bool) -> Result<Value> {
    let mut body = Vec::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_end(&mut body)
            .context("cannot read the event from stdin")?;
    } else {
        body = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    }
    let raw: Value =
        serde_json::from_slice(&body).with_context(|| format!("{} is not JSON", path.display()))?;
    if raw.get("batch").is_some() {
        bail!("plan takes one message, not a batch: put one message in the file");
    }
    let Some(kind) = raw
        .get("type")
        .and_then(Value::as_str)
        .and_then(MessageKind::parse)
    else {
        bail!("the message needs \"type\": one of track, identify, page, screen, group, alias");
    };
    let mut n = 0;
    let mut new_id = || {
        n += 1;
        format!("planned-message-{n}")
    };
    let parsed = ingest::parse_with_signals(
        Endpoint::Single(kind),
        &body,
        time::OffsetDateTime::now_utc(),
        RequestSignals { gpc },
        &mut new_id,
    )
    .map_err(|e| anyhow::anyhow!("{e} [{}]", e.code()))?;
    if let Some(r) = parsed.rejected.first() {
        bail!(
            "ingest would refuse this message: {} [{}]",
            r.error,
            r.error.code()
        );
    }
    let accepted = parsed.accepted.first().context("ingest accepted nothing")?;
    Ok(serde_json::from_str(&accepted.payload)?)
}

pub fn run(
    config_path: &Path,
    event_path: &Path,
    json: bool,
    as_of: Option<Date>,
    gpc: bool,
) -> Result<ExitCode> {
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let today = as_of.unwrap_or_else(|| time::OffsetDateTime::now_utc().date());
    let config = match Config::from_toml_on(&text, &|name| std::env::var(name).ok(), today) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{}: {} problem(s)", config_path.display(), errors.0.len());
            for p in &errors.0 {
                eprintln!("  {p}");
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    let event = read_event(event_path, gpc)?;
    let plan = policy::plan(
        &config.policy,
        &config.destinations,
        event,
        SubjectState::default(),
        today,
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
        return Ok(ExitCode::SUCCESS);
    }
    if plan.destinations.is_empty() {
        println!("no [[destinations]] are declared: nothing would leave");
    }
    for d in &plan.destinations {
        let purposes: Vec<&str> = d.purposes.iter().map(|p| p.as_str()).collect();
        println!(
            "{} (vendor {}, {} for {}): {}",
            d.id,
            d.vendor,
            d.legal_basis.as_str(),
            purposes.join(", "),
            d.decision.to_uppercase()
        );
        for r in &d.details {
            println!("  {}: {}", r.code, r.message);
        }
        if !d.dropped.is_empty() {
            println!("  dropped: {}", d.dropped.join(", "));
        }
        if let Some(p) = &d.payload {
            let text = serde_json::to_string_pretty(p)?;
            println!("  payload:");
            for line in text.lines() {
                println!("    {line}");
            }
        }
        println!();
    }
    Ok(ExitCode::SUCCESS)
}
