//! Field paths (`context.traits.email`, `properties.*`), and `take`/`put` for moves.
//!
//! A path is keys joined by `.`; `*` stands for any one key. Arrays are transparent: a path
//! applies to every element, so `properties.products.sku` keeps the `sku` of each product.
//! Keeping a node keeps everything under it.

use serde_json::{Map, Value};
#[cfg(test)]
use smallvec::SmallVec;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    Key(String),
    Any,
}

/// A parsed field path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldPath {
    text: String,
    segments: Vec<Segment>,
}

impl FieldPath {
    pub fn parse(text: &str) -> Result<FieldPath, String> {
        if text.is_empty() {
            return Err("a field path must not be empty".into());
        }
        let mut segments = Vec::new();
        for seg in text.split('.') {
            if seg.is_empty() {
                return Err(format!(
                    "{text:?} has an empty key (two dots, or a leading or trailing dot)"
                ));
            }
            if seg == "*" {
                segments.push(Segment::Any);
            } else if seg.contains('*') {
                return Err(format!(
                    "{text:?}: '*' must be a whole key, as in \"properties.*\""
                ));
            } else if seg.contains(['[', ']']) {
                return Err(format!(
                    "{text:?}: arrays need no index; a path applies to every element (\"properties.products.sku\")"
                ));
            } else {
                segments.push(Segment::Key(seg.to_owned()));
            }
        }
        Ok(FieldPath {
            text: text.to_owned(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub fn has_wildcard(&self) -> bool {
        self.segments.contains(&Segment::Any)
    }

    /// True when every concrete path this one matches is also matched by `other` or lies under
    /// a node `other` matches.
    pub fn is_covered_by(&self, other: &FieldPath) -> bool {
        other.segments.len() <= self.segments.len()
            && other
                .segments
                .iter()
                .zip(&self.segments)
                .all(|(o, s)| match (o, s) {
                    (Segment::Any, _) => true,
                    (Segment::Key(a), Segment::Key(b)) => a == b,
                    (Segment::Key(_), Segment::Any) => false,
                })
    }
}

impl FieldPath {
    /// [`FieldPath::is_covered_by`] for a concrete path as the walkers write it
    /// (`properties.products[].sku`), without allocating.
    pub fn covers_concrete(&self, at: &str) -> bool {
        let mut parts = at.split('.').map(|p| p.trim_end_matches("[]"));
        self.segments.iter().all(|seg| match (seg, parts.next()) {
            (_, None) => false,
            (Segment::Any, Some(_)) => true,
            (Segment::Key(k), Some(p)) => k == p,
        })
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// An allowlist minimising a `Value` tree: the reference the payload writer
/// ([`super::payload`], which minimises, transforms and scans in one walk) is property-tested
/// against. Test-only: decisions use the payload writer.
#[cfg(test)]
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Allowlist {
    root: Node,
}

#[cfg(test)]
#[derive(Debug, Clone, Default, PartialEq)]
struct Node {
    /// Keep this node and everything under it.
    keep: bool,
    children: Vec<(Segment, Node)>,
}

#[cfg(test)]
impl Allowlist {
    pub fn new<'a>(paths: impl IntoIterator<Item = &'a FieldPath>) -> Allowlist {
        let mut root = Node::default();
        for path in paths {
            let mut node = &mut root;
            for seg in &path.segments {
                let i = match node.children.iter().position(|(s, _)| s == seg) {
                    Some(i) => i,
                    None => {
                        node.children.push((seg.clone(), Node::default()));
                        node.children.len() - 1
                    }
                };
                node = &mut node.children[i].1;
            }
            node.keep = true;
        }
        Allowlist { root }
    }

    /// Keeps only the allowed parts of `event` (an object) plus `always` top-level keys.
    /// Returns the minimised value and the paths that were dropped (the highest dropped node of
    /// each branch; array elements are written `key[]`).
    pub fn apply(&self, event: &Value, always: &[&str]) -> (Value, Vec<String>) {
        let mut dropped = Vec::new();
        let Value::Object(map) = event else {
            return (Value::Object(Map::new()), dropped);
        };
        let mut out = Map::new();
        let mut path = String::with_capacity(128);
        dropped.reserve(16);
        for (key, value) in map {
            if always.contains(&key.as_str()) {
                out.insert(key.clone(), value.clone());
                continue;
            }
            path.clear();
            path.push_str(key);
            if let Some(kept) = walk(&[&self.root], key, value, &mut path, &mut dropped) {
                out.insert(key.clone(), kept);
            }
        }
        (Value::Object(out), dropped)
    }
}

/// Decides what of `value` (found under `key`) survives, given the trie nodes of its parent.
#[cfg(test)]
fn walk(
    parents: &[&Node],
    key: &str,
    value: &Value,
    path: &mut String,
    dropped: &mut Vec<String>,
) -> Option<Value> {
    // Usually one node matches (an exact key or `*`); keep them off the heap.
    let mut next: SmallVec<[&Node; 4]> = SmallVec::new();
    for parent in parents {
        for (seg, child) in &parent.children {
            let matches = match seg {
                Segment::Any => true,
                Segment::Key(k) => k == key,
            };
            if matches {
                if child.keep {
                    return Some(value.clone());
                }
                next.push(child);
            }
        }
    }
    if next.is_empty() {
        record(dropped, path);
        return None;
    }
    descend(&next, value, path, dropped)
}

#[cfg(test)]
fn descend(
    nodes: &[&Node],
    value: &Value,
    path: &mut String,
    dropped: &mut Vec<String>,
) -> Option<Value> {
    match value {
        Value::Object(map) => {
            let mut out = Map::new();
            let len = path.len();
            for (k, v) in map {
                path.push('.');
                path.push_str(k);
                if let Some(kept) = walk(nodes, k, v, path, dropped) {
                    out.insert(k.clone(), kept);
                }
                path.truncate(len);
            }
            (!out.is_empty()).then_some(Value::Object(out))
        }
        Value::Array(items) => {
            let len = path.len();
            path.push_str("[]");
            let kept: Vec<Value> = items
                .iter()
                .filter_map(|item| descend(nodes, item, path, dropped))
                .collect();
            path.truncate(len);
            (!kept.is_empty()).then_some(Value::Array(kept))
        }
        // A scalar where the allowlist expected more structure: not allowed.
        _ => {
            record(dropped, path);
            None
        }
    }
}

#[cfg(test)]
/// Records a dropped path once: elements of an array share theirs (`products[].price`).
fn record(dropped: &mut Vec<String>, path: &str) {
    if !path.contains("[]") || !dropped.iter().any(|d| d == path) {
        dropped.push(path.to_owned());
    }
}

/// Removes and returns the value at a concrete path (no wildcards, no arrays on the way).
pub fn take(root: &mut Value, path: &FieldPath) -> Option<Value> {
    let (last, parents) = path.segments().split_last()?;
    let mut v = root;
    for seg in parents {
        let Segment::Key(k) = seg else { return None };
        v = v.get_mut(k)?;
    }
    let Segment::Key(last) = last else {
        return None;
    };
    v.as_object_mut()?.remove(last)
}

/// Sets the value at a concrete path, creating objects on the way. Fails (returning the value)
/// when a non-object is in the way.
pub fn put(root: &mut Value, path: &FieldPath, value: Value) -> Result<(), Value> {
    let Some((last, parents)) = path.segments().split_last() else {
        return Err(value);
    };
    let mut v = root;
    for seg in parents {
        let Segment::Key(k) = seg else {
            return Err(value);
        };
        let Some(map) = v.as_object_mut() else {
            return Err(value);
        };
        v = map
            .entry(k.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    let (Segment::Key(last), Some(map)) = (last, v.as_object_mut()) else {
        return Err(value);
    };
    map.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn allow(paths: &[&str]) -> Allowlist {
        let parsed: Vec<FieldPath> = paths.iter().map(|p| FieldPath::parse(p).unwrap()).collect();
        Allowlist::new(&parsed)
    }

    #[test]
    fn parses_and_refuses_paths() {
        assert!(FieldPath::parse("properties.*").unwrap().has_wildcard());
        assert!(FieldPath::parse("").is_err());
        assert!(FieldPath::parse("a..b").is_err());
        assert!(FieldPath::parse("a.b*").is_err());
        assert!(FieldPath::parse("a.items[0]").is_err());
        let p = FieldPath::parse("properties.total").unwrap();
        assert!(p.is_covered_by(&FieldPath::parse("properties.*").unwrap()));
        assert!(p.is_covered_by(&FieldPath::parse("properties").unwrap()));
        assert!(!p.is_covered_by(&FieldPath::parse("traits.*").unwrap()));
        let products = FieldPath::parse("properties.products.*").unwrap();
        assert!(products.covers_concrete("properties.products[].sku"));
        assert!(products.covers_concrete("properties.products.a.b"));
        assert!(!products.covers_concrete("properties.products"));
        assert!(!products.covers_concrete("properties.total"));
    }

    #[test]
    fn keeps_only_allowed_paths_and_lists_the_dropped() {
        let event = json!({
            "type": "track", "event": "Order Completed", "userId": "u1",
            "properties": {"total": 10, "coupon": "X", "products": [{"sku": "a", "price": 1}, {"sku": "b"}]},
            "context": {"ip": "1.2.3.4", "traits": {"email": "a@b.c", "phone": "1"}}
        });
        let (out, dropped) = allow(&[
            "event",
            "properties.total",
            "properties.products.sku",
            "context.traits.*",
        ])
        .apply(&event, &["type"]);
        assert_eq!(
            out,
            json!({
                "type": "track", "event": "Order Completed",
                "properties": {"total": 10, "products": [{"sku": "a"}, {"sku": "b"}]},
                "context": {"traits": {"email": "a@b.c", "phone": "1"}}
            })
        );
        assert_eq!(
            dropped,
            vec![
                "context.ip",
                "properties.coupon",
                "properties.products[].price",
                "userId"
            ]
        );
    }

    #[test]
    fn moves() {
        let mut v = json!({"a": {"b": 1}, "list": [{"x": 1}, {"x": 2}]});
        let taken = take(&mut v, &FieldPath::parse("a.b").unwrap()).unwrap();
        put(&mut v, &FieldPath::parse("c.d").unwrap(), taken).unwrap();
        assert_eq!(v["c"]["d"], 1);
        assert!(put(&mut v, &FieldPath::parse("c.d.e").unwrap(), json!(1)).is_err());
    }
}
