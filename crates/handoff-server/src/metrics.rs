//! Prometheus metrics, served as text at `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use handoff_core::ingest::MessageError;
use handoff_store::JournalStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    pub endpoint: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabel {
    pub consumer: String,
}

pub struct Metrics {
    registry: Registry,
    pub accepted: Family<SourceLabel, Counter>,
    pub duplicates: Family<SourceLabel, Counter>,
    pub rejected: Family<CodeLabel, Counter>,
    pub requests: Family<RequestLabel, Counter>,
    pub auth_failures: Family<CodeLabel, Counter>,
    pub commit_seconds: Histogram,
    journal_head: Gauge,
    journal_bytes: Gauge,
    journal_commits: Gauge,
    quarantined: Gauge,
    consumer_lag: Family<ConsumerLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
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
                code: code.to_owned(),
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
        Self {
            registry,
            accepted,
            duplicates,
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

    pub fn reject(&self, code: &str, n: u64) {
        self.rejected
            .get_or_create(&CodeLabel {
                code: code.to_owned(),
            })
            .inc_by(n);
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
