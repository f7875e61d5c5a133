//! Delivery: the router that decides each journal event for every destination and queues what
//! may leave, and one worker per destination that sends its queue to the vendor.
//!
//! Isolation: each destination has its own queue, worker, HTTP client and circuit breaker, so a
//! slow or dead vendor only ever delays itself. Ingest never waits on any of it.
//!
//! Guarantees: the router commits its decisions and its journal position together (see
//! [`OutboxStore::route`]); a worker removes an item only after the vendor accepted it, so a
//! crash at any point means, at worst, one more attempt — which the vendor deduplicates on the
//! item's delivery id. Every item is delivered, dead-lettered with a reason, or kept while its
//! destination is paused; nothing is dropped silently.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use handoff_connectors::connector::Connector;
use handoff_connectors::wire::{Classification, Item, wire_fields};
use handoff_core::consent::{ConsentContext, PreferenceUpdate, StoredPreferences, SubjectState};
use handoff_core::policy::model::{DeliverySettings, Destination};
use handoff_core::policy::{Outcome, PreparedEvent, decide};
use handoff_core::subject::{SubjectKey, identifiers};
use handoff_store::ledger::{self, Entry};
use handoff_store::outbox::{
    DestinationState, NewItem, OutboxItem, OutboxStore, Routing, Sent, SentIds,
};
use handoff_store::{Journal, StoreError};
use serde_json::Value;
use tokio::sync::{Notify, watch};

use crate::metrics::{BlockedLabel, DeliveryMetrics};

mod backoff;
mod batching;
mod breaker;
mod erasures;
mod router;
mod worker;

use crate::policy_http::PolicyConfig;
pub use backoff::backoff;
pub(crate) use worker::send_with;

/// Events the router decides per transaction.
const ROUTE_BATCH: usize = 500;
/// How often destination states (set by `handoff destinations …` from another process) are
/// re-read: a pause or kill takes effect within this.
const STATE_POLL: Duration = Duration::from_millis(250);
/// Requests in flight at once to a destination that takes one event per request.
const PARALLEL: usize = 16;
/// Items a one-event destination sends per round (PARALLEL at a time), recorded together:
/// each round reads the queue and records its deliveries once, so rounds of only PARALLEL
/// items spent most of their time waiting for the store while the router wrote.
const ROUND: usize = 256;
/// Reason recorded when a killed destination is not decided for.
pub const KILLED_REASON: &str = "destination.killed";
/// Reason recorded when a stored event cannot be read back (it is blocked for every
/// destination, never guessed at).
pub const UNREADABLE_REASON: &str = "journal.unreadable";
/// The reason codes delivery writes to the ledger besides the policy's
/// [`handoff_core::policy::REASON_CODES`].
pub const LEDGER_REASON_CODES: &[&str] = &[KILLED_REASON, UNREADABLE_REASON, UNDECIDABLE_REASON];
/// Reason recorded when deciding or mapping an event failed (a bug, logged with the event's
/// sequence number): it is blocked for every destination and the pipeline goes on.
pub const UNDECIDABLE_REASON: &str = "event.undecidable";
/// Reason recorded when the destination's connector cannot map a decided event (GA4 without a
/// client id, Stripe given a track call): it would never be sent.
pub const REFUSED_REASON: &str = handoff_core::policy::CONNECTOR_REFUSED;

/// One destination at run time.
pub struct Lane {
    pub destination: Destination,
    /// Shared with data-subject requests, which call the same connector's erasure.
    pub connector: Arc<dyn Connector>,
    /// The destination's purposes as the ledger writes them ("advertising,analytics").
    purposes: String,
    client: reqwest::Client,
    state: AtomicU8,
    wake: Notify,
    /// The destination's `rate_limit_per_sec`, as requests per second.
    limiter: Option<governor::DefaultDirectRateLimiter>,
}

impl Lane {
    pub fn state(&self) -> DestinationState {
        match self.state.load(Ordering::Relaxed) {
            0 => DestinationState::Active,
            1 => DestinationState::Paused,
            _ => DestinationState::Killed,
        }
    }

    fn set_state(&self, s: DestinationState) {
        let v = match s {
            DestinationState::Active => 0,
            DestinationState::Paused => 1,
            DestinationState::Killed => 2,
        };
        if self.state.swap(v, Ordering::Relaxed) != v {
            self.wake.notify_one();
        }
    }
}

/// Everything delivery needs, shared by the router and the workers.
pub struct Delivery {
    pub store: Arc<OutboxStore>,
    pub lanes: Vec<Arc<Lane>>,
    pub settings: DeliverySettings,
    /// Identifiers are resolved to subjects under this key.
    pub subject_key: SubjectKey,
    /// Delivery ids are keyed by source under this secret.
    pub delivery_ids: handoff_connectors::wire::DeliveryIdKey,
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("destination {0}: {1}")]
    Connector(String, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Delivery {
    /// Builds every destination's connector and HTTP client (failing on unusable settings).
    pub fn new(
        store: Arc<OutboxStore>,
        policy: &PolicyConfig,
        settings: DeliverySettings,
        subject_key: SubjectKey,
        delivery_ids: handoff_connectors::wire::DeliveryIdKey,
    ) -> Result<Self, DeliveryError> {
        let mut lanes = Vec::new();
        for d in &policy.destinations {
            let connector = handoff_connectors::connector::for_destination(d)
                .map_err(|e| DeliveryError::Connector(d.id.clone(), e.to_string()))?;
            let client = handoff_connectors::http::client(&d.tls, settings.request_timeout)
                .map_err(|e| DeliveryError::Connector(d.id.clone(), e.to_string()))?;
            let (state, _) = store.state(&d.id)?;
            let lane = Lane {
                destination: d.clone(),
                connector: connector.into(),
                purposes: d
                    .purposes
                    .iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                client,
                state: AtomicU8::new(0),
                wake: Notify::new(),
                limiter: d
                    .rate_limit_per_sec
                    .and_then(std::num::NonZeroU32::new)
                    .map(|n| governor::RateLimiter::direct(governor::Quota::per_second(n))),
            };
            lane.set_state(state);
            lanes.push(Arc::new(lane));
        }
        Ok(Delivery {
            store,
            lanes,
            settings,
            subject_key,
            delivery_ids,
        })
    }

    /// Applies a state change made through the admin API at once (the poller would within
    /// 250 ms).
    pub fn apply_state(&self, destination: &str, state: DestinationState) {
        if let Some(lane) = self.lanes.iter().find(|l| l.destination.id == destination) {
            lane.set_state(state);
        }
    }

    pub fn lane(&self, destination: &str) -> Option<&Arc<Lane>> {
        self.lanes.iter().find(|l| l.destination.id == destination)
    }

    /// Tells a destination's worker that its queue changed.
    pub fn wake(&self, destination: &str) {
        if let Some(lane) = self.lanes.iter().find(|l| l.destination.id == destination) {
            lane.wake.notify_one();
        }
    }

    /// Starts the router, the state poller and one worker per destination; they stop when
    /// `stop` turns true.
    pub fn start(
        self: &Arc<Self>,
        journal: Arc<dyn Journal>,
        app: Arc<crate::AppState>,
        stop: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        if self.lanes.is_empty() {
            return tasks;
        }
        // Each task is supervised: a panic is logged, counted and the task started again
        // from what the store holds (the router from its committed position, a worker from its
        // queue), so one bug never silently ends a destination's delivery.
        let restarts = app.metrics.task_restarts.clone();
        {
            let (delivery, journal, app, stop) = (self.clone(), journal, app.clone(), stop.clone());
            tasks.push(crate::supervisor::supervise(
                "delivery-router",
                restarts.clone(),
                move || {
                    router::router(delivery.clone(), journal.clone(), app.clone(), stop.clone())
                },
            ));
        }
        {
            let (delivery, app, stop) = (self.clone(), app.clone(), stop.clone());
            tasks.push(crate::supervisor::supervise(
                "delivery-states",
                restarts.clone(),
                move || poll_states(delivery.clone(), app.clone(), stop.clone()),
            ));
        }
        {
            let (delivery, app, stop) = (self.clone(), app.clone(), stop.clone());
            tasks.push(crate::supervisor::supervise(
                "dsr-erasures",
                restarts.clone(),
                move || erasures::erasures(delivery.clone(), app.clone(), stop.clone()),
            ));
        }
        for lane in &self.lanes {
            let (delivery, lane, app, stop) =
                (self.clone(), lane.clone(), app.clone(), stop.clone());
            tasks.push(crate::supervisor::supervise(
                "delivery-worker",
                restarts.clone(),
                move || worker::worker(delivery.clone(), lane.clone(), app.clone(), stop.clone()),
            ));
        }
        tasks
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| StoreError::Closed)?
}

/// Sleeps `d`, or less if `stop` turns true or `wake` fires.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>, wake: Option<&Notify>) {
    let woken = async {
        match wake {
            Some(n) => n.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.changed() => {}
        _ = woken => {}
    }
}

async fn poll_states(
    delivery: Arc<Delivery>,
    app: Arc<crate::AppState>,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        for lane in &delivery.lanes {
            let store = delivery.store.clone();
            let id = lane.destination.id.clone();
            let stats_id = id.clone();
            let store2 = delivery.store.clone();
            if let Ok((state, _)) = blocking(move || store.state(&id)).await {
                lane.set_state(state);
            }
            let label = DeliveryMetrics::label(&lane.destination.id);
            app.metrics
                .delivery
                .state
                .get_or_create(&label)
                .set(lane.state() as i64);
            if let Ok(stats) = blocking(move || store2.stats(&stats_id)).await {
                app.metrics
                    .delivery
                    .queue_depth
                    .get_or_create(&label)
                    .set(stats.depth as i64);
                let age = stats
                    .oldest_created_at_ms
                    .map_or(0, |t| (handoff_store::sqlite::now_ms() - t).max(0) / 1000);
                app.metrics
                    .delivery
                    .oldest_age_seconds
                    .get_or_create(&label)
                    .set(age);
            }
        }
        pause(STATE_POLL, &mut stop, None).await;
    }
}
