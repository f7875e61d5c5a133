//! `handoff-bench`: measures Handoff's ingest against a bare HTTP server, on this machine.
//!
//! `handoff-bench run` starts a bare hyper server (no work: read the body, answer 200) and the
//! release `handoff serve`, each as its own process, and drives load at both from this process
//! over loopback. It prints requests/s, durable events/s, latency p50/p99, the p99 at half the
//! maximum rate, and the gateway's memory at 10,000 events/s. Run it with `benches/run.sh`.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use bytes::Bytes;
use clap::{Parser, Subcommand};

mod delivery;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

const WRITE_KEY: &str = "bench-write-key-0123456789";

#[derive(Parser)]
#[command(about = "Handoff ingest benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole benchmark and print the figures.
    Run {
        /// The handoff binary to measure (build it with --release).
        #[arg(long, default_value = "target/release/handoff")]
        handoff: PathBuf,
        /// Seconds per measured phase.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// Concurrent connections for the maximum-rate phases.
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Events per /v1/batch request.
        #[arg(long, default_value_t = 100)]
        batch_size: usize,
    },
    /// Drive load at a server that is already running (for profiling or other machines).
    Load {
        /// host:port of the server.
        #[arg(long)]
        addr: String,
        /// Events per request: 1 sends /v1/track, more sends /v1/batch.
        #[arg(long, default_value_t = 1)]
        batch_size: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Requests per second in total (default: as fast as the server answers).
        #[arg(long)]
        rate: Option<f64>,
    },
    /// End to end: ingest, policy and delivery to four local vendor sinks (webhook, Meta CAPI,
    /// GA4, Segment forward), until every event has reached every sink.
    Delivery {
        #[arg(long, default_value = "target/release/handoff")]
        handoff: PathBuf,
        /// Seconds of ingest load (batches of 100).
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Ingest rate in events/s (default: as fast as ingest answers).
        #[arg(long)]
        rate: Option<f64>,
        /// The destinations to deliver to (default: all four). `meta-capi,segment` are the
        /// batching connectors; `webhook` and `ga4` (one user per request) send one event per
        /// request.
        #[arg(long, value_delimiter = ',', default_values_t = delivery::SINKS.map(String::from))]
        destinations: Vec<String>,
        /// One of the destinations whose sink answers every request 503: the others' figures
        /// with it dead, and what its backlog costs.
        #[arg(long)]
        dead: Option<String>,
    },
    /// A bare HTTP server that reads each body and answers 200, for comparison.
    Bare {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::Bare { listen } => rt.block_on(bare(listen)),
        Cmd::Delivery {
            handoff,
            seconds,
            connections,
            rate,
            destinations,
            dead,
        } => rt.block_on(delivery::run(
            handoff,
            Duration::from_secs(seconds),
            connections,
            rate,
            &destinations,
            dead.as_deref(),
        )),
        Cmd::Load {
            addr,
            batch_size,
            seconds,
            connections,
            rate,
        } => rt.block_on(async {
            let kind = if batch_size <= 1 {
                Kind::Track
            } else {
                Kind::Batch(batch_size)
            };
            let p = load(&addr, kind, connections, Duration::from_secs(seconds), rate).await?;
            header();
            row(&format!("{addr} x{batch_size}"), &p);
            Ok(())
        }),
        Cmd::Run {
            handoff,
            seconds,
            connections,
            batch_size,
        } => rt.block_on(run(
            handoff,
            Duration::from_secs(seconds),
            connections,
            batch_size,
        )),
    }
}

async fn bare(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let _ = req.into_body().collect().await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                    b"{\"success\":true}",
                ))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A child process that is killed when dropped.
struct Proc {
    child: Child,
    url: String,
}

impl Proc {
    fn start(mut cmd: Command) -> Result<Proc> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        loop {
            let Some(line) = lines.next() else {
                bail!("process exited before listening")
            };
            let line = line?;
            if let Some(url) = line.strip_prefix("listening on ") {
                let url = url.trim().trim_start_matches("http://").to_owned();
                // Keep draining stdout so the child never blocks on a full pipe.
                std::thread::spawn(move || for _ in lines {});
                return Ok(Proc { child, url });
            }
        }
    }

    fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Track,
    Batch(usize),
}

struct Phase {
    requests: u64,
    events: u64,
    errors: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
}

impl Phase {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn eps(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A random-looking 128-bit id from a counter (splitmix64), like the UUIDs SDKs send: ids that
/// arrive in order would flatter the journal's deduplication index.
fn message_id(n: u64) -> String {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    };
    let seed = n.wrapping_add(std::process::id() as u64) << 1;
    format!(
        "{:016x}{:016x}",
        mix(seed.wrapping_mul(0x9e3779b97f4a7c15)),
        mix(seed | 1)
    )
}

pub(crate) fn track_message(id: u64) -> String {
    format!(
        r#"{{"type":"track","userId":"user-{u}","anonymousId":"anon-{u}","event":"Order Completed","messageId":"{mid}","properties":{{"order_id":"o-{id}","total":30.5,"currency":"EUR","items":2}},"context":{{"library":{{"name":"handoff-bench","version":"1"}},"ip":"203.0.113.5","userAgent":"Mozilla/5.0"}},"timestamp":"2026-11-25T12:00:00.000Z"}}"#,
        u = id % 1000,
        mid = message_id(id)
    )
}

fn body(kind: Kind) -> (String, u64) {
    match kind {
        Kind::Track => (track_message(NEXT_ID.fetch_add(1, Ordering::Relaxed)), 1),
        Kind::Batch(n) => {
            let first = NEXT_ID.fetch_add(n as u64, Ordering::Relaxed);
            let mut s = String::with_capacity(n * 330 + 64);
            s.push_str(r#"{"sentAt":"2026-11-25T12:00:00.500Z","batch":["#);
            for i in 0..n as u64 {
                if i > 0 {
                    s.push(',');
                }
                s.push_str(&track_message(first + i));
            }
            s.push_str("]}");
            (s, n as u64)
        }
    }
}

/// Lets the OS write back what earlier phases left dirty, so that each phase starts from the same
/// state instead of paying for the previous one's disk writes.
fn settle() {
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_millis(500));
}

/// Drives `connections` keep-alive connections for `duration`. With `rate`, requests are paced to
/// that many per second in total, and latency counts from each request's scheduled time (so a
/// stall is not hidden by the load generator waiting for it).
async fn load(
    addr: &str,
    kind: Kind,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
) -> Result<Phase> {
    let path = match kind {
        Kind::Track => "/v1/track",
        Kind::Batch(_) => "/v1/batch",
    };
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:"))
    );
    settle();
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (addr, auth) = (addr.to_owned(), auth.clone());
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(&addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let (mut requests, mut events, mut errors) = (0u64, 0u64, 0u64);
            let interval = rate.map(|r| Duration::from_secs_f64(connections as f64 / r));
            let mut next = start
                + interval.map_or(Duration::ZERO, |i| i.mul_f64(c as f64 / connections as f64));
            while Instant::now() < deadline {
                let scheduled = match interval {
                    Some(i) => {
                        tokio::time::sleep_until(next.into()).await;
                        let s = next;
                        next += i;
                        s
                    }
                    None => Instant::now(),
                };
                if scheduled >= deadline {
                    break;
                }
                let (b, n) = body(kind);
                let req = Request::post(path)
                    .header("host", &addr)
                    .header("authorization", &auth)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(b)))?;
                let resp = sender.send_request(req).await?;
                let ok = resp.status().is_success();
                resp.into_body().collect().await?;
                let micros = scheduled.elapsed().as_micros() as u64;
                hist.record(micros.max(1))?;
                if ok {
                    requests += 1;
                    events += n;
                } else {
                    errors += 1;
                }
            }
            anyhow::Ok((hist, requests, events, errors))
        }));
    }
    let mut phase = Phase {
        requests: 0,
        events: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
    };
    for t in tasks {
        let (hist, requests, events, errors) = t.await??;
        phase.hist.add(hist)?;
        phase.requests += requests;
        phase.events += events;
        phase.errors += errors;
    }
    phase.elapsed = start.elapsed();
    Ok(phase)
}

fn header() {
    println!(
        "| {:<34} | {:>10} | {:>12} | {:>8} | {:>8} | {:>6} |",
        "phase", "req/s", "events/s", "p50 ms", "p99 ms", "errors"
    );
    println!(
        "|{:-<36}|{:-<12}|{:-<14}|{:-<10}|{:-<10}|{:-<8}|",
        "", "", "", "", "", ""
    );
}

fn row(name: &str, p: &Phase) {
    println!(
        "| {name:<34} | {:>10.0} | {:>12.0} | {:>8.2} | {:>8.2} | {:>6} |",
        p.rps(),
        p.eps(),
        p.ms(0.50),
        p.ms(0.99),
        p.errors
    );
}

/// One HTTP/1.1 request on a fresh connection; the response body as text.
async fn fetch(addr: &str, req: Request<Full<Bytes>>) -> Result<String> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let text = String::from_utf8(resp.into_body().collect().await?.to_bytes().to_vec())?;
    if !status.is_success() {
        bail!("{status}: {text}");
    }
    Ok(text)
}

/// Reads one metric as Prometheus would: a `monitor` client (made with the CLI) gets a token.
async fn scrape(handoff: &Path, data_dir: &Path, addr: &str, metric: &str) -> Result<f64> {
    let out = Command::new(handoff)
        .args([
            "clients",
            "create",
            "--name",
            "bench",
            "--role",
            "monitor",
            "--format",
            "json",
            "--data-dir",
        ])
        .arg(data_dir)
        .output()?;
    if !out.status.success() {
        bail!(
            "creating a monitor client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let creds: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        creds["client_id"].as_str().unwrap_or_default(),
        creds["client_secret"].as_str().unwrap_or_default()
    ));
    let token: serde_json::Value = serde_json::from_str(
        &fetch(
            addr,
            Request::post("/oauth/token")
                .header("host", addr)
                .header("authorization", format!("Basic {basic}"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from_static(
                    b"grant_type=client_credentials",
                )))?,
        )
        .await?,
    )?;
    let text = fetch(
        addr,
        Request::get("/metrics")
            .header("host", addr)
            .header(
                "authorization",
                format!(
                    "Bearer {}",
                    token["access_token"].as_str().unwrap_or_default()
                ),
            )
            .body(Full::new(Bytes::new()))?,
    )
    .await?;
    text.lines()
        .find(|l| l.starts_with(metric))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{metric} not in /metrics"))
}

async fn run(
    handoff: PathBuf,
    secs: Duration,
    connections: usize,
    batch_size: usize,
) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("handoff-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let config = tmp.join("handoff.toml");
    std::fs::write(
        &config,
        format!("[[sources]]\nid = \"bench\"\nwrite_key = \"{WRITE_KEY}\"\n"),
    )?;

    let me = std::env::current_exe()?;
    let mut bare_cmd = Command::new(&me);
    bare_cmd.args(["bare"]);
    let bare = Proc::start(bare_cmd)?;
    let mut gw_cmd = Command::new(&handoff);
    gw_cmd
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(tmp.join("data"))
        .env("RUST_LOG", "warn");
    let gw = Proc::start(gw_cmd).with_context(|| format!("starting {}", handoff.display()))?;

    println!(
        "Handoff ingest benchmark: {} cores, {connections} connections, {}s per phase, batch of {batch_size}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        secs.as_secs()
    );
    println!("Load comes from this process; the bare server and handoff are separate processes.");
    println!(
        "Before each phase the OS writes back dirty pages (`sync`), so phases do not inherit each other's I/O.\n"
    );
    header();

    // Warm up both servers (connections, caches, the journal's first pages).
    load(
        &bare.url,
        Kind::Track,
        connections,
        Duration::from_secs(1),
        None,
    )
    .await?;
    load(
        &gw.url,
        Kind::Track,
        connections,
        Duration::from_secs(1),
        None,
    )
    .await?;

    let bare_track = load(&bare.url, Kind::Track, connections, secs, None).await?;
    row("bare server, single event", &bare_track);
    let track = load(&gw.url, Kind::Track, connections, secs, None).await?;
    row("handoff /v1/track (durable)", &track);
    let bare_batch = load(&bare.url, Kind::Batch(batch_size), connections, secs, None).await?;
    row(&format!("bare server, batch of {batch_size}"), &bare_batch);
    let batch = load(&gw.url, Kind::Batch(batch_size), connections, secs, None).await?;
    row(
        &format!("handoff /v1/batch x{batch_size} (durable)"),
        &batch,
    );

    let half_track = load(
        &gw.url,
        Kind::Track,
        connections,
        secs,
        Some(track.rps() / 2.0),
    )
    .await?;
    row("handoff /v1/track at half max rate", &half_track);
    let half_batch = load(
        &gw.url,
        Kind::Batch(batch_size),
        connections,
        secs,
        Some(batch.rps() / 2.0),
    )
    .await?;
    row("handoff /v1/batch at half max rate", &half_batch);

    let ten_k = load(&gw.url, Kind::Track, 16, secs, Some(10_000.0)).await?;
    let (rss, _) = gw.rss_kib();
    row("handoff /v1/track at 10,000/s", &ten_k);
    let (_, hwm) = gw.rss_kib();

    let stored = scrape(
        &handoff,
        &tmp.join("data"),
        &gw.url,
        "handoff_journal_head_sequence",
    )
    .await?;
    let answered: u64 = [&track, &batch, &half_track, &half_batch, &ten_k]
        .iter()
        .map(|p| p.events)
        .sum();
    println!();
    println!(
        "/v1/track rate vs bare server:   {:.0} %",
        100.0 * track.rps() / bare_track.rps()
    );
    println!("/v1/batch durable events/s:      {:.0}", batch.eps());
    println!(
        "RSS at 10,000 events/s:          {:.1} MiB (peak over the whole run {:.1} MiB)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "events stored in the journal:    {stored:.0} (measured phases answered 200 for {answered}, plus warm-up)"
    );
    if stored < answered as f64 {
        bail!("the journal holds fewer events than were acknowledged");
    }
    drop(gw);
    drop(bare);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
