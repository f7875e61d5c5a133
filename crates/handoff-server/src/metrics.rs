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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabel {
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BlockedLabel {
    pub destination: String,
    pub reason: Cow<'static, str>,
}

/// Per-destination delivery figures.
pub struct DeliveryMetrics {
    pub delivered: Family<DestinationLabel, Counter>,
    pub retried: Family<DestinationLabel, Counter>,
    pub dead_lettered: Family<DestinationLabel, Counter>,
    pub credential_failures: Family<DestinationLabel, Counter>,
    pub queue_depth: Family<DestinationLabel, Gauge>,
    pub oldest_age_seconds: Family<DestinationLabel, Gauge>,
    /// 0 closed, 1 half-open, 2 open.
    pub breaker_state: Family<DestinationLabel, Gauge>,
    /// 0 active, 1 paused, 2 killed.
    pub state: Family<DestinationLabel, Gauge>,
    pub latency_seconds: Family<DestinationLabel, Histogram>,
    pub blocked: Family<BlockedLabel, Counter>,
    /// Data-subject requests not yet completed, and those of them past their deadline.
    pub dsr_open: Gauge,
    pub dsr_overdue: Gauge,
    /// Vendor deletion calls that failed (retried), per destination.
    pub dsr_call_failures: Family<DestinationLabel, Counter>,
}

impl DeliveryMetrics {
    pub fn label(destination: &str) -> DestinationLabel {
        DestinationLabel {
            destination: destination.to_owned(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabel {
    pub task: &'static str,
}

/// Client connections (see `listener`).
#[derive(Clone, Default)]
pub struct ConnectionMetrics {
    pub open: Gauge,
    /// Idle connections closed to make room for a new one at the cap.
    pub evicted: Counter,
    /// New connections closed at once: the cap was reached and every open one was busy.
    pub refused: Counter,
    /// Requests answered 503 `server.busy`: `max_in_flight` requests were in handlers.
    pub shed: Counter,
}

pub struct Metrics {
    registry: Registry,
    pub connections: ConnectionMetrics,
    /// Supervised tasks restarted after a panic.
    pub task_restarts: Family<TaskLabel, Counter>,
    /// Quarantined messages deleted by retention.
    pub quarantine_purged: Counter,
    /// Journal events deleted by retention.
    pub journal_purged: Counter,
    pub delivery: DeliveryMetrics,
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
        let task_restarts = Family::<TaskLabel, Counter>::default();
        registry.register(
            "task_restarts",
            "Long-running tasks restarted after a panic (see the logs for the panic)",
            task_restarts.clone(),
        );
        let quarantine_purged = Counter::default();
        registry.register(
            "quarantine_purged",
            "Quarantined messages deleted after [server] quarantine_retention_days",
            quarantine_purged.clone(),
        );
        let journal_purged = Counter::default();
        registry.register(
            "journal_events_purged",
            "Journal events deleted after every destination passed them and [server] retention_hours elapsed",
            journal_purged.clone(),
        );
        let connections = ConnectionMetrics::default();
        registry.register(
            "connections_open",
            "Client connections open now",
            connections.open.clone(),
        );
        registry.register(
            "connections_evicted",
            "Idle client connections closed to make room at the connection cap",
            connections.evicted.clone(),
        );
        registry.register(
            "connections_refused",
            "New client connections closed at once: at the cap with every connection busy",
            connections.refused.clone(),
        );
        registry.register(
            "requests_shed",
            "Requests answered 503 server.busy because [server] max_in_flight requests were being handled",
            connections.shed.clone(),
        );
        let delivery = DeliveryMetrics {
            delivered: Family::default(),
            retried: Family::default(),
            dead_lettered: Family::default(),
            credential_failures: Family::default(),
            queue_depth: Family::default(),
            oldest_age_seconds: Family::default(),
            breaker_state: Family::default(),
            state: Family::default(),
            // 1 ms to ~33 s.
            latency_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
            blocked: Family::default(),
            dsr_open: Gauge::default(),
            dsr_overdue: Gauge::default(),
            dsr_call_failures: Family::default(),
        };
        registry.register(
            "dsr_open",
            "Data-subject requests not yet completed by every vendor",
            delivery.dsr_open.clone(),
        );
        registry.register(
            "dsr_overdue",
            "Open data-subject requests past their deadline: alert on > 0",
            delivery.dsr_overdue.clone(),
        );
        registry.register(
            "dsr_vendor_call_failures",
            "Failed erasure calls to a destination (retried with backoff)",
            delivery.dsr_call_failures.clone(),
        );
        registry.register(
            "delivery_delivered",
            "Items delivered to a destination",
            delivery.delivered.clone(),
        );
        registry.register(
            "delivery_retried",
            "Items scheduled for another attempt",
            delivery.retried.clone(),
        );
        registry.register(
            "delivery_dead_lettered",
            "Items moved to the dead-letter queue",
            delivery.dead_lettered.clone(),
        );
        registry.register(
            "delivery_credential_failures",
            "Calls refused for credentials (401/403): the destination is paused and needs an operator",
            delivery.credential_failures.clone(),
        );
        registry.register(
            "delivery_queue_depth",
            "Items waiting in a destination's queue",
            delivery.queue_depth.clone(),
        );
        registry.register(
            "delivery_oldest_item_age_seconds",
            "Age of the oldest item waiting in a destination's queue",
            delivery.oldest_age_seconds.clone(),
        );
        registry.register(
            "delivery_breaker_state",
            "Circuit breaker of a destination: 0 closed, 1 half-open, 2 open",
            delivery.breaker_state.clone(),
        );
        registry.register(
            "delivery_destination_state",
            "0 active, 1 paused (an operator, or refused credentials), 2 killed",
            delivery.state.clone(),
        );
        registry.register(
            "delivery_latency_seconds",
            "Time from queueing an item to the vendor accepting it",
            delivery.latency_seconds.clone(),
        );
        registry.register(
            "policy_blocked",
            "Decisions not to send, by destination and reason code",
            delivery.blocked.clone(),
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
            connections,
            task_restarts,
            quarantine_purged,
            journal_purged,
            delivery,
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
