//! Minimise, transform and scan in one walk, writing the payload as JSON text.
//!
//! Each destination's allowlist and transforms are compiled into one trie ([`Compiled`]). The
//! walk visits the event once per destination, writes what is allowed straight into a byte
//! buffer (the form the outbox stores and connectors read), applies each leaf's transforms in
//! the configured order, and scans strings for PII as it writes them. Building a `Value` tree per
//! destination and then serialising it cost about twice as much (see the policy benchmark).
//!
//! `move` transforms run last, on the finished payload: they re-arrange what is there.

use serde_json::Value;
use smallvec::SmallVec;

use super::model::{Destination, ENVELOPE_KEYS, PiiAction};
use super::paths::{self, FieldPath, Segment};
use super::pii;
use super::transform::{Transform, hmac_hex, scalar_text, sha256_hex, truncate_ip};
use super::{PiiHit, PreparedEvent, Reason};

/// A destination's allowlist and transforms as one trie.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compiled {
    root: Node,
    /// Indexes into the destination's transforms of the `move`s, applied after the walk.
    moves: Vec<usize>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Node {
    /// Keep this node and everything under it.
    keep: bool,
    /// Transforms (indexes, in configured order) whose field ends here.
    transforms: SmallVec<[u16; 2]>,
    children: Vec<(Segment, Node)>,
}

impl Node {
    fn at(&mut self, path: &FieldPath) -> &mut Node {
        let mut node = self;
        for seg in path.segments() {
            let i = match node.children.iter().position(|(s, _)| s == seg) {
                Some(i) => i,
                None => {
                    node.children.push((seg.clone(), Node::default()));
                    node.children.len() - 1
                }
            };
            node = &mut node.children[i].1;
        }
        node
    }
}

impl Compiled {
    pub fn new(allow: &[FieldPath], transforms: &[Transform]) -> Compiled {
        let mut root = Node::default();
        for path in allow {
            root.at(path).keep = true;
        }
        let mut moves = Vec::new();
        for (i, t) in transforms.iter().enumerate() {
            if matches!(t, Transform::Move { .. }) {
                moves.push(i);
            } else {
                root.at(t.field()).transforms.push(i as u16);
            }
        }
        Compiled { root, moves }
    }
}

/// Paths, stored in one buffer: a decision drops a dozen paths on a typical event, and one
/// allocation for all of them instead of one each showed in profiles.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PathList {
    text: String,
    ends: Vec<u32>,
}

impl PathList {
    pub fn push(&mut self, path: &str) {
        self.text.push_str(path);
        self.ends.push(self.text.len() as u32);
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let s = &self.text[start..end as usize];
            start = end as usize;
            s
        })
    }

    pub fn contains(&self, path: &str) -> bool {
        self.iter().any(|p| p == path)
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn to_vec(&self) -> Vec<String> {
        self.iter().map(str::to_owned).collect()
    }
}

impl std::fmt::Debug for PathList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl serde::Serialize for PathList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// What the walk produced.
pub(super) struct Written {
    pub json: String,
    pub dropped: PathList,
    pub reasons: Vec<Reason>,
    pub hits: Vec<PiiHit>,
}

struct Walk<'a> {
    dest: &'a Destination,
    event: &'a PreparedEvent,
    out: Vec<u8>,
    /// The concrete path of the node being written (`a.b[].c`).
    path: String,
    dropped: PathList,
    reasons: Vec<Reason>,
    hits: Vec<PiiHit>,
    findings: Vec<pii::Finding>,
}

type Nodes<'n> = SmallVec<[&'n Node; 4]>;

/// How a string's PII is found.
#[derive(Clone, Copy)]
enum Scan {
    /// A hash or pseudonym: nothing to find.
    Opaque,
    /// A string of the event itself: scanned once when the event was prepared.
    Indexed,
    /// A string a transform made: scanned here.
    Now,
}

/// Writes `dest`'s payload for `event`.
pub(super) fn write(event: &PreparedEvent, dest: &Destination) -> Written {
    let mut w = Walk {
        dest,
        event,
        out: Vec::with_capacity(512),
        path: String::with_capacity(128),
        dropped: PathList {
            text: String::with_capacity(256),
            ends: Vec::with_capacity(16),
        },
        reasons: Vec::new(),
        hits: Vec::new(),
        findings: Vec::new(),
    };
    let root = &dest.compiled.root;
    w.out.push(b'{');
    let mut first = true;
    if let Value::Object(map) = event.value() {
        for (key, value) in map {
            let mark = w.out.len();
            if !first {
                w.out.push(b',');
            }
            write_key(&mut w.out, key);
            if ENVELOPE_KEYS.contains(&key.as_str()) {
                write_value(&mut w.out, value);
                first = false;
                continue;
            }
            w.path.clear();
            w.path.push_str(key);
            let nodes = children(&[root], key);
            let keep = nodes.iter().any(|n| n.keep);
            if !keep && nodes.is_empty() {
                w.drop_here();
                w.out.truncate(mark);
            } else if w.value(value, &nodes, keep) {
                first = false;
            } else {
                w.out.truncate(mark);
            }
        }
    }
    w.out.push(b'}');
    let mut json = String::from_utf8(w.out).expect("the walk writes UTF-8 JSON");
    if !dest.compiled.moves.is_empty() {
        json = apply_moves(json, dest, &mut w.dropped, &mut w.reasons);
    }
    Written {
        json,
        dropped: w.dropped,
        reasons: w.reasons,
        hits: w.hits,
    }
}

/// The trie nodes under `parents` that `key` matches.
fn children<'n>(parents: &[&'n Node], key: &str) -> Nodes<'n> {
    let mut next = Nodes::new();
    if parents.is_empty() {
        return next;
    }
    for parent in parents {
        for (seg, child) in &parent.children {
            let matches = match seg {
                Segment::Any => true,
                Segment::Key(k) => k == key,
            };
            if matches {
                next.push(child);
            }
        }
    }
    next
}

/// Writes a JSON string. Most strings need no escaping, and checking that first (a loop the
/// compiler vectorises) then copying is several times faster than escaping byte by byte; the
/// rest go through serde_json.
fn write_str(out: &mut Vec<u8>, s: &str) {
    // A fold, not `all`: without the early exit the compiler turns it into SIMD compares.
    let needs_escape = s.bytes().fold(false, |acc, b| {
        acc | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !needs_escape {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
    }
}

fn write_key(out: &mut Vec<u8>, key: &str) {
    write_str(out, key);
    out.push(b':');
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    serde_json::to_writer(&mut *out, v).expect("writing to a Vec cannot fail");
}

impl Walk<'_> {
    fn drop_here(&mut self) {
        if !self.path.contains("[]") || !self.dropped.contains(&self.path) {
            self.dropped.push(&self.path);
        }
    }

    /// Writes `v` at the current path; false (and nothing written) when nothing of it stays.
    fn value(&mut self, v: &Value, nodes: &[&Node], keep: bool) -> bool {
        if nodes.iter().any(|n| !n.transforms.is_empty()) {
            let mut transforms: SmallVec<[u16; 4]> = SmallVec::new();
            for n in nodes {
                transforms.extend(n.transforms.iter().copied());
            }
            if transforms.len() > 1 {
                transforms.sort_unstable();
                transforms.dedup();
            }
            return self.transformed(v, &transforms, keep);
        }
        match v {
            Value::Object(map) => {
                let start = self.out.len();
                self.out.push(b'{');
                let mut first = true;
                let len = self.path.len();
                for (key, child) in map {
                    self.path.push('.');
                    self.path.push_str(key);
                    let next = children(nodes, key);
                    let child_keep = keep || next.iter().any(|n| n.keep);
                    if child_keep || !next.is_empty() {
                        let mark = self.out.len();
                        if !first {
                            self.out.push(b',');
                        }
                        write_key(&mut self.out, key);
                        if self.value(child, &next, child_keep) {
                            first = false;
                        } else {
                            self.out.truncate(mark);
                        }
                    } else {
                        self.drop_here();
                    }
                    self.path.truncate(len);
                }
                self.out.push(b'}');
                if first && !keep {
                    // Nothing allowed inside: the object itself is not sent.
                    self.out.truncate(start);
                    return false;
                }
                true
            }
            Value::Array(items) => {
                let start = self.out.len();
                self.out.push(b'[');
                let mut first = true;
                let len = self.path.len();
                self.path.push_str("[]");
                for item in items {
                    let mark = self.out.len();
                    if !first {
                        self.out.push(b',');
                    }
                    if self.value(item, nodes, keep) {
                        first = false;
                    } else {
                        self.out.truncate(mark);
                    }
                }
                self.path.truncate(len);
                self.out.push(b']');
                if first && !keep {
                    self.out.truncate(start);
                    return false;
                }
                true
            }
            _ if !keep => {
                // A scalar where the allowlist expected more structure.
                self.drop_here();
                false
            }
            Value::String(s) => {
                self.string(s, Scan::Indexed);
                true
            }
            other => {
                write_value(&mut self.out, other);
                true
            }
        }
    }

    /// Writes a string, with its PII handled unless it is an expected identifier.
    fn string(&mut self, s: &str, scan: Scan) {
        let event = self.event;
        let mut scratch = std::mem::take(&mut self.findings);
        let findings: &[pii::Finding] = match scan {
            Scan::Opaque => &[],
            Scan::Indexed => event.pii_in(s),
            Scan::Now => {
                scratch.clear();
                pii::scan(s, &mut scratch);
                &scratch
            }
        };
        let expected = || {
            self.dest
                .pii_expected
                .iter()
                .any(|e| e.covers_concrete(&self.path))
        };
        if findings.is_empty() || expected() {
            write_str(&mut self.out, s);
        } else {
            for f in findings {
                self.hits.push(PiiHit {
                    path: self.path.clone(),
                    kind: f.kind.code(),
                });
            }
            if self.dest.pii == PiiAction::Redact {
                write_str(&mut self.out, &pii::redact(s, findings));
            } else {
                write_str(&mut self.out, s);
            }
        }
        self.findings = scratch;
    }

    /// Applies the transforms that end at this node, in order, then writes what is left.
    fn transformed(&mut self, v: &Value, transforms: &[u16], keep: bool) -> bool {
        let mut text: Option<String> = None;
        let original = scalar_text(v);
        let mut opaque = false;
        for &i in transforms {
            let t = &self.dest.transforms[usize::from(i)];
            if let Transform::Drop { .. } = t {
                self.drop_here();
                return false;
            }
            let Some(current) = text.as_deref().or(original.as_deref()) else {
                if v.is_null() {
                    continue;
                }
                return self.invalid(t);
            };
            let out = match t {
                Transform::Hash {
                    normalize,
                    country_code,
                    ..
                } => normalize
                    .apply(current, country_code.as_deref())
                    .map(|n| sha256_hex(&n)),
                Transform::Hmac { normalize, .. } => {
                    let key = self
                        .dest
                        .pseudonymisation_key
                        .as_ref()
                        .map_or(&[][..], |k| &k.0);
                    normalize.apply(current, None).map(|n| hmac_hex(key, &n))
                }
                Transform::TruncateIp { .. } => truncate_ip(current),
                Transform::Generalise { to, .. } => to.apply(current),
                Transform::Move { .. } | Transform::Drop { .. } => unreachable!("handled above"),
            };
            match out {
                Some(s) => {
                    opaque |= matches!(t, Transform::Hash { .. } | Transform::Hmac { .. });
                    text = Some(s);
                }
                None => return self.invalid(t),
            }
        }
        match text {
            Some(s) => {
                self.string(&s, if opaque { Scan::Opaque } else { Scan::Now });
                true
            }
            // A null met the transforms: nothing to transform, and null says nothing.
            None if keep => {
                self.out.extend_from_slice(b"null");
                true
            }
            None => {
                self.drop_here();
                false
            }
        }
    }

    fn invalid(&mut self, t: &Transform) -> bool {
        self.reasons.push(Reason::new(
            "transform.invalid_value",
            format!(
                "{} is not a valid value for {} and was dropped",
                self.path,
                t.op()
            ),
        ));
        self.drop_here();
        false
    }
}

/// Applies `move`s to the written payload, in order.
fn apply_moves(
    json: String,
    dest: &Destination,
    dropped: &mut PathList,
    reasons: &mut Vec<Reason>,
) -> String {
    let mut v: Value = serde_json::from_str(&json).expect("the walk wrote valid JSON");
    for &i in &dest.compiled.moves {
        let Transform::Move { field, to } = &dest.transforms[i] else {
            continue;
        };
        if let Some(moved) = paths::take(&mut v, field)
            && paths::put(&mut v, to, moved).is_err()
        {
            dropped.push(field.as_str());
            reasons.push(Reason::new(
                "transform.invalid_value",
                format!(
                    "{field} could not be moved to {to}: something else is in the way; dropped"
                ),
            ));
        }
    }
    serde_json::to_string(&v).expect("a Value always serialises")
}
