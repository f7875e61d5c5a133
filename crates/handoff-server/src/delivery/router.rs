//! The router: reads the journal from its committed position, resolves each event's subject,
//! decides it for every destination (policy, then the connector's mapping, both pure) and
//! commits the decisions, the queued payloads, the ledger entries and its new position in one
//! transaction.

use super::*;

/// The router, in two stages that overlap: one reads the journal and decides the next batch
/// while the other commits the previous one (the commit waits for the outbox, which the
/// workers share; deciding does not).
pub(super) async fn router(
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
            // Events of suppressed subjects are kept no longer than deciding took (erased
            // through the journal's own writer).
            if let Err(e) = journal.erase_events(erase).await {
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
    // Data categories per destination and list of field names.
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
                        // Most events of a batch share a few shapes (per destination: the
                        // connector says what its fields carry).
                        entry.categories = categories
                            .entry(format!("{i}\u{1f}{}", entry.fields))
                            .or_insert_with(|| {
                                handoff_connectors::connector::wire_categories(
                                    lane.connector.as_ref(),
                                    &fields,
                                )
                                .join(",")
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
            // A suppressed subject's event is erased all the same.
            plan.routed.erase.truncate(marks.3);
            if subject
                .as_ref()
                .is_some_and(|s| s.suppressed_at_ms.is_some())
            {
                plan.routed.erase.push(e.seq);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::{Item, Value};

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
}
