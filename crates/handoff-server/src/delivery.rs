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
use std::time::{Duration, Instant};

use handoff_connectors::connector::Connector;
use handoff_connectors::wire::{Classification, Item, wire_fields};
use handoff_core::consent::{ConsentContext, PreferenceUpdate, StoredPreferences, SubjectState};
use handoff_core::policy::model::{DeliverySettings, Destination};
use handoff_core::policy::{Outcome, PreparedEvent, decide};
use handoff_core::subject::{SubjectKey, categories_of, identifiers};
use handoff_store::ledger::{self, Entry};
use handoff_store::outbox::{
    DestinationState, NewItem, OutboxItem, OutboxStore, Routing, Sent, SentIds,
};
use handoff_store::{Journal, StoreError};
use serde_json::Value;
use tokio::sync::{Notify, watch};

use crate::metrics::{BlockedLabel, DeliveryMetrics};
use crate::policy_http::PolicyConfig;

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
    /// Where the journal is (erasure purges the events of suppressed subjects).
    pub data_dir: std::path::PathBuf,
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
        data_dir: &std::path::Path,
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
            data_dir: data_dir.to_owned(),
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
                move || router(delivery.clone(), journal.clone(), app.clone(), stop.clone()),
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
                move || erasures(delivery.clone(), app.clone(), stop.clone()),
            ));
        }
        for lane in &self.lanes {
            let (delivery, lane, app, stop) =
                (self.clone(), lane.clone(), app.clone(), stop.clone());
            tasks.push(crate::supervisor::supervise(
                "delivery-worker",
                restarts.clone(),
                move || worker(delivery.clone(), lane.clone(), app.clone(), stop.clone()),
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

/// The router, in two stages that overlap: one reads the journal and decides the next batch
/// while the other commits the previous one (the commit waits for the outbox, which the
/// workers share; deciding does not).
async fn router(
    delivery: Arc<Delivery>,
    journal: Arc<dyn Journal>,
    app: Arc<crate::AppState>,
    stop: watch::Receiver<bool>,
) {
    let (decided, to_commit) = tokio::sync::mpsc::channel::<Decided>(1);
    tokio::join!(
        decide_stage(
            delivery.clone(),
            journal.clone(),
            app.clone(),
            stop.clone(),
            decided
        ),
        commit_stage(delivery, journal, app, stop, to_commit),
    );
}

/// A batch of journal events, decided, to be committed.
struct Decided {
    events: Arc<Vec<handoff_store::StoredEvent>>,
    upto: handoff_store::Seq,
    plan: Plan,
}

/// Resolves the subjects of `events` (one short transaction) and decides them for every lane
/// without holding the outbox.
fn decide_events(
    delivery: &Delivery,
    settings: &handoff_core::policy::model::PolicySettings,
    events: &[handoff_store::StoredEvent],
) -> Result<Plan, StoreError> {
    let parsed: Vec<Option<Value>> = events.iter().map(parse_event).collect();
    let ids: Vec<Vec<(&str, String)>> = parsed
        .iter()
        .map(|v| {
            v.as_ref().map_or_else(Vec::new, |v| {
                identifiers(v)
                    .iter()
                    .map(|i| (i.kind.as_str(), delivery.subject_key.hash(i)))
                    .collect()
            })
        })
        .collect();
    let subjects = delivery.store.resolve_subjects(&ids)?;
    let now = time::OffsetDateTime::now_utc();
    Ok(decide_batch(
        events,
        parsed,
        subjects,
        &delivery.lanes,
        settings,
        &delivery.delivery_ids,
        now,
    ))
}

/// Decides `events` off the async threads.
async fn decide_off_thread(
    delivery: &Arc<Delivery>,
    app: &crate::AppState,
    events: &Arc<Vec<handoff_store::StoredEvent>>,
) -> Result<Plan, StoreError> {
    let (delivery, events) = (delivery.clone(), events.clone());
    let settings = app.policy.settings.clone();
    tokio::task::spawn_blocking(move || decide_events(&delivery, &settings, &events))
        .await
        .unwrap_or(Err(StoreError::Closed))
}

/// Reads the journal from the router's position and decides batch after batch, a little ahead
/// of what is committed.
async fn decide_stage(
    delivery: Arc<Delivery>,
    journal: Arc<dyn Journal>,
    app: Arc<crate::AppState>,
    mut stop: watch::Receiver<bool>,
    decided: tokio::sync::mpsc::Sender<Decided>,
) {
    let mut head = journal.subscribe();
    let mut next: Option<handoff_store::Seq> = None;
    while !*stop.borrow() {
        let position = match next {
            Some(p) => p,
            None => {
                let store = delivery.store.clone();
                match blocking(move || store.router_position()).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(error = %e, "router cannot read its position; retrying");
                        pause(Duration::from_secs(1), &mut stop, None).await;
                        continue;
                    }
                }
            }
        };
        next = Some(position);
        let events = match journal.read(position, ROUTE_BATCH).await {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "router cannot read the journal; retrying");
                pause(Duration::from_secs(1), &mut stop, None).await;
                continue;
            }
        };
        let Some(upto) = events.last().map(|e| e.seq) else {
            tokio::select! {
                _ = head.changed() => {}
                _ = stop.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        };
        let events = Arc::new(events);
        match decide_off_thread(&delivery, &app, &events).await {
            Ok(plan) => {
                // Waits while a decided batch is already waiting: at most two ahead of the
                // commit (one waiting, one decided meanwhile). One ahead was 5 % slower in the
                // delivery benchmark; a batch decided on stale state is decided again.
                if decided.send(Decided { events, upto, plan }).await.is_err() {
                    return;
                }
                next = Some(upto);
            }
            Err(e) => {
                tracing::error!(error = %e, "router cannot resolve subjects; retrying");
                pause(Duration::from_secs(1), &mut stop, None).await;
            }
        }
    }
}

/// Commits each decided batch with its ledger entries and the router's new position, in
/// order. A batch that cannot be committed as decided (an erasure, opt-out or merge landed
/// meanwhile, or the previous batch changed a subject it decided on) is decided again with
/// what is stored now; one that fails is tried again, and nothing after it is committed first.
async fn commit_stage(
    delivery: Arc<Delivery>,
    journal: Arc<dyn Journal>,
    app: Arc<crate::AppState>,
    mut stop: watch::Receiver<bool>,
    mut to_commit: tokio::sync::mpsc::Receiver<Decided>,
) {
    let mut failures = 0u32;
    while let Some(Decided {
        events,
        upto,
        mut plan,
    }) = to_commit.recv().await
    {
        let routed = loop {
            let store = delivery.store.clone();
            let committed =
                tokio::task::spawn_blocking(move || store.route_with(upto, |r| plan.apply(r)))
                    .await
                    .unwrap_or(Err(StoreError::Closed));
            match committed {
                Ok(routed) => break routed,
                Err(StoreError::Conflict(why)) => {
                    tracing::debug!(reason = %why, "routing batch decided again");
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!(error = %e, failures, "router cannot commit its decisions; retrying");
                    pause(
                        Duration::from_millis(200 * u64::from(failures.min(25))),
                        &mut stop,
                        None,
                    )
                    .await;
                }
            }
            plan = loop {
                if *stop.borrow() {
                    // Not committed: decided again after the restart.
                    return;
                }
                match decide_off_thread(&delivery, &app, &events).await {
                    Ok(p) => break p,
                    Err(e) => {
                        tracing::error!(error = %e, "router cannot resolve subjects; retrying");
                        pause(Duration::from_secs(1), &mut stop, None).await;
                    }
                }
            };
        };
        failures = 0;
        let Routed {
            blocked,
            wake,
            erase,
        } = routed;
        if !erase.is_empty() {
            // Events of suppressed subjects are kept no longer than deciding took.
            let dir = delivery.data_dir.clone();
            if let Err(e) =
                blocking(move || handoff_store::sqlite::erase_events(&dir, &erase)).await
            {
                tracing::error!(error = %e, "cannot erase the events of suppressed subjects; the next erasure request for them will");
            }
        }
        for (destination, reason) in &blocked {
            app.metrics
                .delivery
                .blocked
                .get_or_create(&BlockedLabel {
                    destination: destination.clone(),
                    reason: (*reason).into(),
                })
                .inc();
        }
        for (lane, wake) in delivery.lanes.iter().zip(wake) {
            if wake {
                lane.wake.notify_one();
            }
        }
        // For the consumer-lag metric; the position that counts is in the outbox.
        let _ = journal.ack("router", upto).await;
    }
}

/// What one routing batch decided.
struct Routed {
    blocked: Vec<(String, &'static str)>,
    /// Per lane: it has new items.
    wake: Vec<bool>,
    /// Journal events to erase once committed (their subject is suppressed).
    erase: Vec<handoff_store::Seq>,
}

/// A batch's decisions, made without touching the store, to be written in one transaction.
struct Plan {
    routed: Routed,
    items: Vec<NewItem>,
    entries: Vec<Entry>,
    /// Stored preferences changed by identify calls (subject, JSON), last one per subject.
    preferences: Vec<(String, String)>,
    /// Each subject's state as decided on; if an erasure, an opt-out or a merge changed it
    /// before the commit, the batch is decided again.
    basis: Vec<(String, handoff_store::subjects::Basis)>,
}

impl Plan {
    fn apply(self, r: &mut Routing<'_>) -> Result<Routed, StoreError> {
        for (subject, basis) in &self.basis {
            if r.subject_basis(subject)?.as_ref() != Some(basis) {
                return Err(StoreError::Conflict(format!(
                    "subject {subject} changed while its events were decided"
                )));
            }
        }
        for (subject, json) in &self.preferences {
            r.set_preferences(subject, json)?;
        }
        for item in &self.items {
            r.queue(item)?;
        }
        for (destination, reason) in &self.routed.blocked {
            r.block(destination, reason)?;
        }
        for e in self.entries {
            r.record(e);
        }
        Ok(self.routed)
    }
}

/// The event, or `None` when it was erased before routing or cannot be read.
fn parse_event(e: &handoff_store::StoredEvent) -> Option<Value> {
    if e.payload == handoff_store::sqlite::ERASED_PAYLOAD {
        return None;
    }
    serde_json::from_str(&e.payload).ok()
}

fn decision_entry(e: &handoff_store::StoredEvent, subject: &str, lane: &Lane) -> Entry {
    let d = &lane.destination;
    Entry {
        kind: ledger::kind::DECISION,
        event_seq: e.seq,
        message_id: e.message_id.clone(),
        subject: subject.to_owned(),
        destination: d.id.clone(),
        vendor: d.vendor.id.clone(),
        purposes: lane.purposes.clone(),
        legal_basis: d.legal_basis.as_str().to_owned(),
        ..Entry::default()
    }
}

/// Decides each event for every destination, with its subject's stored state: what to queue,
/// what is blocked and why, and a ledger entry for every decision.
fn decide_batch(
    events: &[handoff_store::StoredEvent],
    parsed: Vec<Option<Value>>,
    subjects: Vec<Option<handoff_store::subjects::Subject>>,
    lanes: &[Arc<Lane>],
    settings: &handoff_core::policy::model::PolicySettings,
    delivery_ids: &handoff_connectors::wire::DeliveryIdKey,
    now: time::OffsetDateTime,
) -> Plan {
    let today = now.date();
    let mut plan = Plan {
        routed: Routed {
            blocked: Vec::new(),
            wake: vec![false; lanes.len()],
            erase: Vec::new(),
        },
        items: Vec::new(),
        entries: Vec::with_capacity(events.len() * lanes.len()),
        preferences: Vec::new(),
        basis: Vec::new(),
    };
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    // Data categories per list of field names.
    let mut categories: std::collections::HashMap<String, String> =
        std::collections::HashMap::new();
    // Preferences as this batch left them (an identify changes what later events see).
    let mut changed: std::collections::HashMap<String, StoredPreferences> =
        std::collections::HashMap::new();
    for ((e, value), subject) in events.iter().zip(parsed).zip(subjects) {
        let Some(value) = value else {
            // Erased before it was routed, or unreadable: recorded, never guessed at.
            let reason = if e.payload == handoff_store::sqlite::ERASED_PAYLOAD {
                "subject.suppressed"
            } else {
                tracing::warn!(
                    seq = e.seq,
                    source = %e.source,
                    "journal.unreadable: a stored event cannot be parsed; blocked for every destination"
                );
                UNREADABLE_REASON
            };
            for lane in lanes {
                plan.routed
                    .blocked
                    .push((lane.destination.id.clone(), reason));
                let mut entry = decision_entry(e, "", lane);
                entry.outcome = "block".into();
                entry.reasons = reason.into();
                plan.entries.push(entry);
            }
            continue;
        };
        let subject_id = subject.as_ref().map_or("", |s| s.id.as_str()).to_owned();
        // One event that makes deciding or mapping fail (a bug) must not halt the pipeline:
        // what it added is taken back, it is blocked for every destination with
        // `event.undecidable`, and the rest flow on.
        let marks = (
            plan.entries.len(),
            plan.items.len(),
            plan.routed.blocked.len(),
            plan.routed.erase.len(),
        );
        let preferences_before = changed.get(&subject_id).cloned();
        let decided = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Some(s) = &subject
                && seen.insert(s.id.clone())
            {
                plan.basis.push((
                    s.id.clone(),
                    (None, s.suppressed_at_ms, s.preferences.clone()),
                ));
            }
            let stored = changed.get(&subject_id).cloned().or_else(|| {
                subject
                    .as_ref()
                    .and_then(|s| s.preferences.as_deref())
                    .and_then(StoredPreferences::from_json)
            });
            let mut state = SubjectState {
                suppressed: subject
                    .as_ref()
                    .is_some_and(|s| s.suppressed_at_ms.is_some()),
                preferences: stored,
            };
            if state.suppressed {
                plan.routed.erase.push(e.seq);
            } else if value.get("type").and_then(Value::as_str) == Some("identify")
                && let Some(Ok(update)) = PreferenceUpdate::from_identify(&value)
                && !subject_id.is_empty()
            {
                let next = state.preferences.clone().unwrap_or_default().apply(&update);
                changed.insert(subject_id.clone(), next.clone());
                state.preferences = Some(next);
            }
            let prepared = PreparedEvent::new(value, settings);
            let consent =
                ConsentContext::from_event(prepared.value(), &settings.consent_fields, state);
            for (i, lane) in lanes.iter().enumerate() {
                let d = &lane.destination;
                let mut entry = decision_entry(e, &subject_id, lane);
                if lane.state() == DestinationState::Killed {
                    plan.routed.blocked.push((d.id.clone(), KILLED_REASON));
                    entry.outcome = "block".into();
                    entry.reasons = KILLED_REASON.into();
                    plan.entries.push(entry);
                    continue;
                }
                let decision = decide(&prepared, &consent, d, today);
                let reasons: Vec<&str> = decision.reasons.iter().map(|r| r.code).collect();
                entry.reasons = reasons.join(",");
                match decision.outcome {
                    Outcome::Send(payload) => {
                        // The connector's mapping, as pure code, inside the decision: the ledger
                        // records the field names of what the vendor receives, and what the
                        // connector could never send is blocked here, with its reason.
                        let delivery_id = delivery_ids.id(&d.id, &e.source, &e.message_id);
                        let wire = serde_json::from_str::<Value>(&payload.0)
                            .map_err(|e| format!("the decided payload cannot be read: {e}"))
                            .and_then(|decided| {
                                let item = Item {
                                    message_id: &e.message_id,
                                    delivery_id: &delivery_id,
                                    vendor_ref: None,
                                    payload: &decided,
                                };
                                lane.connector.wire_body(&item, now)
                            });
                        let fields = match wire {
                            Ok(body) => wire_fields(&body),
                            Err(why) => {
                                plan.routed.blocked.push((d.id.clone(), REFUSED_REASON));
                                entry.outcome = "block".into();
                                entry.reasons = if entry.reasons.is_empty() {
                                    REFUSED_REASON.into()
                                } else {
                                    format!("{},{REFUSED_REASON}", entry.reasons)
                                };
                                entry.detail = why;
                                plan.entries.push(entry);
                                continue;
                            }
                        };
                        entry.fields = fields.join(",");
                        // Most events of a batch share a few shapes.
                        entry.categories = categories
                            .entry(entry.fields.clone())
                            .or_insert_with(|| {
                                categories_of(fields.iter().map(String::as_str)).join(",")
                            })
                            .clone();
                        entry.outcome = "send".into();
                        plan.items.push(NewItem {
                            destination: d.id.clone(),
                            vendor: d.vendor.id.clone(),
                            seq: e.seq,
                            message_id: e.message_id.clone(),
                            delivery_id,
                            subject: subject_id.clone(),
                            shape: entry.shape(),
                            payload: payload.0,
                        });
                        plan.routed.wake[i] = true;
                    }
                    Outcome::Block => {
                        plan.routed
                            .blocked
                            .push((d.id.clone(), decision.reasons[0].code));
                        entry.outcome = "block".into();
                    }
                }
                plan.entries.push(entry);
            }
        }));
        if decided.is_err() {
            tracing::error!(
                seq = e.seq,
                source = %e.source,
                "event.undecidable: deciding or mapping this event failed; blocked for every destination"
            );
            plan.entries.truncate(marks.0);
            plan.items.truncate(marks.1);
            plan.routed.blocked.truncate(marks.2);
            plan.routed.erase.truncate(marks.3);
            match preferences_before {
                Some(p) => {
                    changed.insert(subject_id.clone(), p);
                }
                None => {
                    changed.remove(&subject_id);
                }
            }
            for lane in lanes {
                plan.routed
                    .blocked
                    .push((lane.destination.id.clone(), UNDECIDABLE_REASON));
                let mut entry = decision_entry(e, &subject_id, lane);
                entry.outcome = "block".into();
                entry.reasons = UNDECIDABLE_REASON.into();
                plan.entries.push(entry);
            }
        }
    }
    plan.preferences = changed.into_iter().map(|(s, p)| (s, p.to_json())).collect();
    plan
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

/// How often due vendor erasure calls are looked for.
const ERASURE_POLL: Duration = Duration::from_secs(1);

/// Sends the vendor calls of erasure requests, with retries, and keeps the DSR metrics.
async fn erasures(
    delivery: Arc<Delivery>,
    app: Arc<crate::AppState>,
    mut stop: watch::Receiver<bool>,
) {
    use handoff_connectors::erasure::{Erasure, ErasureTarget};
    use handoff_store::dsr;
    while !*stop.borrow() {
        let store = delivery.store.clone();
        let now = handoff_store::sqlite::now_ms();
        let due = blocking(move || {
            store.with_conn(|c| {
                Ok((
                    dsr::due(c, now, 16)?,
                    dsr::open_count(c)?,
                    dsr::overdue(c, now)?,
                ))
            })
        })
        .await;
        let due = match due {
            Ok((due, open, overdue)) => {
                app.metrics.delivery.dsr_open.set(open as i64);
                app.metrics.delivery.dsr_overdue.set(overdue as i64);
                due
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read data-subject requests; retrying");
                Vec::new()
            }
        };
        for (id, task) in due {
            let target: Option<ErasureTarget> = task
                .target
                .as_deref()
                .and_then(|t| serde_json::from_str(t).ok());
            // Ok: the vendor confirmed. Retry: try again later (not before `after`). Manual:
            // Handoff cannot do it; an operator must (the reason says what to do).
            enum Step {
                Done,
                Retry(String, Option<Duration>),
                Manual(String),
            }
            let step = match (delivery.lane(&task.destination), target) {
                (None, _) => Step::Manual(format!(
                    "{} is no longer configured: ask the vendor to erase the person by hand, then confirm",
                    task.destination
                )),
                (_, None) => Step::Manual(
                    "the request's target is unreadable; ask the vendor by hand, then confirm"
                        .into(),
                ),
                (Some(lane), Some(target)) => {
                    match lane
                        .connector
                        .erasure(&target, time::OffsetDateTime::now_utc())
                    {
                        Erasure::Calls(calls) => {
                            let mut step = Step::Done;
                            for call in calls {
                                match send_with(lane, call, true).await.0 {
                                    Classification::Delivered => {}
                                    Classification::Retry { why, after } => {
                                        step = Step::Retry(why, after);
                                        break;
                                    }
                                    Classification::Permanent { why }
                                    | Classification::Credentials { why } => {
                                        step = Step::Manual(format!(
                                            "the vendor refused the deletion call ({why}); fix the destination's settings and ask again, or erase by hand and confirm"
                                        ));
                                        break;
                                    }
                                }
                            }
                            step
                        }
                        Erasure::NothingHeld(why) | Erasure::Manual(why) => Step::Manual(why),
                    }
                }
            };
            let outcome: Result<(), (String, Option<Duration>, bool)> = match step {
                Step::Done => Ok(()),
                Step::Retry(why, after) => Err((why, after, false)),
                Step::Manual(why) => Err((why, None, true)),
            };
            let store = delivery.store.clone();
            let now = handoff_store::sqlite::now_ms();
            let recorded = match outcome {
                Ok(()) => {
                    tracing::info!(dsr = %id, destination = %task.destination, "vendor confirmed the erasure");
                    blocking(move || {
                        store.transact(|tx| {
                            // Not if the request was filed again meanwhile, naming more:
                            // the vendor is called again with the fuller target.
                            let entry = dsr::confirm_erasure(
                                tx,
                                &id,
                                &task.destination,
                                &task.vendor,
                                "the vendor accepted the deletion",
                                task.target.as_deref(),
                                now,
                            )?;
                            Ok(((), entry.into_iter().collect()))
                        })
                    })
                    .await
                }
                Err((why, _, true)) => {
                    // The reason may quote the vendor's answer, which may name the person: the
                    // task holds it; the log only says that an operator is needed.
                    tracing::warn!(dsr = %id, destination = %task.destination, "erasure needs an operator: see `handoff dsr status`");
                    blocking(move || {
                        store.with_conn(|c| {
                            dsr::task_manual(
                                c,
                                &id,
                                &task.destination,
                                &why,
                                task.target.as_deref(),
                            )
                        })
                    })
                    .await
                }
                Err((why, after, false)) => {
                    tracing::warn!(dsr = %id, destination = %task.destination, reason = %why, "erasure call failed; will retry");
                    app.metrics
                        .delivery
                        .dsr_call_failures
                        .get_or_create(&DeliveryMetrics::label(&task.destination))
                        .inc();
                    let wait = backoff(
                        &DeliverySettings {
                            retry_base: Duration::from_secs(1),
                            retry_max: Duration::from_secs(3600),
                            ..delivery.settings.clone()
                        },
                        task.attempts,
                    )
                    .max(Duration::from_millis(200))
                    .max(after.unwrap_or_default());
                    let next = now + wait.as_millis() as i64;
                    blocking(move || {
                        store.with_conn(|c| {
                            dsr::task_retry(
                                c,
                                &id,
                                &task.destination,
                                next,
                                &why,
                                task.target.as_deref(),
                            )
                        })
                    })
                    .await
                }
            };
            if let Err(e) = recorded {
                tracing::error!(error = %e, "cannot record an erasure call's outcome; it will be made again");
            }
        }
        pause(ERASURE_POLL, &mut stop, None).await;
    }
}

/// Exponential backoff with full jitter: a random delay up to `base * 2^attempts`, capped.
pub fn backoff(settings: &DeliverySettings, attempts: u32) -> Duration {
    let cap = settings
        .retry_base
        .saturating_mul(1u32 << attempts.min(20))
        .min(settings.retry_max);
    let ms = cap.as_millis().max(1) as u64;
    Duration::from_millis(rand::random_range(0..=ms))
}

/// Parses `Retry-After`: seconds, or an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let fmt = time::format_description::parse_borrowed::<2>(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT",
    )
    .ok()?;
    let at = time::PrimitiveDateTime::parse(v, &fmt).ok()?.assume_utc();
    let wait = at - time::OffsetDateTime::now_utc();
    Some(Duration::from_secs(wait.whole_seconds().max(0) as u64))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Breaker {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

impl Breaker {
    /// As operators see it (`destinations status`, the admin API).
    fn name(self) -> &'static str {
        match self {
            Breaker::Closed => "closed",
            Breaker::Open { .. } => "open",
            Breaker::HalfOpen => "half_open",
        }
    }
}

async fn worker(
    delivery: Arc<Delivery>,
    lane: Arc<Lane>,
    app: Arc<crate::AppState>,
    mut stop: watch::Receiver<bool>,
) {
    let id = lane.destination.id.clone();
    let label = DeliveryMetrics::label(&id);
    let settings = delivery.settings.clone();
    let store = delivery.store.clone();
    let mut breaker = Breaker::Closed;
    let mut failures = 0u32;
    // What the store says about the breaker and the last error, so operators see it
    // (`destinations status`); written on changes only.
    let mut recorded: (&'static str, Option<String>) = ("", None);
    while !*stop.borrow() {
        let now_recorded = (breaker.name(), recorded.1.clone());
        if now_recorded.0 != recorded.0 {
            let (store, id, name) = (store.clone(), id.clone(), now_recorded.0);
            if blocking(move || store.record_breaker(&id, name, None))
                .await
                .is_ok()
            {
                recorded.0 = name;
            }
        }
        if lane.state() != DestinationState::Active {
            pause(STATE_POLL, &mut stop, Some(&lane.wake)).await;
            continue;
        }
        if let Breaker::Open { until } = breaker {
            let now = Instant::now();
            if now < until {
                app.metrics
                    .delivery
                    .breaker_state
                    .get_or_create(&label)
                    .set(2);
                pause(until - now, &mut stop, None).await;
                continue;
            }
            breaker = Breaker::HalfOpen;
            app.metrics
                .delivery
                .breaker_state
                .get_or_create(&label)
                .set(1);
        }
        // One-event (or per-subject-batch) connectors may send several requests at once.
        let single = lane.connector.max_batch() == 1 || lane.connector.batch_key_per_subject();
        let limit = if breaker == Breaker::HalfOpen {
            1
        } else if single {
            ROUND * 2
        } else {
            lane.connector.max_batch()
        };
        let head = {
            let (store, id) = (store.clone(), id.clone());
            blocking(move || store.head(&id, limit)).await
        };
        let head = match head {
            Ok(mut h) => {
                // Items queued before delivery ids were keyed keep the id their first attempt
                // used, so the vendor still deduplicates their retries.
                for i in h.iter_mut().filter(|i| i.delivery_id.is_empty()) {
                    i.delivery_id =
                        handoff_connectors::wire::delivery_id(&i.destination, &i.message_id);
                }
                h
            }
            Err(e) => {
                tracing::error!(destination = %id, error = %e, "cannot read the queue; retrying");
                pause(Duration::from_secs(1), &mut stop, None).await;
                continue;
            }
        };
        let Some(first) = head.first() else {
            pause(Duration::from_secs(1), &mut stop, Some(&lane.wake)).await;
            continue;
        };
        let now_ms = handoff_store::sqlite::now_ms();
        if !single && first.next_at_ms > now_ms {
            // Strict order per destination: the head waits for its retry time, and so does the
            // rest (the vendor is failing for all of them anyway).
            let wait = Duration::from_millis((first.next_at_ms - now_ms) as u64);
            pause(
                wait.min(Duration::from_secs(1)),
                &mut stop,
                Some(&lane.wake),
            )
            .await;
            continue;
        }
        // Items past the maximum age are dead-lettered with their last error.
        let max_age_ms = settings.max_age.as_millis() as i64;
        let expired: Vec<&OutboxItem> = head
            .iter()
            .filter(|i| now_ms - i.created_at_ms > max_age_ms)
            .collect();
        if !expired.is_empty() {
            let ids: Vec<i64> = expired.iter().map(|i| i.id).collect();
            let reason = format!(
                "not delivered within {} s after {} attempt(s); last error: {}",
                settings.max_age.as_secs(),
                expired[0].attempts,
                expired[0].last_error.as_deref().unwrap_or("none")
            );
            let n = ids.len() as u64;
            let store = store.clone();
            if blocking(move || store.dead_letter(&ids, &reason))
                .await
                .is_ok()
            {
                app.metrics
                    .delivery
                    .dead_lettered
                    .get_or_create(&label)
                    .inc_by(n);
            }
            continue;
        }
        // What to send this round. Connectors that take batches get one batch: consecutive due
        // items sharing the first one's batch key. One-event connectors (webhooks, Stripe) get
        // up to ROUND requests, PARALLEL at once, never two for the same subject, and never one that
        // would overtake an earlier item of its subject still waiting for a retry.
        let parsed: Vec<(&OutboxItem, Option<Value>)> = head
            .iter()
            .map(|i| (i, serde_json::from_str(&i.payload).ok()))
            .collect();
        let unreadable: Vec<i64> = parsed
            .iter()
            .filter(|(_, p)| p.is_none())
            .map(|(i, _)| i.id)
            .collect();
        if !unreadable.is_empty() {
            let n = unreadable.len() as u64;
            let store = store.clone();
            let _ =
                blocking(move || store.dead_letter(&unreadable, "the queued payload is not JSON"))
                    .await;
            app.metrics
                .delivery
                .dead_lettered
                .get_or_create(&label)
                .inc_by(n);
            continue;
        }
        let parallel = single && breaker != Breaker::HalfOpen;
        let mut groups: Vec<Vec<(&OutboxItem, &Value)>> = Vec::new();
        if parallel {
            let mut waiting: HashSet<&str> = HashSet::new();
            let mut taken: HashSet<&str> = HashSet::new();
            for (item, payload) in &parsed {
                let p = payload.as_ref().expect("unreadable items were removed");
                let subject = if item.subject.is_empty() {
                    item.message_id.as_str()
                } else {
                    item.subject.as_str()
                };
                if item.next_at_ms > now_ms || waiting.contains(subject) || taken.contains(subject)
                {
                    waiting.insert(subject);
                    continue;
                }
                taken.insert(subject);
                groups.push(vec![(item, p)]);
                if groups.len() == ROUND {
                    break;
                }
            }
            if groups.is_empty() {
                let next = head.iter().map(|i| i.next_at_ms).min().unwrap_or(now_ms);
                let wait = Duration::from_millis((next - now_ms).max(10) as u64);
                pause(
                    wait.min(Duration::from_secs(1)),
                    &mut stop,
                    Some(&lane.wake),
                )
                .await;
                continue;
            }
        } else {
            let first = parsed[0].1.as_ref().expect("unreadable items were removed");
            let key = lane.connector.batch_key(&Item {
                message_id: &parsed[0].0.message_id,
                delivery_id: &parsed[0].0.delivery_id,
                vendor_ref: parsed[0].0.vendor_ref.as_deref(),
                payload: first,
            });
            let mut batch = Vec::new();
            for (item, payload) in &parsed {
                let p = payload.as_ref().expect("unreadable items were removed");
                if item.next_at_ms > now_ms
                    || lane.connector.batch_key(&Item {
                        message_id: &item.message_id,
                        delivery_id: &item.delivery_id,
                        vendor_ref: item.vendor_ref.as_deref(),
                        payload: p,
                    }) != key
                {
                    break;
                }
                batch.push((*item, p));
            }
            if batch.is_empty() {
                // The head is waiting for its retry time (a half-open probe of a one-event
                // connector ends up here too).
                let wait = Duration::from_millis((parsed[0].0.next_at_ms - now_ms).max(10) as u64);
                pause(
                    wait.min(Duration::from_secs(1)),
                    &mut stop,
                    Some(&lane.wake),
                )
                .await;
                continue;
            }
            groups.push(batch);
        }

        // Build every request, then send them, PARALLEL at a time, each within the rate limit.
        // What is not sent yet when the vendor fails one (unavailable, throttling,
        // credentials), the destination is paused or killed, or the gateway stops, stays queued
        // as it was; the breaker decides what happens next.
        let mut calls = tokio::task::JoinSet::new();
        let in_flight = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut mapping_failures: Vec<(Vec<i64>, String)> = Vec::new();
        for group in &groups {
            let items: Vec<Item<'_>> = group
                .iter()
                .map(|(i, p)| Item {
                    message_id: &i.message_id,
                    delivery_id: &i.delivery_id,
                    vendor_ref: i.vendor_ref.as_deref(),
                    payload: p,
                })
                .collect();
            let ids: Vec<i64> = group.iter().map(|(i, _)| i.id).collect();
            let oldest = group
                .iter()
                .map(|(i, _)| i.created_at_ms)
                .min()
                .unwrap_or(now_ms);
            let attempts = group.iter().map(|(i, _)| i.attempts).max().unwrap_or(0);
            match lane
                .connector
                .request(&items, time::OffsetDateTime::now_utc())
            {
                Ok(request) => {
                    let (lane, in_flight, failing, stop) = (
                        lane.clone(),
                        in_flight.clone(),
                        failing.clone(),
                        stop.clone(),
                    );
                    calls.spawn(async move {
                        let _permit = in_flight.acquire_owned().await;
                        let go = || {
                            !failing.load(Ordering::Relaxed)
                                && lane.state() == DestinationState::Active
                                && !*stop.borrow()
                        };
                        if !go() {
                            return None;
                        }
                        if let Some(limiter) = &lane.limiter {
                            limiter.until_ready().await;
                            if !go() {
                                return None;
                            }
                        }
                        let answer = send(&lane, request).await;
                        if matches!(
                            answer.0,
                            Classification::Retry { .. } | Classification::Credentials { .. }
                        ) {
                            failing.store(true, Ordering::Relaxed);
                        }
                        Some((ids, oldest, attempts, answer))
                    });
                }
                Err(why) => mapping_failures.push((ids, why)),
            }
        }
        let mut results = Vec::with_capacity(groups.len());
        for (ids, why) in mapping_failures {
            results.push((ids, now_ms, 0, (Classification::Permanent { why }, None)));
        }
        while let Some(r) = calls.join_next().await {
            if let Ok(Some(r)) = r {
                results.push(r);
            }
        }
        // Delivered items are removed in one transaction.
        let mut delivered: Vec<i64> = Vec::new();
        let mut refs: Vec<(i64, String)> = Vec::new();
        let mut latencies: Vec<f64> = Vec::new();
        let mut outcome: Result<(), StoreError> = Ok(());
        for (ids, oldest, attempts, (class, vendor_ref)) in results {
            let n = ids.len() as u64;
            let error = match &class {
                Classification::Delivered => None,
                Classification::Retry { why, .. }
                | Classification::Permanent { why }
                | Classification::Credentials { why } => Some(why.clone()),
            };
            if let (Some(r), [id]) = (vendor_ref, ids.as_slice()) {
                refs.push((*id, r));
            }
            let step = match class {
                Classification::Delivered => {
                    failures = 0;
                    breaker = Breaker::Closed;
                    app.metrics
                        .delivery
                        .breaker_state
                        .get_or_create(&label)
                        .set(0);
                    latencies
                        .push((handoff_store::sqlite::now_ms() - oldest).max(0) as f64 / 1000.0);
                    delivered.extend(ids);
                    Ok(())
                }
                Classification::Retry { after, why } => {
                    failures += 1;
                    if breaker == Breaker::HalfOpen || failures >= settings.breaker_failures {
                        breaker = Breaker::Open {
                            until: Instant::now() + settings.breaker_cooldown,
                        };
                        tracing::warn!(destination = %id, failures, reason = %why, "circuit breaker open");
                    }
                    let wait = backoff(&settings, attempts).max(after.unwrap_or_default());
                    let next = handoff_store::sqlite::now_ms() + wait.as_millis() as i64;
                    app.metrics.delivery.retried.get_or_create(&label).inc_by(n);
                    let store = store.clone();
                    blocking(move || store.retry(&ids, next, &why)).await
                }
                Classification::Permanent { why } => {
                    tracing::warn!(destination = %id, items = n, reason = %why, "dead-lettered");
                    app.metrics
                        .delivery
                        .dead_lettered
                        .get_or_create(&label)
                        .inc_by(n);
                    let store = store.clone();
                    blocking(move || store.dead_letter(&ids, &why)).await
                }
                Classification::Credentials { why } => {
                    // Burning the queue on a bad key helps nobody: stop and call an operator.
                    tracing::error!(destination = %id, reason = %why, "credentials refused: destination paused; fix them and run `handoff destinations resume`");
                    app.metrics
                        .delivery
                        .credential_failures
                        .get_or_create(&label)
                        .inc();
                    lane.set_state(DestinationState::Paused);
                    let store = store.clone();
                    let id = id.clone();
                    blocking(move || {
                        store.set_state(
                            &id,
                            DestinationState::Paused,
                            &format!("credentials refused: {why}"),
                        )
                    })
                    .await
                }
            };
            if step.is_err() {
                outcome = step;
            }
            if let Some(why) = error.filter(|why| recorded.1.as_ref() != Some(why)) {
                let (store, id, name, text) =
                    (store.clone(), id.clone(), breaker.name(), why.clone());
                if blocking(move || store.record_breaker(&id, name, Some(&text)))
                    .await
                    .is_ok()
                {
                    recorded = (breaker.name(), Some(why));
                }
            }
        }
        if !delivered.is_empty() {
            let n = delivered.len() as u64;
            let store = store.clone();
            let accepted: HashSet<i64> = delivered.iter().copied().collect();
            let sent: Vec<Sent> = parsed
                .iter()
                .filter(|(i, _)| accepted.contains(&i.id))
                .map(|(i, payload)| Sent {
                    id: i.id,
                    destination: i.destination.clone(),
                    vendor: lane.destination.vendor.id.clone(),
                    seq: i.seq,
                    message_id: i.message_id.clone(),
                    subject: i.subject.clone(),
                    ids: payload.as_ref().map(SentIds::of).unwrap_or_default(),
                })
                .collect();
            let r = blocking(move || store.delivered(&sent, &refs)).await;
            if r.is_ok() {
                app.metrics
                    .delivery
                    .delivered
                    .get_or_create(&label)
                    .inc_by(n);
                let hist = app.metrics.delivery.latency_seconds.get_or_create(&label);
                for l in latencies {
                    hist.observe(l);
                }
            } else {
                outcome = r;
            }
        }
        if let Err(e) = outcome {
            tracing::error!(destination = %id, error = %e, "cannot record a delivery outcome; the items will be sent again");
            pause(Duration::from_secs(1), &mut stop, None).await;
        }
    }
}

/// Sends one request and classifies the answer; with the vendor's id for the subject when a
/// successful answer carries one.
async fn send(
    lane: &Lane,
    request: handoff_connectors::wire::WireRequest,
) -> (Classification, Option<String>) {
    send_with(lane, request, false).await
}

/// Sends one request; `erasure` classifies the answer as the answer to a deletion call.
pub(crate) async fn send_with(
    lane: &Lane,
    request: handoff_connectors::wire::WireRequest,
    erasure: bool,
) -> (Classification, Option<String>) {
    let method =
        reqwest::Method::from_bytes(request.method.as_bytes()).unwrap_or(reqwest::Method::POST);
    let mut call = lane.client.request(method, &request.url).body(request.body);
    for (k, v) in &request.headers {
        call = call.header(k.as_str(), v.as_str());
    }
    match call.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let after = retry_after(resp.headers());
            // Enough of the body to classify and quote; a vendor's error pages can be big.
            let body = resp.bytes().await.unwrap_or_default();
            let body = &body[..body.len().min(64 * 1024)];
            let class = if erasure {
                lane.connector.classify_erasure(status, after, body)
            } else {
                lane.connector.classify(status, after, body)
            };
            let vendor_ref = match class {
                Classification::Delivered if !erasure => lane.connector.vendor_ref(body),
                _ => None,
            };
            (class, vendor_ref)
        }
        Err(e) => (
            Classification::Retry {
                after: None,
                why: if e.is_timeout() {
                    "timed out".to_owned()
                } else if e.is_connect() {
                    "cannot connect".to_owned()
                } else {
                    "the connection failed".to_owned()
                },
            },
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connector whose mapping panics on events named "Boom" (standing in for a bug).
    struct Panicky(Box<dyn Connector>);

    impl Connector for Panicky {
        fn max_batch(&self) -> usize {
            self.0.max_batch()
        }
        fn request(
            &self,
            items: &[Item<'_>],
            now: time::OffsetDateTime,
        ) -> Result<handoff_connectors::wire::WireRequest, String> {
            self.0.request(items, now)
        }
        fn wire_body(&self, item: &Item<'_>, now: time::OffsetDateTime) -> Result<Value, String> {
            assert_ne!(item.payload["event"], "Boom", "a bug in a mapping");
            self.0.wire_body(item, now)
        }
        fn secrets(&self) -> Vec<&str> {
            self.0.secrets()
        }
        fn classify(
            &self,
            status: u16,
            retry_after: Option<Duration>,
            body: &[u8],
        ) -> Classification {
            self.0.classify(status, retry_after, body)
        }
        fn erasure(
            &self,
            target: &handoff_connectors::erasure::ErasureTarget,
            now: time::OffsetDateTime,
        ) -> handoff_connectors::erasure::Erasure {
            self.0.erasure(target, now)
        }
    }

    #[test]
    fn an_event_that_cannot_be_decided_is_blocked_and_the_rest_flow_on() {
        let today = time::OffsetDateTime::now_utc().date();
        let toml = format!(
            r#"
[[sources]]
id = "web"
write_key = "test-write-key-0123456789"

[[vendors]]
id = "acme"
legal_name = "Acme"
country = "IE"
dpa_signed = 2025-01-01
last_assessment = {today}
risk_tier = "low"
transfer_mechanism = "adequacy"

[[destinations]]
id = "hook"
vendor = "acme"
connector = "webhook"
purposes = ["support"]
legal_basis = "contract"
event_types = ["track"]
allow = ["event", "userId"]
endpoint = "http://127.0.0.1:9/hook"
settings = {{ secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" }}
"#
        );
        let config = handoff_core::config::Config::from_toml_on(&toml, &|_| None, today)
            .expect("a valid config");
        let d = config.destinations[0].clone();
        let inner = handoff_connectors::connector::for_destination(&d).unwrap();
        let client = handoff_connectors::http::client(&d.tls, Duration::from_secs(1)).unwrap();
        let lane = Arc::new(Lane {
            connector: Arc::new(Panicky(inner)),
            purposes: "support".into(),
            client,
            state: AtomicU8::new(0),
            wake: Notify::new(),
            limiter: None,
            destination: d,
        });
        let events: Vec<handoff_store::StoredEvent> = ["Boom", "Fine"]
            .iter()
            .enumerate()
            .map(|(i, name)| handoff_store::StoredEvent {
                seq: i as u64 + 1,
                source: "web".into(),
                message_id: format!("m{i}"),
                received_at_ms: 0,
                payload: serde_json::json!({"type": "track", "event": name, "userId": "u1",
                    "messageId": format!("m{i}"), "timestamp": "2026-11-25T10:00:00.000Z"})
                .to_string(),
            })
            .collect();
        let parsed = events.iter().map(parse_event).collect();
        let plan = decide_batch(
            &events,
            parsed,
            vec![None, None],
            &[lane],
            &config.policy,
            &handoff_connectors::wire::DeliveryIdKey::new([1; 32]),
            time::OffsetDateTime::now_utc(),
        );
        let outcomes: Vec<(handoff_store::Seq, &str, &str)> = plan
            .entries
            .iter()
            .map(|e| (e.event_seq, e.outcome.as_str(), e.reasons.as_str()))
            .collect();
        assert_eq!(
            outcomes,
            [(1, "block", UNDECIDABLE_REASON), (2, "send", "")],
            "one entry per event, the undecidable one blocked"
        );
        assert_eq!(plan.items.len(), 1);
        assert_eq!(plan.items[0].seq, 2);
        assert_eq!(
            plan.routed.blocked,
            [("hook".to_owned(), UNDECIDABLE_REASON)]
        );
    }

    #[test]
    fn backoff_grows_with_full_jitter_and_a_cap() {
        let s = DeliverySettings {
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
            ..DeliverySettings::default()
        };
        for attempts in 0..30 {
            let cap = (100u64 << attempts.min(20)).min(2000);
            for _ in 0..20 {
                assert!(backoff(&s, attempts).as_millis() as u64 <= cap);
            }
        }
        let spread: std::collections::HashSet<u128> =
            (0..50).map(|_| backoff(&s, 4).as_millis()).collect();
        assert!(spread.len() > 10, "jittered");
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(
            retry_after(&h),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        h.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
