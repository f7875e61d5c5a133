//! One destination's decision over resolved journal events: policy, then the connector's
//! mapping, both pure. What may leave becomes an item to send with the ledger record of its
//! handoff (field names and categories of the vendor's wire request); everything else a block
//! with its reasons.

use handoff_store::outbox::NewItem;

use super::*;

/// An event decided for sending.
pub(super) struct ToSend {
    pub item: NewItem,
    pub received_at_ms: i64,
    /// The decided payload (what the connector maps), parsed.
    pub payload: Value,
    /// The ledger record of its handoff, outcome to be set.
    pub entry: Entry,
    /// Its part of the wire request, as mapped here (see `Connector::mapped_item`).
    pub mapped: Option<Value>,
}

/// What a destination decided for a run of events.
#[derive(Default)]
pub(super) struct LaneDecision {
    pub sends: Vec<ToSend>,
    /// Ledger records of the blocks.
    pub entries: Vec<Entry>,
    /// Each block's first reason, for the counters.
    pub blocked: Vec<&'static str>,
    /// Events of suppressed subjects still holding their payload.
    pub erase: Vec<handoff_store::Seq>,
}

/// One event's decision for one destination (lives a moment: moved into the round at once).
#[allow(clippy::large_enum_variant)]
enum Decided {
    Send(ToSend),
    /// Its first reason, and its ledger record.
    Block(&'static str, Entry),
}

/// Blocks counted per reason.
pub(super) fn count(blocked: &[&'static str]) -> Vec<(&'static str, u64)> {
    let mut counts: Vec<(&'static str, u64)> = Vec::new();
    for r in blocked {
        match counts.iter_mut().find(|(c, _)| c == r) {
            Some((_, n)) => *n += 1,
            None => counts.push((r, 1)),
        }
    }
    counts
}

pub(super) fn entry_for(e: &handoff_store::StoredEvent, subject: &str, lane: &Lane) -> Entry {
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

/// Decides the events of `batch` from index `from` (at most `limit`, and no more once
/// `max_sends` may leave) for `lane`, with
/// `states` (the batch's own, or re-read when subjects changed meanwhile). Returns the
/// decision and the index after the last event decided.
#[allow(clippy::too_many_arguments)]
pub(super) fn decide_for_lane(
    batch: &router::Resolved,
    states: &[SubjectState],
    from: usize,
    limit: usize,
    max_sends: usize,
    lane: &Lane,
    settings: &handoff_core::policy::model::PolicySettings,
    delivery_ids: &handoff_connectors::wire::DeliveryIdKey,
    now: time::OffsetDateTime,
) -> (LaneDecision, usize) {
    let today = now.date();
    let mut out = LaneDecision::default();
    let d = &lane.destination;
    // A killed destination gets no decision for what arrived since the kill; what arrived
    // before waits for it (copied into its retry set, as it cannot be sent now).
    let killed_since = lane.killed_since_ms();
    // Data categories per list of field names: most events share a few shapes.
    let mut categories: std::collections::HashMap<String, String> =
        std::collections::HashMap::new();
    let end = (from + limit).min(batch.events.len());
    let mut end = end;
    for (i, e) in batch.events.iter().enumerate().take(end).skip(from) {
        if out.sends.len() >= max_sends {
            // A half-open breaker's probe: the events up to the first that may leave.
            end = i;
            break;
        }
        let subject = batch.subjects[i].as_str();
        let state = &states[i];
        let block = |out: &mut LaneDecision, reason: &'static str, entry: Option<Entry>| {
            let mut entry = entry.unwrap_or_else(|| entry_for(e, subject, lane));
            entry.outcome = "block".into();
            if entry.reasons.is_empty() {
                entry.reasons = reason.into();
            }
            out.blocked.push(reason);
            out.entries.push(entry);
        };
        if state.suppressed && e.payload != handoff_store::sqlite::ERASED_PAYLOAD {
            out.erase.push(e.seq);
        }
        let prepared = match &batch.prepared[i] {
            router::Prepared::Event(p) => p,
            router::Prepared::Erased => {
                // Erased before it was read: recorded, never guessed at.
                block(&mut out, "subject.suppressed", None);
                continue;
            }
            router::Prepared::Unreadable => {
                tracing::warn!(
                    seq = e.seq,
                    source = %e.source,
                    "journal.unreadable: a stored event cannot be parsed; blocked"
                );
                block(&mut out, UNREADABLE_REASON, None);
                continue;
            }
            router::Prepared::Undecidable => {
                block(&mut out, UNDECIDABLE_REASON, None);
                continue;
            }
        };
        if killed_since > 0 && e.received_at_ms >= killed_since {
            block(&mut out, KILLED_REASON, None);
            continue;
        }
        // One event that makes deciding or mapping fail (a bug) must not halt the pipeline: it
        // is blocked with `event.undecidable` and the rest flow on.
        let decided = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let consent = ConsentContext::from_event(
                prepared.value(),
                &settings.consent_fields,
                state.clone(),
            );
            let decision = decide(prepared, &consent, d, today);
            let mut entry = entry_for(e, subject, lane);
            entry.reasons = decision
                .reasons
                .iter()
                .map(|r| r.code)
                .collect::<Vec<_>>()
                .join(",");
            match decision.outcome {
                Outcome::Block => Decided::Block(decision.reasons[0].code, entry),
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
                                mapped: None,
                                payload: &decided,
                            };
                            lane.connector.wire_body(&item, now).map(|b| (b, decided))
                        });
                    match wire {
                        Ok((body, decided)) => {
                            let fields = wire_fields(&body);
                            let mapped = lane.connector.mapped_item(&body);
                            entry.fields = fields.join(",");
                            entry.categories = categories
                                .entry(entry.fields.clone())
                                .or_insert_with(|| {
                                    handoff_connectors::connector::wire_categories(
                                        lane.connector.as_ref(),
                                        &fields,
                                    )
                                    .join(",")
                                })
                                .clone();
                            Decided::Send(ToSend {
                                item: NewItem {
                                    destination: d.id.clone(),
                                    vendor: d.vendor.id.clone(),
                                    seq: e.seq,
                                    message_id: e.message_id.clone(),
                                    delivery_id,
                                    subject: subject.to_owned(),
                                    shape: entry.shape(),
                                    payload: payload.0,
                                },
                                received_at_ms: e.received_at_ms,
                                payload: decided,
                                entry,
                                mapped,
                            })
                        }
                        Err(why) => {
                            entry.reasons = if entry.reasons.is_empty() {
                                REFUSED_REASON.into()
                            } else {
                                format!("{},{REFUSED_REASON}", entry.reasons)
                            };
                            entry.detail = why;
                            Decided::Block(REFUSED_REASON, entry)
                        }
                    }
                }
            }
        }));
        match decided {
            Ok(Decided::Send(send)) => out.sends.push(send),
            Ok(Decided::Block(reason, entry)) => block(&mut out, reason, Some(entry)),
            Err(_) => {
                tracing::error!(
                    seq = e.seq,
                    source = %e.source,
                    destination = %d.id,
                    "event.undecidable: deciding or mapping this event failed; blocked"
                );
                block(&mut out, UNDECIDABLE_REASON, None);
            }
        }
    }
    (out, end)
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
        let lane = Lane {
            connector: Arc::new(Panicky(inner)),
            purposes: "support".into(),
            client,
            state: AtomicU8::new(0),
            killed_since: std::sync::atomic::AtomicI64::new(0),
            cursor: std::sync::atomic::AtomicU64::new(0),
            wake: Notify::new(),
            limiter: None,
            destination: d,
        };
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
        let batch = router::Resolved {
            after: 0,
            upto: 2,
            prepared: events
                .iter()
                .map(|e| router::prepare(e, &config.policy))
                .collect(),
            subjects: vec![String::new(); 2],
            states: vec![SubjectState::default(); 2],
            events,
            epoch: 0,
        };
        let (decision, next) = decide_for_lane(
            &batch,
            &batch.states,
            0,
            10,
            usize::MAX,
            &lane,
            &config.policy,
            &handoff_connectors::wire::DeliveryIdKey::new([1; 32]),
            time::OffsetDateTime::now_utc(),
        );
        assert_eq!(next, 2);
        let blocks: Vec<(handoff_store::Seq, &str, &str)> = decision
            .entries
            .iter()
            .map(|e| (e.event_seq, e.outcome.as_str(), e.reasons.as_str()))
            .collect();
        assert_eq!(blocks, [(1, "block", UNDECIDABLE_REASON)]);
        assert_eq!(decision.sends.len(), 1);
        assert_eq!(decision.sends[0].item.seq, 2);
        assert_eq!(decision.blocked, [UNDECIDABLE_REASON]);
    }
}
