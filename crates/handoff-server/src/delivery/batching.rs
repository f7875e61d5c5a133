//! Which queued items go out together, as pure functions of the queue's head: the worker
//! builds requests from what they choose.

use std::collections::HashSet;

/// A queued item as batching sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending<'a> {
    /// Whose event it is: the subject, or the message id when the event names nobody (so it
    /// orders only against itself).
    pub subject: &'a str,
    /// Its next attempt is due.
    pub due: bool,
}

/// For a connector that sends one event (or one subject's events) per request: the items of
/// this round, in queue order, at most `round`, one per subject, and none that would overtake
/// an earlier item of its subject still waiting for a retry.
pub fn one_per_subject(pending: &[Pending<'_>], round: usize) -> Vec<usize> {
    let mut waiting: HashSet<&str> = HashSet::new();
    let mut taken: HashSet<&str> = HashSet::new();
    let mut out = Vec::new();
    for (i, p) in pending.iter().enumerate() {
        if out.len() == round {
            break;
        }
        if !p.due || waiting.contains(p.subject) || taken.contains(p.subject) {
            waiting.insert(p.subject);
            continue;
        }
        taken.insert(p.subject);
        out.push(i);
    }
    out
}

/// For a batching connector (strict order per destination): how many items from the head
/// form the next request: the due items sharing the head's batch key, up to the first that is
/// not due or has another key. 0 when the head itself is waiting.
pub fn leading_batch<K: PartialEq>(pending: &[(bool, K)]) -> usize {
    let Some((_, key)) = pending.first() else {
        return 0;
    };
    pending
        .iter()
        .take_while(|(due, k)| *due && k == key)
        .count()
}

/// For journal events sent one request at a time: the events grouped per subject, in order,
/// each group in journal order. Groups go out side by side; a group's events one after the
/// other, so nobody's events overtake each other.
pub fn chains(subjects: &[&str]) -> Vec<Vec<usize>> {
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, s) in subjects.iter().enumerate() {
        match index.get(s) {
            Some(g) => out[*g].push(i),
            None => {
                index.insert(s, out.len());
                out.push(vec![i]);
            }
        }
    }
    out
}

/// For a batching connector: the events split into at most `n` partitions by subject, each
/// in journal order (empty partitions left out), so requests can go out side by side without
/// reordering anybody's events.
pub fn partitions(subjects: &[&str], n: usize) -> Vec<Vec<usize>> {
    use std::hash::{Hash, Hasher};
    let n = n.max(1);
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, s) in subjects.iter().enumerate() {
        let p = if n == 1 {
            0
        } else {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            s.hash(&mut h);
            (h.finish() % n as u64) as usize
        };
        out[p].push(i);
    }
    out.retain(|p| !p.is_empty());
    out
}

/// Consecutive runs sharing a batch key, each at most `max` long: the requests a batching
/// connector makes of events in order.
pub fn runs<K: PartialEq>(keys: &[K], max: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=keys.len() {
        if i == keys.len() || keys[i] != keys[start] || i - start == max.max(1) {
            if start < i {
                out.push(start..i);
            }
            start = i;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_keep_each_subjects_order() {
        assert_eq!(
            chains(&["a", "b", "a", "c", "b"]),
            [vec![0, 2], vec![1, 4], vec![3]]
        );
        assert!(chains(&[]).is_empty());
    }

    #[test]
    fn partitions_keep_a_subject_in_one_and_in_order() {
        let subjects = ["a", "b", "a", "c", "b", "a", "d"];
        let parts = partitions(&subjects, 3);
        assert!(parts.len() <= 3);
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(
            all,
            (0..subjects.len()).collect::<Vec<_>>(),
            "every event once"
        );
        for p in &parts {
            assert!(p.windows(2).all(|w| w[0] < w[1]), "in order");
        }
        for s in ["a", "b"] {
            let holding = parts
                .iter()
                .filter(|p| p.iter().any(|i| subjects[*i] == s))
                .count();
            assert_eq!(holding, 1, "{s} in one partition");
        }
        assert_eq!(partitions(&subjects, 1), [(0..7).collect::<Vec<_>>()]);
        assert!(partitions(&[], 4).is_empty());
    }

    #[test]
    fn runs_split_on_key_changes_and_size() {
        assert_eq!(
            runs(&["a", "a", "a", "b", "a"], 2),
            [0..2, 2..3, 3..4, 4..5]
        );
        assert_eq!(
            runs(&[1, 1, 1], 10),
            vec![std::ops::Range { start: 0, end: 3 }]
        );
        assert!(runs::<u8>(&[], 10).is_empty());
    }

    fn p(subject: &str, due: bool) -> Pending<'_> {
        Pending { subject, due }
    }

    #[test]
    fn one_request_per_subject_and_nobody_overtakes_their_own_retry() {
        let queue = [
            p("ann", true),
            p("bob", false), // waiting for its retry
            p("ann", true),  // ann is in this round already
            p("bob", true),  // must not overtake bob's earlier event
            p("cy", true),
        ];
        assert_eq!(one_per_subject(&queue, 10), [0, 4]);
        assert_eq!(one_per_subject(&queue, 1), [0], "at most a round");
        assert!(one_per_subject(&[p("bob", false)], 10).is_empty());
    }

    #[test]
    fn a_batch_is_the_due_run_sharing_the_heads_key() {
        assert_eq!(
            leading_batch(&[(true, "a"), (true, "a"), (true, "b"), (true, "a")]),
            2
        );
        assert_eq!(leading_batch(&[(true, "a"), (false, "a"), (true, "a")]), 1);
        assert_eq!(
            leading_batch(&[(false, "a"), (true, "a")]),
            0,
            "the head waits"
        );
        assert_eq!(leading_batch::<&str>(&[]), 0);
    }
}
