//! The compact items of a ledger record: one record holds many events instead of a row each.
//!
//! Two kinds of record:
//! - an **events** record, written by the subject stage for each batch it resolves, names each
//!   event once (sequence number, message id, subject), for every destination;
//! - a **handoff** record (a vendor request, or a round's blocks, retries or dead letters of
//!   one destination) lists its events by sequence number only, with what was sent (a shape id)
//!   and why (reasons, detail), each string once per record.
//!
//! So a destination's record costs a few bytes per event, and the person behind an event is
//! written once however many destinations it goes to. The bytes are covered by the record's
//! hash (see `ledger.rs`). Integers are LEB128 varints; strings are length-prefixed UTF-8;
//! message ids that are lowercase UUIDs and subject ids are packed into their bytes.

use crate::{Seq, StoreError};

const VERSION: u8 = 1;

/// One event as an events record names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventItem {
    pub seq: Seq,
    pub message_id: String,
    pub subject: String,
}

/// One event of a handoff record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffItem {
    pub seq: Seq,
    /// Id in `ledger_shapes` (0: none).
    pub shape: i64,
    /// Comma-separated reason codes.
    pub reasons: String,
    pub detail: String,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

fn damaged() -> StoreError {
    StoreError::LedgerDamaged("a ledger record's items cannot be read".into())
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Result<Self, StoreError> {
        match bytes.first() {
            Some(&VERSION) => Ok(Reader { bytes, at: 1 }),
            _ => Err(damaged()),
        }
    }

    fn varint(&mut self) -> Result<u64, StoreError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.bytes.get(self.at).ok_or_else(damaged)?;
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(damaged())
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let end = self.at.checked_add(N).ok_or_else(damaged)?;
        let b: [u8; N] = self
            .bytes
            .get(self.at..end)
            .ok_or_else(damaged)?
            .try_into()
            .map_err(|_| damaged())?;
        self.at = end;
        Ok(b)
    }

    fn id(&mut self) -> Result<String, StoreError> {
        let tag = *self.bytes.get(self.at).ok_or_else(damaged)?;
        self.at += 1;
        match tag {
            AS_TEXT => self.string(),
            AS_UUID => {
                let h = base16ct::lower::encode_string(&self.bytes::<16>()?);
                Ok(format!(
                    "{}-{}-{}-{}-{}",
                    &h[..8],
                    &h[8..12],
                    &h[12..16],
                    &h[16..20],
                    &h[20..]
                ))
            }
            AS_SUBJECT => Ok(format!(
                "sub_{}",
                base16ct::lower::encode_string(&self.bytes::<12>()?)
            )),
            _ => Err(damaged()),
        }
    }

    fn string(&mut self) -> Result<String, StoreError> {
        let n = self.varint()? as usize;
        let end = self.at.checked_add(n).ok_or_else(damaged)?;
        let s = self.bytes.get(self.at..end).ok_or_else(damaged)?;
        self.at = end;
        String::from_utf8(s.to_vec()).map_err(|_| damaged())
    }

    /// A count, bounded by what is left (each element takes a byte at least).
    fn count(&mut self) -> Result<usize, StoreError> {
        let n = self.varint()? as usize;
        if n > self.bytes.len() - self.at {
            return Err(damaged());
        }
        Ok(n)
    }
}

/// How an identifier is written: most message ids are UUIDs and every subject id is
/// `sub_` and 24 hex digits, which pack into half the bytes.
const AS_TEXT: u8 = 0;
const AS_UUID: u8 = 1;
const AS_SUBJECT: u8 = 2;

/// `s` as 16 bytes when it is a lowercase hyphenated UUID.
fn uuid_bytes(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|i| b[*i] != b'-') {
        return None;
    }
    let hex: String = s.split('-').collect();
    packed::<16>(&hex)
}

/// `hex` as bytes when it is exactly that many lowercase hex digits.
fn packed<const N: usize>(hex: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    let decoded = base16ct::lower::decode(hex, &mut out).ok()?;
    (decoded.len() == N).then_some(out)
}

fn put_id(out: &mut Vec<u8>, s: &str) {
    if let Some(u) = uuid_bytes(s) {
        out.push(AS_UUID);
        out.extend_from_slice(&u);
    } else if let Some(hex) = s.strip_prefix("sub_")
        && let Some(b) = packed::<12>(hex)
    {
        out.push(AS_SUBJECT);
        out.extend_from_slice(&b);
    } else {
        out.push(AS_TEXT);
        put_str(out, s);
    }
}

pub fn encode_events(items: &[EventItem]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + items.len() * 40);
    out.push(VERSION);
    put_varint(&mut out, items.len() as u64);
    let mut prev = 0;
    for i in items {
        put_varint(&mut out, i.seq.wrapping_sub(prev));
        put_id(&mut out, &i.message_id);
        put_id(&mut out, &i.subject);
        prev = i.seq;
    }
    out
}

pub fn decode_events(bytes: &[u8]) -> Result<Vec<EventItem>, StoreError> {
    let mut r = Reader::new(bytes)?;
    let n = r.count()?;
    let mut out = Vec::with_capacity(n);
    let mut prev: Seq = 0;
    for _ in 0..n {
        let seq = prev.wrapping_add(r.varint()?);
        out.push(EventItem {
            seq,
            message_id: r.id()?,
            subject: r.id()?,
        });
        prev = seq;
    }
    Ok(out)
}

/// Index of `s` in `table`, added if new.
fn intern<'a>(table: &mut Vec<&'a str>, s: &'a str) -> u64 {
    match table.iter().position(|t| *t == s) {
        Some(i) => i as u64,
        None => {
            table.push(s);
            (table.len() - 1) as u64
        }
    }
}

pub fn encode_handoffs(items: &[HandoffItem]) -> Vec<u8> {
    let mut strings: Vec<&str> = vec![""];
    let mut body = Vec::with_capacity(items.len() * 4);
    let mut prev = 0;
    for i in items {
        put_varint(&mut body, i.seq.wrapping_sub(prev));
        put_varint(&mut body, i.shape.max(0) as u64);
        let r = intern(&mut strings, &i.reasons);
        put_varint(&mut body, r);
        let d = intern(&mut strings, &i.detail);
        put_varint(&mut body, d);
        prev = i.seq;
    }
    let mut out = Vec::with_capacity(body.len() + 64);
    out.push(VERSION);
    put_varint(&mut out, strings.len() as u64);
    for s in &strings {
        put_str(&mut out, s);
    }
    put_varint(&mut out, items.len() as u64);
    out.extend_from_slice(&body);
    out
}

pub fn decode_handoffs(bytes: &[u8]) -> Result<Vec<HandoffItem>, StoreError> {
    let mut r = Reader::new(bytes)?;
    let n = r.count()?;
    let strings = (0..n).map(|_| r.string()).collect::<Result<Vec<_>, _>>()?;
    let get = |i: u64| strings.get(i as usize).cloned().ok_or_else(damaged);
    let n = r.count()?;
    let mut out = Vec::with_capacity(n);
    let mut prev: Seq = 0;
    for _ in 0..n {
        let seq = prev.wrapping_add(r.varint()?);
        let shape = r.varint()? as i64;
        let reasons = get(r.varint()?)?;
        let detail = get(r.varint()?)?;
        out.push(HandoffItem {
            seq,
            shape,
            reasons,
            detail,
        });
        prev = seq;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn events_round_trip(items in proptest::collection::vec((0u64..1 << 40, ".{0,40}", ".{0,30}"), 0..50)) {
            let items: Vec<EventItem> = items.into_iter().map(|(seq, message_id, subject)| EventItem { seq, message_id, subject }).collect();
            prop_assert_eq!(decode_events(&encode_events(&items)).unwrap(), items);
        }

        #[test]
        fn uuids_and_subject_ids_round_trip_packed(
            u in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            sub in "sub_[0-9a-f]{24}",
            odd in "[0-9A-Fa-f-]{36}|sub_[0-9a-fA-F]{23,25}",
        ) {
            let items = vec![
                EventItem { seq: 1, message_id: u.clone(), subject: sub.clone() },
                EventItem { seq: 2, message_id: odd.clone(), subject: odd.clone() },
            ];
            let bytes = encode_events(&items);
            prop_assert_eq!(decode_events(&bytes).unwrap(), items);
        }

        #[test]
        fn handoffs_round_trip(items in proptest::collection::vec((0u64..1 << 40, 0i64..1000, "[a-z.,]{0,20}", ".{0,20}"), 0..50)) {
            let items: Vec<HandoffItem> = items.into_iter().map(|(seq, shape, reasons, detail)| HandoffItem { seq, shape, reasons, detail }).collect();
            prop_assert_eq!(decode_handoffs(&encode_handoffs(&items)).unwrap(), items);
        }

        #[test]
        fn damaged_bytes_are_an_error_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_events(&bytes);
            let _ = decode_handoffs(&bytes);
        }
    }

    #[test]
    fn an_event_is_named_in_about_thirty_bytes() {
        let items: Vec<EventItem> = (1..=500)
            .map(|seq| EventItem {
                seq,
                message_id: format!("{seq:08x}-1111-4222-8333-444455556666"),
                subject: format!("sub_{seq:024x}"),
            })
            .collect();
        let n = encode_events(&items).len();
        assert!(n <= 32 * 500 + 8, "{n} bytes for 500 events");
        assert_eq!(decode_events(&encode_events(&items)).unwrap(), items);
    }

    #[test]
    fn a_handoff_costs_a_few_bytes_per_event() {
        let items: Vec<HandoffItem> = (1000..1500)
            .map(|seq| HandoffItem {
                seq,
                shape: 7,
                reasons: String::new(),
                detail: String::new(),
            })
            .collect();
        let n = encode_handoffs(&items).len();
        assert!(n <= 4 * 500 + 16, "{n} bytes for 500 events");
    }
}
