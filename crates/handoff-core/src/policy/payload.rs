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
use super::transform::{Transform, hmac_hex, is_sha256_hex, scalar_text, sha256_hex, truncate_ip};
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

/// Most distinct PII hits (path and kind) kept per decision; more are counted, not listed.
pub const MAX_PII_HITS: usize = 100;
/// Deepest payload a `move` may produce; deeper moves are refused (the value is dropped).
const MAX_MOVE_DEPTH: usize = 100;

/// What the walk produced.
pub(super) struct Written {
    pub json: String,
    pub dropped: PathList,
    pub reasons: Vec<Reason>,
    pub hits: Vec<PiiHit>,
    /// Hits beyond [`MAX_PII_HITS`].
    pub more_hits: usize,
}

/// One step of the path being walked: an object key, or "every element of an array".
#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Elem,
}

struct Walk<'a> {
    dest: &'a Destination,
    event: &'a PreparedEvent,
    out: Vec<u8>,
    /// The path being walked, as segments (for matching) and as text for people (`a.b[].c`,
    /// with a key that itself contains PII written `[redacted:email]`).
    segs: Vec<Seg<'a>>,
    path: String,
    /// `path`'s length before each segment was added.
    marks: Vec<usize>,
    dropped: PathList,
    /// Dropped array paths already listed, once there are many (elements share paths).
    dropped_seen: Option<std::collections::HashSet<String>>,
    reasons: Vec<Reason>,
    hits: Vec<PiiHit>,
    more_hits: usize,
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

/// What to do with a key or value in which PII was found.
enum PiiVerdict {
    /// Nothing found, or expected here, or the action is alert: write it as it is.
    Keep,
    /// Write the redacted form.
    Redact,
}

/// Writes `dest`'s payload for `event`.
pub(super) fn write(event: &PreparedEvent, dest: &Destination) -> Written {
    let mut w = Walk {
        dest,
        event,
        out: Vec::with_capacity(512),
        segs: Vec::with_capacity(8),
        path: String::with_capacity(128),
        marks: Vec::with_capacity(8),
        dropped: PathList {
            text: String::with_capacity(256),
            ends: Vec::with_capacity(16),
        },
        dropped_seen: None,
        reasons: Vec::new(),
        hits: Vec::new(),
        more_hits: 0,
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
            w.enter_key(key);
            let written = if ENVELOPE_KEYS.contains(&key.as_str()) {
                write_key(&mut w.out, key);
                match value {
                    // `messageId` comes from the client: scanned like any other string.
                    Value::String(s) => w.string(s, Scan::Indexed),
                    other => write_value(&mut w.out, other),
                }
                true
            } else {
                let nodes = children(&[root], key);
                let keep = nodes.iter().any(|n| n.keep);
                if !keep && nodes.is_empty() {
                    w.drop_here();
                    false
                } else {
                    w.member(key, value, &nodes, keep)
                }
            };
            if written {
                first = false;
            } else {
                w.out.truncate(mark);
            }
            w.leave();
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
        more_hits: w.more_hits,
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

/// Numbers this long may be a card or phone number written as a JSON number.
const NUMBER_SCAN_DIGITS: usize = 9;

impl<'a> Walk<'a> {
    fn enter_key(&mut self, key: &'a str) {
        self.segs.push(Seg::Key(key));
        self.marks.push(self.path.len());
        if !self.path.is_empty() {
            self.path.push('.');
        }
        let event = self.event;
        let findings = event.pii_in(key);
        if findings.is_empty() {
            self.path.push_str(key);
        } else {
            // The path is shown to people and recorded: it must not carry the PII itself.
            self.path.push_str(&pii::redact(key, findings));
        }
    }

    fn enter_elem(&mut self) {
        self.segs.push(Seg::Elem);
        self.marks.push(self.path.len());
        self.path.push_str("[]");
    }

    fn leave(&mut self) {
        self.segs.pop();
        if let Some(mark) = self.marks.pop() {
            self.path.truncate(mark);
        }
    }

    fn drop_here(&mut self) {
        if !self.segs.iter().any(|s| matches!(s, Seg::Elem)) {
            self.dropped.push(&self.path);
            return;
        }
        // Elements of an array share their paths: list each once.
        let listed = match &mut self.dropped_seen {
            Some(seen) => !seen.insert(self.path.clone()),
            None if self.dropped.len() < 64 => self.dropped.contains(&self.path),
            None => {
                let mut seen: std::collections::HashSet<String> =
                    self.dropped.iter().map(str::to_owned).collect();
                let listed = !seen.insert(self.path.clone());
                self.dropped_seen = Some(seen);
                listed
            }
        };
        if !listed {
            self.dropped.push(&self.path);
        }
    }

    /// Is the current path one of the destination's `pii_expected` fields? Exact matches only:
    /// same number of keys, `*` standing for one key, array elements skipped.
    fn expected(&self) -> bool {
        self.dest.pii_expected.iter().any(|e| {
            let mut keys = self.segs.iter().filter_map(|s| match s {
                Seg::Key(k) => Some(*k),
                Seg::Elem => None,
            });
            e.segments().iter().all(|seg| match (seg, keys.next()) {
                (_, None) => false,
                (Segment::Any, Some(_)) => true,
                (Segment::Key(k), Some(key)) => k == key,
            }) && keys.next().is_none()
        })
    }

    /// Records `findings` (in `text`, at the current path) and says what to write.
    fn judge(&mut self, text: &str, findings: &[pii::Finding]) -> PiiVerdict {
        if findings.is_empty() {
            return PiiVerdict::Keep;
        }
        // On a field meant to carry PII, a value that is exactly one identifier is fine;
        // anything more (a second identifier, text around it) is scanned as anywhere else.
        if findings.len() == 1 && self.expected() {
            let f = findings[0];
            let t = text.as_bytes();
            let trimmed_start = t
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(t.len());
            let trimmed_end = t
                .iter()
                .rposition(|b| !b.is_ascii_whitespace())
                .map_or(0, |i| i + 1);
            if f.start <= trimmed_start && f.end >= trimmed_end {
                return PiiVerdict::Keep;
            }
        }
        let mut kinds: SmallVec<[&'static str; 4]> =
            findings.iter().map(|f| f.kind.code()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        for kind in kinds {
            if self.hits.len() < MAX_PII_HITS {
                self.hits.push(PiiHit {
                    path: self.path.clone(),
                    kind,
                });
            } else {
                self.more_hits += 1;
            }
        }
        match self.dest.pii {
            PiiAction::Redact => PiiVerdict::Redact,
            // Block: the decision is a block; nothing written matters. Alert: sent as it is.
            PiiAction::Block | PiiAction::Alert => PiiVerdict::Keep,
        }
    }

    /// Writes `"key": value` (the caller wrote any comma); false if nothing of it stays.
    fn member(&mut self, key: &'a str, value: &'a Value, nodes: &[&Node], keep: bool) -> bool {
        let event = self.event;
        if keep && let PiiVerdict::Redact = self.judge(key, event.pii_in(key)) {
            // A key cannot be redacted in place (two could collide): the member goes.
            self.drop_here();
            return false;
        }
        let mark = self.out.len();
        write_key(&mut self.out, key);
        if self.value(value, nodes, keep) {
            true
        } else {
            self.out.truncate(mark);
            false
        }
    }

    /// Writes `v` at the current path; false (and nothing written) when nothing of it stays.
    fn value(&mut self, v: &'a Value, nodes: &[&Node], keep: bool) -> bool {
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
                for (key, child) in map {
                    self.enter_key(key);
                    let next = children(nodes, key);
                    let child_keep = keep || next.iter().any(|n| n.keep);
                    if child_keep || !next.is_empty() {
                        let mark = self.out.len();
                        if !first {
                            self.out.push(b',');
                        }
                        if self.member(key, child, &next, child_keep) {
                            first = false;
                        } else {
                            self.out.truncate(mark);
                        }
                    } else {
                        self.drop_here();
                    }
                    self.leave();
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
                self.enter_elem();
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
                self.leave();
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
            // Only numbers of 9+ digits can be a card or phone number; the rest are written as
            // they are, without formatting them twice.
            Value::Number(n) if n.as_f64().is_some_and(|f| f.abs() >= 1e8) => {
                let text = n.to_string();
                if text.bytes().filter(u8::is_ascii_digit).count() >= NUMBER_SCAN_DIGITS {
                    let mut findings = Vec::new();
                    pii::scan(&text, &mut findings);
                    if let PiiVerdict::Redact = self.judge(&text, &findings) {
                        // A number cannot be partly redacted: it becomes the redaction text.
                        write_str(&mut self.out, &pii::redact(&text, &findings));
                        return true;
                    }
                }
                self.out.extend_from_slice(text.as_bytes());
                true
            }
            other => {
                write_value(&mut self.out, other);
                true
            }
        }
    }

    /// Writes a string, with its PII judged.
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
        match self.judge(s, findings) {
            PiiVerdict::Keep => write_str(&mut self.out, s),
            PiiVerdict::Redact => write_str(&mut self.out, &pii::redact(s, findings)),
        }
        self.findings = scratch;
    }

    /// Applies the transforms that end at this node, in order, then writes what is left.
    fn transformed(&mut self, v: &Value, transforms: &[u16], keep: bool) -> bool {
        if !keep {
            // Transforms apply to allowed data only (validation makes every transformed field
            // allowed; this keeps it so if that ever changes).
            self.drop_here();
            return false;
        }
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
                } => {
                    // A client that hashed on the device sent a digest: keep it, do not
                    // normalise it into something else.
                    if is_sha256_hex(current.trim()) {
                        Some(current.trim().to_ascii_lowercase())
                    } else {
                        normalize
                            .apply(current, country_code.as_deref())
                            .map(|n| sha256_hex(&n))
                    }
                }
                Transform::Hmac {
                    normalize,
                    country_code,
                    ..
                } => match &self.dest.pseudonymisation_key {
                    Some(key) => normalize
                        .apply(current, country_code.as_deref())
                        .map(|n| hmac_hex(&key.0, &n)),
                    // Validation requires a key; without one nothing is sent, never a weak HMAC.
                    None => None,
                },
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
            None => {
                self.out.extend_from_slice(b"null");
                true
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

fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Applies `move`s to the written payload, in order.
fn apply_moves(
    json: String,
    dest: &Destination,
    dropped: &mut PathList,
    reasons: &mut Vec<Reason>,
) -> String {
    let Ok(mut v) = serde_json::from_str::<Value>(&json) else {
        // Only a payload nested past serde's limit fails here; the walk copied it from an
        // event that ingest accepted, so this does not happen; refuse the moves if it does.
        reasons.push(Reason::new(
            "transform.invalid_value",
            "the payload is too deeply nested to move fields in; moves were not applied",
        ));
        return json;
    };
    for &i in &dest.compiled.moves {
        let Transform::Move { field, to } = &dest.transforms[i] else {
            continue;
        };
        let Some(moved) = paths::take(&mut v, field) else {
            continue;
        };
        let too_deep = to.segments().len() + depth(&moved) > MAX_MOVE_DEPTH;
        if too_deep || paths::put(&mut v, to, moved).is_err() {
            dropped.push(field.as_str());
            reasons.push(Reason::new(
                "transform.invalid_value",
                format!("{field} could not be moved to {to} (something else is in the way, or it would nest too deep); dropped"),
            ));
        }
    }
    serde_json::to_string(&v).expect("a Value always serialises")
}
