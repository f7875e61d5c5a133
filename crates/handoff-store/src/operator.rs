//! Operator actions on delivery — the kill switch and the dead-letter queue — each written to
//! the audit log with who did it. The CLI and the admin API both call these, so an action and
//! its audit record cannot drift apart.

use serde_json::{Value, json};

use crate::StoreError;
use crate::outbox::{DeadLetter, DestinationState, OutboxStore};
use crate::sqlite::now_ms;
use crate::state::StateStore;

/// Sets a destination's state and audits it as `destination.<state>`.
pub fn set_destination_state(
    outbox: &OutboxStore,
    audit: &StateStore,
    actor: &str,
    destination: &str,
    target: DestinationState,
    reason: &str,
) -> Result<(), StoreError> {
    outbox.set_state(destination, target, reason)?;
    audit.audit(
        now_ms(),
        actor,
        &format!("destination.{}", target.as_str()),
        &json!({"destination": destination, "reason": reason}).to_string(),
    )
}

/// Replays (`requeue`) or discards a destination's dead letters (those in `ids`, or all), and
/// audits it as `dead_letters.replay|discard`. Returns how many.
pub fn take_dead_letters(
    outbox: &OutboxStore,
    audit: &StateStore,
    actor: &str,
    destination: &str,
    ids: Option<&[i64]>,
    requeue: bool,
) -> Result<usize, StoreError> {
    let n = if requeue {
        outbox.replay(destination, ids)?
    } else {
        outbox.discard(destination, ids)?
    };
    audit.audit(
        now_ms(),
        actor,
        if requeue {
            "dead_letters.replay"
        } else {
            "dead_letters.discard"
        },
        &json!({"destination": destination, "ids": ids, "count": n}).to_string(),
    )?;
    Ok(n)
}

/// A dead letter as operators see it (CLI lines and the admin API).
pub fn dead_letter_json(d: &DeadLetter) -> Value {
    json!({
        "id": d.id, "destination": d.destination, "seq": d.seq, "messageId": d.message_id,
        "attempts": d.attempts, "failed_at_ms": d.failed_at_ms, "reason": d.reason,
        "payload": serde_json::from_str::<Value>(&d.payload).unwrap_or(Value::Null),
    })
}
