//! `handoff plan`: what each destination would receive of a sample event, and why.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use time::Date;

use handoff_core::config::Config;
use handoff_core::consent::SubjectState;
use handoff_core::ingest::RequestSignals;
use handoff_core::policy;

/// Reads a date given as `YYYY-MM-DD`.
pub fn parse_date(s: &str) -> Result<Date, String> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(s, &fmt).map_err(|_| format!("{s:?} is not a date like 2026-11-25"))
}

/// Reads the event file (`-` for stdin).
fn read_event(path: &Path) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_end(&mut body)
            .context("cannot read the event from stdin")?;
    } else {
        body = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    }
    Ok(body)
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
    let body = read_event(event_path)?;
    let now = match as_of {
        Some(day) => day.midnight().assume_utc(),
        None => time::OffsetDateTime::now_utc(),
    };
    let mut plan = policy::plan_message(
        &config.policy,
        &config.destinations,
        &body,
        RequestSignals { gpc },
        now,
        SubjectState::default(),
    )
    .map_err(|e| anyhow::anyhow!("{}: {e} [{}]", event_path.display(), e.code))?;
    handoff_connectors::connector::apply_wire(&mut plan, &config.destinations, now);
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
            println!("  decided payload (before the vendor's mapping):");
            for line in text.lines() {
                println!("    {line}");
            }
        }
        if let Some(w) = &d.wire {
            let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
            println!(
                "  the vendor receives: {} {}",
                text(&w["method"]),
                text(&w["url"])
            );
            for h in w["headers"].as_array().into_iter().flatten() {
                println!("    {}: {}", text(&h[0]), text(&h[1]));
            }
            for line in serde_json::to_string_pretty(&w["body"])?.lines() {
                println!("    {line}");
            }
            let fields: Vec<String> = w["fields"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect();
            println!("  the ledger records: {}", fields.join(", "));
        }
        println!();
    }
    Ok(ExitCode::SUCCESS)
}
