//! The subject stage's pure part: each event's [`SubjectState`] as its subject's stored state
//! left it, with the preference updates of the identify calls before it in the batch applied
//! in order, which events of suppressed subjects are to be erased, and which stored
//! preferences the batch changed.

use std::collections::HashMap;

use serde_json::Value;

use super::{PreferenceUpdate, StoredPreferences, SubjectState};

/// An event's subject as the store holds it before the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredSubject<'a> {
    pub id: &'a str,
    pub suppressed: bool,
    /// Stored preferences, as JSON.
    pub preferences: Option<&'a str>,
}

/// What [`batch_states`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchStates {
    /// Per event, in order.
    pub states: Vec<SubjectState>,
    /// Indexes of the events whose subject is suppressed: their payloads are to be erased.
    pub suppressed: Vec<usize>,
    /// Stored preferences this batch changed: (subject id, JSON), the last per subject.
    pub preferences: Vec<(String, String)>,
}

/// Each event's subject state, in order. `events[i]` is `None` for an event that cannot be
/// read (erased or unreadable), `subjects[i]` for one that names nobody.
pub fn batch_states(
    events: &[Option<&Value>],
    subjects: &[Option<StoredSubject<'_>>],
) -> BatchStates {
    let mut out = BatchStates {
        states: Vec::with_capacity(events.len()),
        ..BatchStates::default()
    };
    // Preferences as this batch left them (an identify changes what later events see).
    let mut changed: HashMap<&str, StoredPreferences> = HashMap::new();
    for (i, (event, subject)) in events.iter().zip(subjects).enumerate() {
        let Some(subject) = subject else {
            out.states.push(SubjectState::default());
            continue;
        };
        let mut state = SubjectState {
            suppressed: subject.suppressed,
            preferences: changed
                .get(subject.id)
                .cloned()
                .or_else(|| subject.preferences.and_then(StoredPreferences::from_json)),
        };
        if state.suppressed {
            out.suppressed.push(i);
        } else if let Some(event) = event
            && event.get("type").and_then(Value::as_str) == Some("identify")
            && let Some(Ok(update)) = PreferenceUpdate::from_identify(event)
        {
            let next = state.preferences.clone().unwrap_or_default().apply(&update);
            changed.insert(subject.id, next.clone());
            state.preferences = Some(next);
        }
        out.states.push(state);
    }
    let mut preferences: Vec<(String, String)> = changed
        .into_iter()
        .map(|(s, p)| (s.to_owned(), p.to_json()))
        .collect();
    preferences.sort();
    out.preferences = preferences;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_identify_changes_what_later_events_of_its_subject_see_and_is_stored_once() {
        let opt_out = json!({"type": "identify", "userId": "u1",
            "traits": {"consent": {"optOut": true}}});
        let track = json!({"type": "track", "userId": "u1", "event": "x"});
        let a = StoredSubject {
            id: "sub_a",
            suppressed: false,
            preferences: None,
        };
        let b = StoredSubject {
            id: "sub_b",
            suppressed: true,
            preferences: None,
        };
        let events = [
            Some(&track),
            Some(&opt_out),
            Some(&track),
            Some(&track),
            None,
        ];
        let subjects = [Some(a), Some(a), Some(a), Some(b), None];
        let s = batch_states(&events, &subjects);
        assert_eq!(s.states.len(), 5);
        let opted_out = |i: usize| {
            s.states[i]
                .preferences
                .as_ref()
                .is_some_and(|p| p.opt_out_of_sale)
        };
        assert!(!opted_out(0), "before the identify");
        assert!(opted_out(1) && opted_out(2), "from the identify on");
        assert_eq!(s.preferences.len(), 1);
        assert_eq!(s.preferences[0].0, "sub_a");
        assert!(s.states[3].suppressed);
        assert_eq!(s.suppressed, [3]);
        assert_eq!(s.states[4], SubjectState::default());
    }
}
