//! The end-to-end benchmark: events ingested over HTTP, decided for four destinations, and
//! delivered to local sinks speaking each vendor's protocol. It reports the ingest rate, how
//! long until every event reached every sink, and the backlog over time.

use std::convert::Infallible;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{Kind, Proc, WRITE_KEY, load};

pub const SINKS: [&str; 4] = ["webhook", "meta-capi", "ga4", "segment"];

/// Events received per sink.
#[derive(Default)]
struct Counts([AtomicU64; 4]);

/// Serves the four vendor protocols on one port and counts the events each request carries;
/// the `dead` sink answers every request 503.
async fn sinks(counts: Arc<Counts>, dead: Option<usize>) -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let _ = stream.set_nodelay(true);
            let counts = counts.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let counts = counts.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let text = std::str::from_utf8(&body).unwrap_or("");
                        let sink = ["/hook", "/meta", "/ga4", "/seg"]
                            .iter()
                            .position(|p| path.starts_with(p));
                        if sink.is_some() && sink == dead {
                            let mut r = Response::new(Full::new(Bytes::from_static(b"{}")));
                            *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                            return Ok::<_, Infallible>(r);
                        }
                        let (i, n) = if path.starts_with("/hook") {
                            (0, 1)
                        } else if path.starts_with("/meta") {
                            (1, text.matches("\"event_id\"").count())
                        } else if path.starts_with("/ga4") {
                            (2, text.matches("{\"name\":").count())
                        } else {
                            (3, text.matches("\"messageId\"").count())
                        };
                        counts.0[i].fetch_add(n as u64, Ordering::Relaxed);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(url)
}

/// The configuration, with only the destinations whose id is in `only`.
fn config(sink: &str, only: &[usize]) -> String {
    config_all(sink)
        .split("\n[[destinations]]\n")
        .enumerate()
        .filter(|(i, _)| *i == 0 || only.contains(&(i - 1)))
        .map(|(_, part)| part)
        .collect::<Vec<_>>()
        .join("\n[[destinations]]\n")
}

fn config_all(sink: &str) -> String {
    // The vendor's security assessment must be recent for the destinations to be approved.
    let today = time::OffsetDateTime::now_utc().date();
    format!(
        r#"[[sources]]
id = "bench"
write_key = "{WRITE_KEY}"

[[vendors]]
id = "local"
legal_name = "Local sinks"
country = "IE"
dpa_signed = 2025-01-01
last_assessment = {today}
risk_tier = "low"
transfer_mechanism = "adequacy"

[[destinations]]
id = "webhook"
vendor = "local"
connector = "webhook"
purposes = ["support"]
legal_basis = "legitimate_interest"
event_types = ["track"]
allow = ["event", "userId", "properties.*"]
endpoint = "{sink}/hook"
settings = {{ secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" }}

[[destinations]]
id = "meta-capi"
vendor = "local"
connector = "meta_capi"
purposes = ["advertising"]
legal_basis = "legitimate_interest"
event_types = ["track"]
allow = ["event", "properties.total", "properties.currency", "context.ip", "context.userAgent"]
endpoint = "{sink}/meta"
settings = {{ pixel_id = "1", access_token = "bench" }}

[[destinations]]
id = "ga4"
vendor = "local"
connector = "ga4"
purposes = ["analytics"]
legal_basis = "legitimate_interest"
event_types = ["track"]
allow = ["event", "anonymousId", "properties.*"]
endpoint = "{sink}/ga4"
settings = {{ measurement_id = "G-BENCH", api_secret = "bench" }}

[[destinations]]
id = "segment"
vendor = "local"
connector = "segment"
purposes = ["analytics"]
legal_basis = "legitimate_interest"
event_types = ["track"]
allow = ["event", "userId", "properties.*"]
endpoint = "{sink}/seg"
settings = {{ write_key = "bench-forward-key-0123456789" }}
"#
    )
}

pub async fn run(
    handoff: PathBuf,
    secs: Duration,
    connections: usize,
    rate: Option<f64>,
    destinations: &[String],
    dead: Option<&str>,
) -> Result<()> {
    let mut only = Vec::new();
    for d in destinations {
        match SINKS.iter().position(|s| s == d) {
            Some(i) if !only.contains(&i) => only.push(i),
            Some(_) => {}
            None => bail!(
                "unknown destination {d:?}; choose from {}",
                SINKS.join(", ")
            ),
        }
    }
    only.sort_unstable();
    let dead = match dead {
        None => None,
        Some(d) => match SINKS.iter().position(|s| *s == d) {
            Some(i) if only.contains(&i) => Some(i),
            _ => bail!("--dead {d:?} is not one of the destinations delivered to"),
        },
    };
    // What must receive everything: all but the dead one.
    let live: Vec<usize> = only.iter().copied().filter(|i| Some(*i) != dead).collect();
    let names: Vec<&str> = only.iter().map(|&i| SINKS[i]).collect();
    let counts = Arc::new(Counts::default());
    let sink = sinks(counts.clone(), dead).await?;
    let tmp = std::env::temp_dir().join(format!("handoff-delivery-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let config_path = tmp.join("handoff.toml");
    std::fs::write(&config_path, config(&sink, &only))?;
    let mut cmd = Command::new(&handoff);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config_path)
        .arg("--data-dir")
        .arg(tmp.join("data"))
        .env("RUST_LOG", "warn");
    let gw = Proc::start(cmd).with_context(|| format!("starting {}", handoff.display()))?;
    println!(
        "Handoff delivery benchmark: {} cores; ingest /v1/batch x100 from {connections} connections for {}s{}; \
         {} destination(s) ({}) on local sinks.",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        secs.as_secs(),
        rate.map_or(String::new(), |r| format!(" at {r:.0} events/s")),
        only.len(),
        names.join(", ")
    );
    if let Some(d) = dead {
        println!("{} is dead: its sink answers every request 503.", SINKS[d]);
    }

    // The yardstick for the one-event destinations: single POSTs per second this client pushes
    // to the same sink, as many at once as the gateway sends (16), with nothing else running.
    let bare = if only.contains(&0) || only.contains(&2) {
        let rate = bare_posts(&sink, 16, Duration::from_secs(2)).await?;
        counts.0[0].store(0, Ordering::Relaxed);
        println!("bare single POSTs to the sink from this client: {rate:.0} requests/s");
        Some(rate)
    } else {
        None
    };

    let start = Instant::now();
    let ingest = {
        let url = gw.url.clone();
        tokio::spawn(async move {
            load(
                &url,
                Kind::Batch(100),
                connections,
                secs,
                rate.map(|r| r / 100.0),
            )
            .await
        })
    };
    println!(
        "\n{:>6}{}  {:>10}",
        "t (s)",
        names
            .iter()
            .map(|n| format!("  {n:>10}"))
            .collect::<String>(),
        "slowest"
    );
    let mut sent: Option<u64> = None;
    let mut last_print = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if sent.is_none() && ingest.is_finished() {
            let phase = ingest.await?.context("ingest load")?;
            println!(
                "ingest: {} events in {:.1} s = {:.0} events/s, {} errors",
                phase.events,
                phase.elapsed.as_secs_f64(),
                phase.eps(),
                phase.errors
            );
            sent = Some(phase.events);
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            print_row(start, &counts, &only);
            last_print = Instant::now();
        }
    }
    let sent = sent.unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(600);
    // When each destination had received every event.
    let mut done: [Option<Duration>; 4] = [None; 4];
    loop {
        for &i in &live {
            if done[i].is_none() && counts.0[i].load(Ordering::Relaxed) >= sent {
                done[i] = Some(start.elapsed());
            }
        }
        let min = live
            .iter()
            .map(|&i| counts.0[i].load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        if min >= sent {
            break;
        }
        if Instant::now() > deadline {
            print_row(start, &counts, &only);
            bail!("not everything was delivered within 10 minutes");
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            print_row(start, &counts, &only);
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = start.elapsed();
    print_row(start, &counts, &only);
    println!(
        "\nall {sent} events delivered to all {} live destinations in {:.1} s: {:.0} events/s end to end ({:.0} deliveries/s)",
        live.len(),
        all.as_secs_f64(),
        sent as f64 / all.as_secs_f64(),
        live.len() as f64 * sent as f64 / all.as_secs_f64()
    );
    for &i in &live {
        let took = done[i].unwrap_or(all);
        let rate = sent as f64 / took.as_secs_f64();
        let versus = match (bare, i) {
            (Some(b), 0 | 2) => format!(" = {:.0} % of the bare POST rate", 100.0 * rate / b),
            _ => String::new(),
        };
        println!(
            "  {:<10} all delivered after {:.1} s: {rate:.0} events/s{versus}",
            SINKS[i],
            took.as_secs_f64()
        );
    }
    let (rss, hwm) = gw.rss_kib();
    println!(
        "gateway RSS {:.0} MiB (peak {:.0} MiB)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    disk_report(&tmp.join("data"), sent);
    if let Some(d) = dead {
        let copied = rusqlite::Connection::open_with_flags(
            tmp.join("data").join("outbox.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .and_then(|c| {
            c.query_row(
                "SELECT (SELECT count(*) FROM outbox WHERE destination = ?1) + (SELECT count(*) FROM dead_letters WHERE destination = ?1)",
                [SINKS[d]],
                |r| r.get::<_, i64>(0),
            )
        });
        match copied {
            Ok(n) => println!(
                "{}: {sent} events wait for it in the journal; {n} copied into its retry set and dead letters",
                SINKS[d]
            ),
            Err(e) => println!("({}'s retry set not measured: {e})", SINKS[d]),
        }
    }
    for &i in &live {
        let (name, n) = (SINKS[i], counts.0[i].load(Ordering::Relaxed));
        if n != sent {
            println!(
                "note: {name} received {n} (sent {sent}): retries after a lost answer are deduplicated by the vendor"
            );
        }
    }
    drop(gw);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

fn print_row(start: Instant, counts: &Counts, only: &[usize]) {
    let c: Vec<u64> = only
        .iter()
        .map(|&i| counts.0[i].load(Ordering::Relaxed))
        .collect();
    println!(
        "{:>6.1}{}  {:>10}",
        start.elapsed().as_secs_f64(),
        c.iter().map(|n| format!("  {n:>10}")).collect::<String>(),
        c.iter().min().unwrap_or(&0)
    );
}

/// Bytes on disk per event: each file of the data directory (write-ahead logs included), and
/// inside `outbox.db` the ledger, its indexes, the queues and the rest (SQLite's `dbstat`).
fn disk_report(data: &std::path::Path, events: u64) {
    let per = |bytes: u64| bytes as f64 / events.max(1) as f64;
    let mut files: Vec<(String, u64)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir(data) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            // journal.db, journal.db-wal and journal.db-shm count as journal.db.
            let base = name.split('-').next().unwrap_or(&name).to_owned();
            match files.iter_mut().find(|(n, _)| *n == base) {
                Some((_, total)) => *total += len,
                None => files.push((base, len)),
            }
        }
    }
    files.sort();
    let total: u64 = files.iter().map(|(_, b)| b).sum();
    println!(
        "\ndisk: data directory {:.1} MiB after {events} events = {:.0} bytes/event (the event's JSON is about {} bytes)",
        total as f64 / 1048576.0,
        per(total),
        super::track_message(0).len()
    );
    for (name, bytes) in &files {
        println!("  {name:<14} {:>8.0} bytes/event", per(*bytes));
    }
    let parts = rusqlite::Connection::open_with_flags(
        data.join("outbox.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .and_then(|c| {
        let mut stmt = c.prepare("SELECT name, sum(pgsize) FROM dbstat GROUP BY name")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    });
    match parts {
        Ok(rows) => {
            let mut groups: [(&str, u64); 4] = [
                ("ledger", 0),
                ("ledger indexes", 0),
                ("queues", 0),
                ("other", 0),
            ];
            for (name, bytes) in rows {
                let g = if name == "ledger"
                    || name.starts_with("ledger_shapes")
                    || name.starts_with("ledger_checkpoints")
                {
                    0
                } else if name.starts_with("ledger_") || name.starts_with("sqlite_autoindex_ledger")
                {
                    1
                } else if name.starts_with("outbox") || name.starts_with("dead_letters") {
                    2
                } else {
                    3
                };
                groups[g].1 += bytes as u64;
            }
            let line: Vec<String> = groups
                .iter()
                .map(|(n, b)| format!("{n} {:.0}", per(*b)))
                .collect();
            println!(
                "  in outbox.db (bytes/event, pages in use): {}",
                line.join(", ")
            );
        }
        Err(e) => println!("  (outbox.db's tables not measured: {e})"),
    }
}

/// Single POSTs per second to the sink's webhook route from `parallel` keep-alive connections.
async fn bare_posts(sink: &str, parallel: usize, secs: Duration) -> Result<f64> {
    let addr = sink.trim_start_matches("http://").to_owned();
    let until = Instant::now() + secs;
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let (addr, sent) = (addr.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(&addr).await?;
            let _ = stream.set_nodelay(true);
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let body = Bytes::from_static(br#"{"type":"event.track","data":{"event":"bare"}}"#);
            while Instant::now() < until {
                let req = Request::post("/hook")
                    .header("host", &addr)
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))?;
                let resp = send.send_request(req).await?;
                let _ = resp.into_body().collect().await;
                sent.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(sent.load(Ordering::Relaxed) as f64 / secs.as_secs_f64())
}
