//! Prometheus metrics, served as text at `GET /metrics`.

use std::borrow::Cow;
use std::collections::HashMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use handoff_core::SourceId;
use handoff_core::ingest::MessageError;
use handoff_store::JournalStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: Cow<'static, str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    pub endpoint: &'static str,
    pub status: u16,
}

/// A source's counters, looked up once at start so the hot path does no label allocation.
#[derive(Clone, Default)]
pub struct SourceCounters {
    pub accepted: Counter,
    pub duplicates: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabel {
    pub consumer: String,
}

pub struct Metrics {
    registry: Registry,
    accepted: Family<SourceLabel, Counter>,
    duplicates: Family<SourceLabel, Counter>,
    sources: HashMap<SourceId, SourceCounters>,
    pub rejected: Family<CodeLabel, Counter>,
    requests: Family<RequestLabel, Counter>,
    auth_failures: Family<CodeLabel, Counter>,
    pub commit_seconds: Histogram,
    journal_head: Gauge,
    journal_bytes: Gauge,
    journal_commits: Gauge,
    quarantined: Gauge,
    consumer_lag: Family<ConsumerLabel, Gauge>,
}

impl Metrics {
    /// Metrics for a gateway serving `sources`.
    pub fn new<'a>(sources: impl IntoIterator<Item = &'a SourceId>) -> Self {
        let mut registry = Registry::with_prefix("handoff");
        let accepted = Family::<SourceLabel, Counter>::default();
        registry.register(
            "events_accepted",
            "Events stored durably in the journal",
            accepted.clone(),
        );
        let duplicates = Family::<SourceLabel, Counter>::default();
        registry.register(
            "events_duplicate",
            "Events answered 200 but not stored again: same messageId from the same source within 24 h",
            duplicates.clone(),
        );
        let rejected = Family::<CodeLabel, Counter>::default();
        registry.register(
            "events_rejected",
            "Messages or requests refused, by error code",
            rejected.clone(),
        );
        // Every message-level code is listed from the start, so dashboards see zeros, not gaps.
        for code in MessageError::CODES {
            let _ = rejected.get_or_create(&CodeLabel {
                code: Cow::Borrowed(code),
            });
        }
        let requests = Family::<RequestLabel, Counter>::default();
        registry.register(
            "http_requests",
            "Ingest requests by endpoint and status",
            requests.clone(),
        );
        let auth_failures = Family::<CodeLabel, Counter>::default();
        registry.register(
            "auth_failures",
            "Refused credentials, by error code",
            auth_failures.clone(),
        );
        // 100 µs to ~1.6 s: a commit is one fsync, usually well under a millisecond.
        let commit_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        registry.register(
            "journal_commit_seconds",
            "Time from handing events to the journal until they are durable",
            commit_seconds.clone(),
        );
        let journal_head = Gauge::default();
        registry.register(
            "journal_head_sequence",
            "Sequence number of the newest event",
            journal_head.clone(),
        );
        let journal_bytes = Gauge::default();
        registry.register(
            "journal_bytes",
            "Size of the journal on disk, including its write-ahead log",
            journal_bytes.clone(),
        );
        let journal_commits = Gauge::default();
        registry.register(
            "journal_commits",
            "Transactions (fsyncs) since start; each carries many requests",
            journal_commits.clone(),
        );
        let quarantined = Gauge::default();
        registry.register(
            "quarantine_messages",
            "Messages held in quarantine",
            quarantined.clone(),
        );
        let consumer_lag = Family::<ConsumerLabel, Gauge>::default();
        registry.register(
            "journal_consumer_lag",
            "Events not yet acknowledged by each consumer",
            consumer_lag.clone(),
        );
        let sources = sources
            .into_iter()
            .map(|id| {
                let label = SourceLabel {
                    source: id.to_string(),
                };
                let counters = SourceCounters {
                    accepted: accepted.get_or_create(&label).clone(),
                    duplicates: duplicates.get_or_create(&label).clone(),
                };
                (id.clone(), counters)
            })
            .collect();
        Self {
            registry,
            accepted,
            duplicates,
            sources,
            rejected,
            requests,
            auth_failures,
            commit_seconds,
            journal_head,
            journal_bytes,
            journal_commits,
            quarantined,
            consumer_lag,
        }
    }

    /// Counts `n` refusals with `code`.
    pub fn reject(&self, code: &'static str, n: u64) {
        self.rejected
            .get_or_create(&CodeLabel {
                code: Cow::Borrowed(code),
            })
            .inc_by(n);
    }

    /// Counts a refused credential.
    pub fn auth_failure(&self, code: &'static str) {
        self.auth_failures
            .get_or_create(&CodeLabel {
                code: Cow::Borrowed(code),
            })
            .inc();
    }

    /// Counts one answered ingest request.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        self.requests
            .get_or_create(&RequestLabel { endpoint, status })
            .inc();
    }

    /// The counters of a source, looked up once at start. A source not declared at start (not
    /// expected) still gets counters, created on the spot.
    pub fn source(&self, id: &SourceId) -> SourceCounters {
        self.sources.get(id).cloned().unwrap_or_else(|| {
            let label = SourceLabel {
                source: id.to_string(),
            };
            SourceCounters {
                accepted: self.accepted.get_or_create(&label).clone(),
                duplicates: self.duplicates.get_or_create(&label).clone(),
            }
        })
    }

    /// Renders every metric, with the journal figures taken from `stats`.
    pub fn render(&self, stats: &JournalStats) -> String {
        self.journal_head.set(stats.head as i64);
        self.journal_bytes.set(stats.bytes as i64);
        self.journal_commits.set(stats.commits as i64);
        self.quarantined.set(stats.quarantined as i64);
        for (consumer, acked) in &stats.consumers {
            self.consumer_lag
                .get_or_create(&ConsumerLabel {
                    consumer: consumer.clone(),
                })
                .set(stats.head.saturating_sub(*acked) as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
