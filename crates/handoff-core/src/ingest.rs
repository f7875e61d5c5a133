//! The Segment HTTP Tracking API, parsed and normalised without I/O.
//!
//! [`parse`] takes the (already decompressed) body of one request and returns the messages that
//! are ready for the journal and the ones that must go to quarantine, each with a stable error
//! code. It never panics on any input: the property tests at the end of this module feed it
//! arbitrary bytes and arbitrary JSON and check that every batch message is either accepted (with
//! ids and times set) or rejected with a code, never lost.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;

use serde_json::value::RawValue;
use time::OffsetDateTime;

use crate::ids::MessageKind;
use crate::time_fmt::{format_millis, parse_client};

/// Largest single message, as Segment documents it (32 KB).
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
/// Largest batch request body, as Segment documents it (500 KB).
pub const MAX_BATCH_BYTES: usize = 500 * 1024;
/// Longest `messageId` we keep; ids are indexed for deduplication, so they must stay small.
pub const MAX_MESSAGE_ID_LEN: usize = 256;
/// Most messages in one batch. Segment limits a batch by bytes only (500 KB), but bytes alone
/// let a body of `[1,1,1,…]` carry 250,000 entries, each costing a parse, a quarantine row and a
/// line of the response. 2,500 is 200 bytes a message at the byte limit, less than any real
/// event with its SDK context (≥ 400 bytes); SDKs flush at 20-100 messages.
pub const MAX_BATCH_MESSAGES: usize = 2_500;
/// Deepest nesting of objects and arrays in a stored message (the message itself is level 1).
/// Every later stage parses stored messages with `serde_json`, whose limit is 128 levels; real
/// events nest under 10. A message deeper than this is refused at ingest, never acknowledged and
/// then found unreadable.
pub const MAX_DEPTH: usize = 64;
/// A batch's stored messages may take at most this many times the request's inflated size
/// (plus [`STORED_OVERHEAD_PER_MESSAGE`] each): the envelope's `context` and `integrations` are
/// copied into every message, and without a bound a 3 KB gzip request once stored 210 MB. SDKs
/// put `context` in each message, not in the envelope; eight times leaves room for a hand-made
/// envelope (a 200-byte `context` over 100 bare 60-byte tracks is about 4 times) and bounds a
/// 500 KB request to under 5 MB stored.
pub const STORED_EXPANSION: usize = 8;
/// What ingest itself adds to each stored message (`type`, a generated `messageId`,
/// `timestamp`, `receivedAt`, `sentAt`, `context.gpc`): about 200 bytes, rounded up.
pub const STORED_OVERHEAD_PER_MESSAGE: usize = 320;

/// Which ingest route a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/track`, `/v1/identify`, …: the body is one message of this kind.
    Single(MessageKind),
    /// `/v1/batch` and `/v1/import`: the body is `{"batch": [...]}`.
    Batch,
}

impl Endpoint {
    /// The largest body (after decompression) this endpoint takes.
    pub fn body_limit(self) -> usize {
        match self {
            Endpoint::Single(_) => MAX_MESSAGE_BYTES,
            Endpoint::Batch => MAX_BATCH_BYTES,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Single(k) => k.as_str(),
            Endpoint::Batch => "batch",
        }
    }
}

/// Why a whole request was refused. Nothing of it is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("the body must be a JSON object")]
    NotObject,
    #[error("a batch body needs a \"batch\" array of messages")]
    BatchMissing,
    #[error("\"batch\" must be an array of messages")]
    BatchNotArray,
    #[error("\"batch\" is empty; send at least one message")]
    BatchEmpty,
    #[error("\"writeKey\" in the body must be a string")]
    WriteKeyInvalid,
    #[error(
        "the batch has more than {MAX_BATCH_MESSAGES} messages; send at most {MAX_BATCH_MESSAGES} per request"
    )]
    TooManyMessages,
    #[error(
        "the batch's \"context\"/\"integrations\", copied into each of its messages, would store more than {limit} bytes \
         ({STORED_EXPANSION} times the request); put them in each message or send smaller batches"
    )]
    ExpansionTooLarge { limit: usize },
    #[error(
        "the batch's \"context\" and \"integrations\" are {0} bytes; copied into each message they must leave room within the {MAX_MESSAGE_BYTES}-byte message limit"
    )]
    EnvelopeTooLarge(usize),
    #[error("the batch's \"{field}\" cannot be stored: {error}")]
    EnvelopeInvalid {
        field: &'static str,
        error: MessageError,
    },
}

impl RequestError {
    /// Stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::MalformedJson(_) => "request.json.malformed",
            RequestError::NotObject => "request.body.not_object",
            RequestError::BatchMissing => "batch.missing",
            RequestError::BatchNotArray => "batch.not_array",
            RequestError::BatchEmpty => "batch.empty",
            RequestError::WriteKeyInvalid => "auth.write_key.invalid",
            RequestError::TooManyMessages => "batch.too_many_messages",
            RequestError::ExpansionTooLarge { .. } => "batch.expansion.too_large",
            RequestError::EnvelopeInvalid { .. } => "batch.envelope.invalid",
            RequestError::EnvelopeTooLarge(_) => "batch.envelope.too_large",
        }
    }

    /// Every code a request can be refused with here.
    pub const CODES: [&'static str; 10] = [
        "request.json.malformed",
        "request.body.not_object",
        "batch.missing",
        "batch.not_array",
        "batch.empty",
        "auth.write_key.invalid",
        "batch.too_many_messages",
        "batch.expansion.too_large",
        "batch.envelope.invalid",
        "batch.envelope.too_large",
    ];
}

/// Why one message was refused. Refused messages are kept in quarantine with this code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("a message must be a JSON object")]
    NotObject,
    #[error("the message is {0} bytes; the limit is {MAX_MESSAGE_BYTES} bytes")]
    TooLarge(usize),
    #[error(
        "with the batch's \"context\" and \"integrations\" merged in, the message is {0} bytes; the limit is {MAX_MESSAGE_BYTES} bytes"
    )]
    TooLargeMerged(usize),
    #[error("the message nests objects and arrays deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("the message holds a number outside the range of a 64-bit float (such as 1e400)")]
    NumberOutOfRange,
    #[error(
        "the message holds a string that is not valid Unicode (a lone surrogate such as \"\\ud800\"): {0}"
    )]
    StringInvalid(String),
    #[error("the message has no \"type\"; use track, identify, page, screen, group or alias")]
    TypeMissing,
    #[error("\"type\" {0:?} is not one of track, identify, page, screen, group, alias")]
    TypeUnknown(String),
    #[error("the message needs a \"userId\" or an \"anonymousId\"")]
    IdentityMissing,
    #[error("\"{0}\" must be a non-empty string or a number")]
    IdentityInvalid(&'static str),
    #[error("a track message needs an \"event\" name (a non-empty string)")]
    EventMissing,
    #[error("a group message needs a \"groupId\"")]
    GroupIdMissing,
    #[error("an alias message needs a \"previousId\"")]
    PreviousIdMissing,
    #[error("\"messageId\" must be a string or number of at most {MAX_MESSAGE_ID_LEN} bytes")]
    MessageIdInvalid,
    #[error("\"{0}\" is not an ISO 8601 timestamp")]
    TimestampInvalid(&'static str),
}

impl MessageError {
    /// Stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            MessageError::NotObject => "message.not_object",
            MessageError::TooLarge(_) | MessageError::TooLargeMerged(_) => "message.too_large",
            MessageError::TooDeep => "message.depth.exceeded",
            MessageError::NumberOutOfRange => "message.number.out_of_range",
            MessageError::StringInvalid(_) => "message.string.invalid",
            MessageError::TypeMissing => "message.type.missing",
            MessageError::TypeUnknown(_) => "message.type.unknown",
            MessageError::IdentityMissing => "message.identity.missing",
            MessageError::IdentityInvalid(_) => "message.identity.invalid",
            MessageError::EventMissing => "message.event.missing",
            MessageError::GroupIdMissing => "message.group_id.missing",
            MessageError::PreviousIdMissing => "message.previous_id.missing",
            MessageError::MessageIdInvalid => "message.message_id.invalid",
            MessageError::TimestampInvalid(_) => "message.timestamp.invalid",
        }
    }

    /// Every code a message can be refused with (for metrics that list all of them).
    pub const CODES: [&'static str; 14] = [
        "message.not_object",
        "message.too_large",
        "message.depth.exceeded",
        "message.number.out_of_range",
        "message.string.invalid",
        "message.type.missing",
        "message.type.unknown",
        "message.identity.missing",
        "message.identity.invalid",
        "message.event.missing",
        "message.group_id.missing",
        "message.previous_id.missing",
        "message.message_id.invalid",
        "message.timestamp.invalid",
    ];
}

/// A message ready for the journal.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub kind: MessageKind,
    pub message_id: String,
    /// The normalised message, serialised as JSON.
    pub payload: String,
}

/// A message refused; kept in quarantine.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// Position in the batch (0 for single-message endpoints).
    pub index: usize,
    pub error: MessageError,
    /// The message exactly as received.
    pub raw: String,
}

/// The result of parsing one request body.
#[derive(Debug, Default)]
pub struct Parsed {
    /// `writeKey` from the body, if the client put it there.
    pub write_key: Option<String>,
    pub accepted: Vec<Accepted>,
    pub rejected: Vec<Rejected>,
}

/// What the HTTP request itself says about its messages, beyond the body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestSignals {
    /// `Sec-GPC: 1`: the browser sent a Global Privacy Control opt-out. Recorded as
    /// `context.gpc = true` in every message of the request, so the policy sees it later.
    pub gpc: bool,
}

/// Parses and normalises one request body.
///
/// `received_at` is the server's clock at receipt; `new_id` generates a `messageId` for messages
/// that come without one.
pub fn parse(
    endpoint: Endpoint,
    body: &[u8],
    received_at: OffsetDateTime,
    new_id: &mut dyn FnMut() -> String,
) -> Result<Parsed, RequestError> {
    parse_with_signals(
        endpoint,
        body,
        received_at,
        RequestSignals::default(),
        new_id,
    )
}

/// [`parse`], recording the request's own signals (GPC) in each message.
pub fn parse_with_signals(
    endpoint: Endpoint,
    body: &[u8],
    received_at: OffsetDateTime,
    signals: RequestSignals,
    new_id: &mut dyn FnMut() -> String,
) -> Result<Parsed, RequestError> {
    let body = std::str::from_utf8(body).map_err(|e| RequestError::MalformedJson(e.to_string()))?;
    let received_at_text = format!("\"{}\"", format_millis(received_at));
    let mut parsed = Parsed::default();
    match endpoint {
        Endpoint::Single(kind) => {
            let raw: &RawValue = serde_json::from_str(body)
                .map_err(|e| RequestError::MalformedJson(e.to_string()))?;
            // The shape first, so a key that is not valid Unicode or nesting past serde_json's
            // own limit gets its own code rather than "not an object".
            if let Err(error) = check_shape(raw.get(), 1) {
                parsed.rejected.push(Rejected {
                    index: 0,
                    error,
                    raw: raw.get().to_owned(),
                });
                return Ok(parsed);
            }
            let members: Members<'_> =
                serde_json::from_str(raw.get()).map_err(|_| RequestError::NotObject)?;
            parsed.write_key = write_key_of(&members)?;
            let normalised = normalise(
                &members,
                raw.get().len(),
                Some(kind),
                &BatchDefaults {
                    gpc: signals.gpc,
                    ..BatchDefaults::default()
                },
                received_at,
                &received_at_text,
                new_id,
            );
            match normalised {
                Ok(a) => parsed.accepted.push(a),
                Err(error) => parsed.rejected.push(Rejected {
                    index: 0,
                    error,
                    raw: raw.get().to_owned(),
                }),
            }
        }
        Endpoint::Batch => {
            let top: Members<'_> = match serde_json::from_str(body) {
                Ok(top) => top,
                Err(e) if e.is_data() => return Err(RequestError::NotObject),
                Err(e) => return Err(RequestError::MalformedJson(e.to_string())),
            };
            let raw_batch = top.get("batch").ok_or(RequestError::BatchMissing)?;
            let messages = batch_messages(raw_batch)?;
            if messages.is_empty() {
                return Err(RequestError::BatchEmpty);
            }
            parsed.write_key = write_key_of(&top)?;
            let defaults = BatchDefaults {
                sent_at: top.get("sentAt"),
                context: top.get("context"),
                integrations: top.get("integrations"),
                gpc: signals.gpc,
            };
            // Copied into every message, an envelope larger than a message would make each one
            // too large: refused before any is built.
            let envelope: usize = [defaults.context, defaults.integrations]
                .iter()
                .flatten()
                .map(|v| v.get().len())
                .sum();
            if envelope > MAX_MESSAGE_BYTES {
                return Err(RequestError::EnvelopeTooLarge(envelope));
            }
            // The envelope's members sit at the same level in each message as in the envelope
            // (`{"context": …}` in the envelope is `{"context": …}` in each message).
            for (field, value) in [
                ("context", defaults.context),
                ("integrations", defaults.integrations),
            ] {
                if let Some(v) = value {
                    check_shape(v.get(), 2)
                        .map_err(|error| RequestError::EnvelopeInvalid { field, error })?;
                }
            }
            let budget =
                STORED_EXPANSION * body.len() + STORED_OVERHEAD_PER_MESSAGE * messages.len();
            let mut stored = 0usize;
            parsed.accepted.reserve(messages.len());
            for (index, raw) in messages.into_iter().enumerate() {
                let result =
                    parse_batch_message(raw, &defaults, received_at, &received_at_text, new_id);
                // What was built counts against the budget whether it is kept or refused as
                // too large once merged: the work is bounded either way.
                stored += match &result {
                    Ok(a) => a.payload.len(),
                    Err(MessageError::TooLargeMerged(n)) => *n,
                    Err(_) => 0,
                };
                if stored > budget {
                    return Err(RequestError::ExpansionTooLarge { limit: budget });
                }
                match result {
                    Ok(a) => parsed.accepted.push(a),
                    Err(error) => parsed.rejected.push(Rejected {
                        index,
                        error,
                        raw: raw.get().to_owned(),
                    }),
                }
            }
        }
    }
    Ok(parsed)
}

fn parse_batch_message(
    raw: &RawValue,
    defaults: &BatchDefaults<'_>,
    received_at: OffsetDateTime,
    received_at_text: &str,
    new_id: &mut dyn FnMut() -> String,
) -> Result<Accepted, MessageError> {
    let len = raw.get().len();
    if len > MAX_MESSAGE_BYTES {
        return Err(MessageError::TooLarge(len));
    }
    // The shape first: a key that is not valid Unicode, or nesting past serde_json's own limit,
    // gets its own code rather than "not an object".
    check_shape(raw.get(), 1)?;
    let members: Members<'_> =
        serde_json::from_str(raw.get()).map_err(|_| MessageError::NotObject)?;
    // A `writeKey` inside a batch message is dropped (never stored) and never decides the
    // source: only the Authorization header or the envelope does, for the whole batch.
    normalise(
        &members,
        len,
        None,
        defaults,
        received_at,
        received_at_text,
        new_id,
    )
}

/// The messages of a batch, refusing more than [`MAX_BATCH_MESSAGES`] before any is parsed.
fn batch_messages(raw: &RawValue) -> Result<Vec<&RawValue>, RequestError> {
    struct Capped<'a>(&'a std::cell::Cell<bool>);
    impl<'de> serde::de::Visitor<'de> for Capped<'_> {
        type Value = Vec<&'de RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array of messages")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
            while let Some(m) = seq.next_element::<&'de RawValue>()? {
                if out.len() == MAX_BATCH_MESSAGES {
                    self.0.set(true);
                    return Err(serde::de::Error::custom("too many messages"));
                }
                out.push(m);
            }
            Ok(out)
        }
    }
    let over = std::cell::Cell::new(false);
    let mut de = serde_json::Deserializer::from_str(raw.get());
    match serde::Deserializer::deserialize_seq(&mut de, Capped(&over)) {
        Ok(messages) => Ok(messages),
        Err(_) if over.get() => Err(RequestError::TooManyMessages),
        Err(_) => Err(RequestError::BatchNotArray),
    }
}

/// Checks that `raw` (valid JSON, sitting at nesting level `level` of the stored message) can be
/// read by every later stage: objects and arrays at most [`MAX_DEPTH`] levels deep, every
/// number within the range of an `f64`, every string valid Unicode. The syntax was checked
/// already; this reads the values, so that what ingest accepts the router, `journal dump` and
/// the data-subject export read too.
pub fn check_shape(raw: &str, level: usize) -> Result<(), MessageError> {
    let mut de = serde_json::Deserializer::from_str(raw);
    let fault = std::cell::Cell::new(None);
    serde::de::DeserializeSeed::deserialize(
        Shape {
            level,
            fault: &fault,
        },
        &mut de,
    )
    .map_err(|e| match fault.take() {
        Some(error) => error,
        None if e.to_string().starts_with("number out of range") => MessageError::NumberOutOfRange,
        None => MessageError::StringInvalid(e.to_string()),
    })
}

/// One value of [`check_shape`]'s walk, at nesting level `level` when it is an object or array.
#[derive(Clone, Copy)]
struct Shape<'a> {
    level: usize,
    fault: &'a std::cell::Cell<Option<MessageError>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Shape<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Shape<'_> {
    fn nested<E: serde::de::Error>(self) -> Result<Self, E> {
        if self.level > MAX_DEPTH {
            self.fault.set(Some(MessageError::TooDeep));
            return Err(E::custom("too deep"));
        }
        Ok(Shape {
            level: self.level + 1,
            fault: self.fault,
        })
    }
}

impl<'de> serde::de::Visitor<'de> for Shape<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.nested()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.nested()?;
        while map.next_key::<Key<'de>>()?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

/// The `writeKey` member, if any. It is never copied into the stored message.
fn write_key_of(m: &Members<'_>) -> Result<Option<String>, RequestError> {
    match m.get("writeKey") {
        None => Ok(None),
        Some(v) => string_of(v)
            .map(|s| Some(s.into_owned()))
            .ok_or(RequestError::WriteKeyInvalid),
    }
}

/// Values a batch envelope applies to each of its messages, as raw JSON.
#[derive(Default)]
struct BatchDefaults<'a> {
    sent_at: Option<&'a RawValue>,
    context: Option<&'a RawValue>,
    integrations: Option<&'a RawValue>,
    /// Set `context.gpc = true` (the request carried `Sec-GPC: 1`).
    gpc: bool,
}

/// A message's top-level members, in the order sent. Values stay raw JSON text: nested objects
/// (`properties`, `context`, …) are checked for syntax but never materialised, and are copied
/// into the stored message as they came. A key sent twice keeps its last value, as in
/// `serde_json::Map`.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

/// Objects with more members than this get a hash index for finding repeated keys.
const SMALL_OBJECT: usize = 16;

/// A key that borrows from the input unless it contains escapes.
#[derive(Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut members: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::with_capacity(16);
                // Repeated keys are found by a scan while the object is small, by a hash index
                // beyond that: a scan alone would make a 500 KB object with tens of thousands
                // of keys cost billions of comparisons.
                let mut index: Option<HashMap<Cow<'de, str>, usize>> = None;
                while let Some((Key(k), v)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    let existing = match &index {
                        Some(index) => index.get(&k).copied(),
                        None => members.iter().position(|(existing, _)| *existing == k),
                    };
                    match existing {
                        Some(i) => members[i].1 = v,
                        None => {
                            if let Some(index) = &mut index {
                                index.insert(k.clone(), members.len());
                            }
                            members.push((k, v));
                            if index.is_none() && members.len() > SMALL_OBJECT {
                                index = Some(
                                    members
                                        .iter()
                                        .enumerate()
                                        .map(|(i, (k, _))| (k.clone(), i))
                                        .collect(),
                                );
                            }
                        }
                    }
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> Members<'a> {
    /// The member's raw value, `null` included.
    fn get_raw(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// The member's raw value; JSON `null` counts as absent.
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
            .filter(|v| v.get() != "null")
    }
}

fn is_string(v: &RawValue) -> bool {
    v.get().starts_with('"')
}

fn is_number(v: &RawValue) -> bool {
    v.get()
        .starts_with(|c: char| c == '-' || c.is_ascii_digit())
}

/// The string a raw JSON value holds, unescaped; `None` when it is not a string.
fn string_of(v: &RawValue) -> Option<Cow<'_, str>> {
    #[derive(Deserialize)]
    struct S<'a>(#[serde(borrow)] Cow<'a, str>);
    if !is_string(v) {
        return None;
    }
    serde_json::from_str::<S<'_>>(v.get()).ok().map(|S(s)| s)
}

/// `true` when `v` is usable as an identifier: a non-blank string or a number.
fn is_identifier(v: &RawValue) -> bool {
    is_number(v) || string_of(v).is_some_and(|s| !s.trim().is_empty())
}

/// Checks an identity field: absent or null is fine (`Ok(false)`), a usable id is `Ok(true)`.
fn identity(m: &Members<'_>, field: &'static str) -> Result<bool, MessageError> {
    match m.get(field) {
        None => Ok(false),
        Some(v) if is_identifier(v) => Ok(true),
        Some(v) if is_string(v) => Ok(false),
        Some(_) => Err(MessageError::IdentityInvalid(field)),
    }
}

fn client_time(
    v: Option<&RawValue>,
    field: &'static str,
) -> Result<Option<OffsetDateTime>, MessageError> {
    match v {
        None => Ok(None),
        Some(v) => string_of(v)
            .and_then(|s| parse_client(&s))
            .map(Some)
            .ok_or(MessageError::TimestampInvalid(field)),
    }
}

fn push_key(out: &mut String, key: &str) {
    if !out.ends_with('{') {
        out.push(',');
    }
    // Keys are re-escaped by serde_json: a key that arrived with escapes stays valid JSON.
    out.push_str(&serde_json::to_string(key).expect("a string always serialises"));
    out.push(':');
}

/// The stored value of `context` or `integrations`: the message's own, the batch's, or both
/// merged when both are objects: the message's members as sent, then the batch's members whose
/// keys the message lacks, each copied as raw JSON (no re-sorting, no loss of number precision).
fn merged<'a>(own: Option<&'a RawValue>, shared: Option<&'a RawValue>) -> Option<Cow<'a, str>> {
    match (own, shared) {
        (None, None) => None,
        (Some(v), None) | (None, Some(v)) => Some(Cow::Borrowed(v.get())),
        (Some(own), Some(shared)) => {
            let (Ok(own_members), Ok(shared_members)) = (
                serde_json::from_str::<Members<'_>>(own.get()),
                serde_json::from_str::<Members<'_>>(shared.get()),
            ) else {
                return Some(Cow::Borrowed(own.get()));
            };
            let mut out = String::with_capacity(own.get().len() + shared.get().len());
            out.push('{');
            let missing = shared_members
                .0
                .iter()
                .filter(|(k, _)| own_members.get_raw(k).is_none());
            for (k, v) in own_members.0.iter().chain(missing) {
                push_key(&mut out, k);
                out.push_str(v.get());
            }
            out.push('}');
            Some(Cow::Owned(out))
        }
    }
}

/// `context` with `"gpc": true`: the browser's `Sec-GPC: 1` is an opt-out, and an opt-out from
/// the user agent wins over whatever the page's script wrote.
fn with_gpc(context: Option<&str>) -> String {
    let members = context.and_then(|c| serde_json::from_str::<Members<'_>>(c).ok());
    let mut out = String::from("{");
    if let Some(members) = &members {
        for (k, v) in members.0.iter().filter(|(k, _)| k != "gpc") {
            push_key(&mut out, k);
            out.push_str(v.get());
        }
    }
    push_key(&mut out, "gpc");
    out.push_str("true}");
    out
}

/// Members that [`normalise`] writes itself rather than copying.
const WRITTEN_BY_US: [&str; 8] = [
    "type",
    "messageId",
    "timestamp",
    "receivedAt",
    "sentAt",
    "context",
    "integrations",
    "writeKey",
];

fn normalise(
    m: &Members<'_>,
    raw_len: usize,
    endpoint_kind: Option<MessageKind>,
    defaults: &BatchDefaults<'_>,
    received_at: OffsetDateTime,
    received_at_text: &str,
    new_id: &mut dyn FnMut() -> String,
) -> Result<Accepted, MessageError> {
    let kind = match endpoint_kind {
        Some(kind) => kind,
        None => match m.get("type") {
            None => return Err(MessageError::TypeMissing),
            Some(v) => match string_of(v) {
                Some(s) => MessageKind::parse(&s)
                    .ok_or_else(|| MessageError::TypeUnknown(s.into_owned()))?,
                None => return Err(MessageError::TypeUnknown(v.get().to_owned())),
            },
        },
    };

    let has_user = identity(m, "userId")?;
    let has_anon = identity(m, "anonymousId")?;
    if !has_user && !has_anon {
        return Err(MessageError::IdentityMissing);
    }
    match kind {
        MessageKind::Track => {
            let named = m.get("event").and_then(string_of);
            if named.is_none_or(|s| s.trim().is_empty()) {
                return Err(MessageError::EventMissing);
            }
        }
        MessageKind::Group => {
            if !m.get("groupId").is_some_and(is_identifier) {
                return Err(MessageError::GroupIdMissing);
            }
        }
        MessageKind::Alias => {
            if !m.get("previousId").is_some_and(is_identifier) {
                return Err(MessageError::PreviousIdMissing);
            }
        }
        MessageKind::Identify | MessageKind::Page | MessageKind::Screen => {}
    }

    let message_id = match m.get("messageId") {
        None => None,
        Some(v) if is_number(v) && v.get().len() <= MAX_MESSAGE_ID_LEN => Some(v.get().to_owned()),
        Some(v) => match string_of(v) {
            Some(s) if s.is_empty() => None,
            Some(s) if s.len() <= MAX_MESSAGE_ID_LEN => Some(s.into_owned()),
            _ => return Err(MessageError::MessageIdInvalid),
        },
    }
    .unwrap_or_else(new_id);

    // Clock-skew correction, as Segment documents it:
    //   timestamp = receivedAt - (sentAt - originalTimestamp)
    // The client's value is kept as `originalTimestamp`.
    let client_timestamp = m.get("timestamp");
    let original = client_time(client_timestamp, "timestamp")?;
    let sent_at_raw = m.get("sentAt").or(defaults.sent_at);
    let sent_at = client_time(sent_at_raw, "sentAt")?;
    let timestamp = match (original, sent_at) {
        (Some(original), Some(sent_at)) => received_at
            .checked_sub(sent_at - original)
            .ok_or(MessageError::TimestampInvalid("timestamp"))?,
        (Some(original), None) => original,
        (None, _) => received_at,
    };

    // The stored message: the client's members as sent (raw), then the ones we set.
    let mut out = String::with_capacity(raw_len + 192);
    out.push('{');
    for (k, v) in &m.0 {
        if WRITTEN_BY_US.contains(&k.as_ref()) || (k == "originalTimestamp" && v.get() == "null") {
            continue;
        }
        push_key(&mut out, k);
        out.push_str(v.get());
    }
    push_key(&mut out, "type");
    out.push('"');
    out.push_str(kind.as_str());
    out.push('"');
    push_key(&mut out, "messageId");
    out.push_str(&serde_json::to_string(&message_id).expect("a string always serialises"));
    push_key(&mut out, "timestamp");
    out.push('"');
    out.push_str(&format_millis(timestamp));
    out.push('"');
    push_key(&mut out, "receivedAt");
    out.push_str(received_at_text);
    if let Some(v) = sent_at_raw {
        push_key(&mut out, "sentAt");
        out.push_str(v.get());
    }
    if let (Some(v), None) = (client_timestamp, m.get("originalTimestamp")) {
        push_key(&mut out, "originalTimestamp");
        out.push_str(v.get());
    }
    for (field, shared) in [
        ("context", defaults.context),
        ("integrations", defaults.integrations),
    ] {
        let mut value = merged(m.get(field), shared);
        if field == "context" && defaults.gpc {
            value = Some(Cow::Owned(with_gpc(value.as_deref())));
        }
        if let Some(v) = value {
            push_key(&mut out, field);
            out.push_str(&v);
        }
    }
    out.push('}');
    if out.len() > MAX_MESSAGE_BYTES + STORED_OVERHEAD_PER_MESSAGE {
        return Err(MessageError::TooLargeMerged(out.len()));
    }
    Ok(Accepted {
        kind,
        message_id,
        payload: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-25 12:00:00 UTC);

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("gen-{n}")
        }
    }

    fn run(endpoint: Endpoint, body: Value) -> Result<Parsed, RequestError> {
        parse(endpoint, body.to_string().as_bytes(), NOW, &mut ids())
    }

    fn payload(a: &Accepted) -> Value {
        serde_json::from_str(&a.payload).unwrap()
    }

    #[test]
    fn track_is_normalised_and_keeps_unknown_fields() {
        let p = run(
            Endpoint::Single(MessageKind::Track),
            json!({"userId": "u1", "event": "Order Completed", "properties": {"total": 30},
                   "custom": {"deep": [1, 2]}, "writeKey": "secret"}),
        )
        .unwrap();
        assert_eq!(p.write_key.as_deref(), Some("secret"));
        assert!(p.rejected.is_empty());
        let v = payload(&p.accepted[0]);
        assert_eq!(v["type"], "track");
        assert_eq!(v["messageId"], "gen-1");
        assert_eq!(v["receivedAt"], "2026-11-25T12:00:00.000Z");
        assert_eq!(v["timestamp"], "2026-11-25T12:00:00.000Z");
        assert_eq!(v["custom"], json!({"deep": [1, 2]}));
        assert_eq!(v["properties"]["total"], 30);
        assert!(
            v.get("writeKey").is_none(),
            "credentials never reach the journal"
        );
    }

    #[test]
    fn clock_skew_is_corrected_from_sent_at() {
        // The client's clock runs 1 hour fast; the event happened 10 s before it was sent.
        let p = run(
            Endpoint::Single(MessageKind::Track),
            json!({"userId": "u1", "event": "e", "messageId": "m1",
                   "timestamp": "2026-11-25T12:59:50Z", "sentAt": "2026-11-25T13:00:00Z"}),
        )
        .unwrap();
        let v = payload(&p.accepted[0]);
        assert_eq!(v["timestamp"], "2026-11-25T11:59:50.000Z");
        assert_eq!(v["originalTimestamp"], "2026-11-25T12:59:50Z");
        assert_eq!(v["messageId"], "m1");
    }

    #[test]
    fn batch_sent_at_context_and_integrations_apply_to_messages() {
        let p = run(
            Endpoint::Batch,
            json!({"sentAt": "2026-11-25T13:00:00Z", "context": {"library": {"name": "x"}, "ip": "1.2.3.4"},
                   "integrations": {"All": true},
                   "batch": [
                     {"type": "identify", "anonymousId": "a", "timestamp": "2026-11-25T12:59:59Z",
                      "context": {"ip": "5.6.7.8"}},
                     {"type": "page", "userId": 42, "name": "Home"}
                   ]}),
        )
        .unwrap();
        assert_eq!(p.accepted.len(), 2);
        let first = payload(&p.accepted[0]);
        assert_eq!(first["timestamp"], "2026-11-25T11:59:59.000Z");
        assert_eq!(first["sentAt"], "2026-11-25T13:00:00Z");
        assert_eq!(
            first["context"]["ip"], "5.6.7.8",
            "the message's own context wins"
        );
        assert_eq!(first["context"]["library"]["name"], "x");
        assert_eq!(first["integrations"], json!({"All": true}));
        let second = payload(&p.accepted[1]);
        assert_eq!(second["type"], "page");
        assert_eq!(second["userId"], 42);
        assert_eq!(second["timestamp"], "2026-11-25T12:00:00.000Z");
    }

    #[test]
    fn one_bad_message_does_not_sink_the_batch() {
        let p = run(
            Endpoint::Batch,
            json!({"batch": [
                {"type": "track", "userId": "u", "event": "ok"},
                {"type": "track", "event": "no ids"},
                "not an object",
                {"type": "purchase", "userId": "u"},
                {"userId": "u"},
                {"type": "track", "userId": "u"},
                {"type": "group", "userId": "u"},
                {"type": "alias", "userId": "u"},
                {"type": "track", "userId": {"id": 1}, "event": "e"},
                {"type": "track", "userId": "u", "event": "e", "timestamp": "soon"},
                {"type": "track", "userId": "u", "event": "e", "messageId": ["x"]},
                {"type": "identify", "userId": "   "},
                {"type": "alias", "userId": "u", "previousId": "p"}
            ]}),
        )
        .unwrap();
        let codes: Vec<(usize, &str)> = p
            .rejected
            .iter()
            .map(|r| (r.index, r.error.code()))
            .collect();
        assert_eq!(
            codes,
            vec![
                (1, "message.identity.missing"),
                (2, "message.not_object"),
                (3, "message.type.unknown"),
                (4, "message.type.missing"),
                (5, "message.event.missing"),
                (6, "message.group_id.missing"),
                (7, "message.previous_id.missing"),
                (8, "message.identity.invalid"),
                (9, "message.timestamp.invalid"),
                (10, "message.message_id.invalid"),
                (11, "message.identity.missing"),
            ]
        );
        assert_eq!(p.accepted.len(), 2);
        assert_eq!(p.rejected[1].raw, "\"not an object\"");
    }

    #[test]
    fn oversized_message_in_batch_is_rejected_alone() {
        let big = "x".repeat(MAX_MESSAGE_BYTES);
        let p = run(
            Endpoint::Batch,
            json!({"batch": [{"type": "track", "userId": "u", "event": "e", "properties": {"blob": big}},
                             {"type": "track", "userId": "u", "event": "e"}]}),
        )
        .unwrap();
        assert_eq!(p.rejected.len(), 1);
        assert_eq!(p.rejected[0].error.code(), "message.too_large");
        assert_eq!(p.accepted.len(), 1);
    }

    #[test]
    fn request_level_errors() {
        let track = Endpoint::Single(MessageKind::Track);
        let err = |e: Endpoint, body: &[u8]| parse(e, body, NOW, &mut ids()).unwrap_err().code();
        assert_eq!(err(track, b"{"), "request.json.malformed");
        assert_eq!(err(track, b""), "request.json.malformed");
        assert_eq!(err(track, b"[1]"), "request.body.not_object");
        assert_eq!(
            err(track, br#"{"userId":"u","event":"e","writeKey":5}"#),
            "auth.write_key.invalid"
        );
        assert_eq!(err(Endpoint::Batch, b"[]"), "request.body.not_object");
        assert_eq!(err(Endpoint::Batch, b"{}"), "batch.missing");
        assert_eq!(err(Endpoint::Batch, br#"{"batch": {}}"#), "batch.not_array");
        assert_eq!(err(Endpoint::Batch, br#"{"batch": []}"#), "batch.empty");
        assert_eq!(
            err(Endpoint::Batch, br#"{"batch": [1], "writeKey": 1}"#),
            "auth.write_key.invalid"
        );
    }

    #[test]
    fn escaped_and_repeated_keys_stay_valid_json() {
        let body = br#"{"userId":"u","event":"e","we\"ird\u00e9":[1,{"x":null}],"a":1,"a":2,"messageId":null,"originalTimestamp":null}"#;
        let p = parse(Endpoint::Single(MessageKind::Track), body, NOW, &mut ids()).unwrap();
        let v = payload(&p.accepted[0]);
        assert_eq!(v["we\"ird\u{e9}"], json!([1, {"x": null}]));
        assert_eq!(v["a"], 2, "the last of a repeated key wins");
        assert_eq!(v["messageId"], "gen-1");
        assert!(v.get("originalTimestamp").is_none());
        let text = &p.accepted[0].payload;
        assert_eq!(text.matches("\"a\"").count(), 1, "{text}");
    }

    #[test]
    fn times_past_the_representable_years_are_refused_not_panicked_on() {
        for ts in ["9999-12-31T23:59:59-01:00", "9999-12-31T23:59:59.999-23:59"] {
            let body = json!({"userId": "u", "event": "e", "timestamp": ts});
            let p = run(Endpoint::Single(MessageKind::Track), body).unwrap();
            assert_eq!(
                p.rejected[0].error.code(),
                "message.timestamp.invalid",
                "{ts}"
            );
        }
    }

    #[test]
    fn large_objects_resolve_repeated_keys_like_small_ones() {
        // Past the small-object threshold the hash index takes over; the last value still wins.
        let mut body = String::from(r#"{"userId":"u","event":"e""#);
        for i in 0..200 {
            body.push_str(&format!(r#","k{}":{i}"#, i % 50));
        }
        body.push('}');
        let p = parse(
            Endpoint::Single(MessageKind::Track),
            body.as_bytes(),
            NOW,
            &mut ids(),
        )
        .unwrap();
        let v = payload(&p.accepted[0]);
        assert_eq!(v["k0"], 150);
        assert_eq!(v["k49"], 199);
        assert_eq!(p.accepted[0].payload.matches("\"k7\"").count(), 1);
    }

    #[test]
    fn sec_gpc_is_recorded_in_every_message() {
        let gpc = RequestSignals { gpc: true };
        let body = br#"{"context": {"ip": "b"}, "batch": [
            {"type": "track", "event": "e", "userId": "u", "context": {"gpc": false, "a": 1}},
            {"type": "track", "event": "e", "userId": "u"}]}"#;
        let p = parse_with_signals(Endpoint::Batch, body, NOW, gpc, &mut ids()).unwrap();
        let ctx: Vec<Value> = p
            .accepted
            .iter()
            .map(|a| serde_json::from_str::<Value>(&a.payload).unwrap()["context"].clone())
            .collect();
        assert_eq!(ctx[0], json!({"a": 1, "ip": "b", "gpc": true}));
        assert_eq!(ctx[1], json!({"ip": "b", "gpc": true}));
        let single = br#"{"event": "e", "userId": "u"}"#;
        let kind = Endpoint::Single(MessageKind::Track);
        let p = parse_with_signals(kind, single, NOW, gpc, &mut ids()).unwrap();
        assert!(
            p.accepted[0]
                .payload
                .ends_with(r#""context":{"gpc":true}}"#)
        );
        let p = parse(kind, single, NOW, &mut ids()).unwrap();
        assert!(!p.accepted[0].payload.contains("gpc"));
    }

    #[test]
    fn merged_context_keeps_order_and_number_text() {
        let body = br#"{"context": {"z": 1, "big": 12345678901234567890123, "ip": "b"},
                        "batch": [{"type": "identify", "userId": "u", "context": {"ip": "m", "a": 1.50}}]}"#;
        let p = parse(Endpoint::Batch, body, NOW, &mut ids()).unwrap();
        let text = &p.accepted[0].payload;
        assert!(
            text.contains(r#""context":{"ip":"m","a":1.50,"z":1,"big":12345678901234567890123}"#),
            "{text}"
        );
    }

    #[test]
    fn a_write_key_inside_a_batch_message_never_picks_the_source() {
        let p = run(
            Endpoint::Batch,
            json!({"batch": [{"type": "identify", "userId": "u", "writeKey": "other-source-key"}]}),
        )
        .unwrap();
        assert_eq!(p.write_key, None);
        assert!(payload(&p.accepted[0]).get("writeKey").is_none());
    }

    #[test]
    fn every_message_error_has_its_code_listed() {
        let all = [
            MessageError::NotObject,
            MessageError::TooLarge(0),
            MessageError::TooDeep,
            MessageError::NumberOutOfRange,
            MessageError::StringInvalid(String::new()),
            MessageError::TypeMissing,
            MessageError::TypeUnknown(String::new()),
            MessageError::IdentityMissing,
            MessageError::IdentityInvalid("userId"),
            MessageError::EventMissing,
            MessageError::GroupIdMissing,
            MessageError::PreviousIdMissing,
            MessageError::MessageIdInvalid,
            MessageError::TimestampInvalid("timestamp"),
        ];
        let mut codes: Vec<&str> = all.iter().map(MessageError::code).collect();
        codes.sort();
        let mut listed = MessageError::CODES.to_vec();
        listed.sort();
        assert_eq!(codes, listed);
    }

    #[test]
    fn what_later_stages_cannot_read_is_refused_per_message() {
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        // The message is level 1, so `properties` at level 2 may hold 62 more levels.
        let ok = format!(
            r#"{{"type":"track","userId":"u","event":"e","properties":{{"a":{}}}}}"#,
            deep(MAX_DEPTH - 2)
        );
        let too_deep = format!(
            r#"{{"type":"track","userId":"u","event":"e","properties":{{"a":{}}}}}"#,
            deep(MAX_DEPTH - 1)
        );
        let body = format!(
            r#"{{"batch":[{ok},{too_deep},{{"type":"track","userId":"u","event":"e","properties":{{"n":1e400}}}},
               {{"type":"track","userId":"\ud800","event":"e"}},{{"type":"track","userId":"u","event":"e","properties":{{"\udfff":1}}}},
               {{"type":"track","userId":"u","event":"e","properties":{{"big":123456789012345678901234567890,"tiny":1e-400}}}}]}}"#
        );
        let p = parse(Endpoint::Batch, body.as_bytes(), NOW, &mut ids()).unwrap();
        let codes: Vec<(usize, &str)> = p
            .rejected
            .iter()
            .map(|r| (r.index, r.error.code()))
            .collect();
        assert_eq!(
            codes,
            [
                (1, "message.depth.exceeded"),
                (2, "message.number.out_of_range"),
                (3, "message.string.invalid"),
                (4, "message.string.invalid"),
            ]
        );
        assert_eq!(p.accepted.len(), 2);
        for a in &p.accepted {
            serde_json::from_str::<Value>(&a.payload).expect("every accepted message parses");
        }
        // A key at the top of a message, and nesting past serde_json's own limit, too.
        let deep = format!(
            r#"{{"userId":"u","event":"e","p":{}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        for (body, want) in [
            (
                r#"{"\ud800":1,"userId":"u","event":"e"}"#.to_owned(),
                "message.string.invalid",
            ),
            (deep, "message.depth.exceeded"),
        ] {
            let p = parse(
                Endpoint::Single(MessageKind::Track),
                body.as_bytes(),
                NOW,
                &mut ids(),
            )
            .unwrap();
            assert_eq!(p.rejected[0].error.code(), want);
            let batch = format!(
                r#"{{"batch":[{}]}}"#,
                body.replacen('{', r#"{"type":"track","#, 1)
            );
            let p = parse(Endpoint::Batch, batch.as_bytes(), NOW, &mut ids()).unwrap();
            assert_eq!(p.rejected[0].error.code(), want);
        }
        let single = br#"{"userId":"\ud800","event":"e"}"#;
        let p = parse(
            Endpoint::Single(MessageKind::Track),
            single,
            NOW,
            &mut ids(),
        )
        .unwrap();
        assert_eq!(p.rejected[0].error.code(), "message.string.invalid");
    }

    #[test]
    fn the_envelope_is_checked_once_and_bounded_when_copied() {
        let deep = format!(
            r#"{{"context":{{"a":{}1{}}},"batch":[{{"type":"track","userId":"u","event":"e"}}]}}"#,
            "[".repeat(MAX_DEPTH - 1),
            "]".repeat(MAX_DEPTH - 1)
        );
        let err = parse(Endpoint::Batch, deep.as_bytes(), NOW, &mut ids()).unwrap_err();
        assert_eq!(err.code(), "batch.envelope.invalid");
        assert!(err.to_string().contains("\"context\""), "{err}");

        let code = |body: &str| match parse(Endpoint::Batch, body.as_bytes(), NOW, &mut ids()) {
            Ok(p) => format!(
                "accepted {} rejected {}",
                p.accepted.len(),
                p.rejected.len()
            ),
            Err(e) => e.code().to_string(),
        };
        // The attack: one large context copied into a thousand messages.
        let msgs = vec![r#"{"type":"track","userId":"u","event":"e"}"#; 1000].join(",");
        let body = format!(
            r#"{{"context":{{"pad":"{}"}},"batch":[{msgs}]}}"#,
            "x".repeat(200_000)
        );
        assert_eq!(code(&body), "batch.envelope.too_large");
        // Below the message limit, but still far more than the request once copied.
        let body = format!(
            r#"{{"context":{{"pad":"{}"}},"batch":[{msgs}]}}"#,
            "x".repeat(30_000)
        );
        assert_eq!(code(&body), "batch.expansion.too_large");

        // A context that alone makes one message too large refuses that message.
        let body = format!(
            r#"{{"context":{{"pad":"{}"}},"batch":[{{"type":"track","userId":"u","event":"e","properties":{{"p":"{}"}}}}]}}"#,
            "x".repeat(20_000),
            "y".repeat(20_000)
        );
        let p = parse(Endpoint::Batch, body.as_bytes(), NOW, &mut ids()).unwrap();
        assert_eq!(p.rejected[0].error.code(), "message.too_large");
        assert!(p.rejected[0].error.to_string().contains("merged"));

        // A real SDK envelope over many small messages stays within the bound.
        let msgs = vec![r#"{"type":"track","userId":"u","event":"e","properties":{"a":1}}"#; 100]
            .join(",");
        let body = format!(
            r#"{{"context":{{"library":{{"name":"analytics-python","version":"2.3.3"}},"pad":"{}"}},"batch":[{msgs}]}}"#,
            "x".repeat(140)
        );
        let p = parse(Endpoint::Batch, body.as_bytes(), NOW, &mut ids()).unwrap();
        assert_eq!(p.accepted.len(), 100);
        let stored: usize = p.accepted.iter().map(|a| a.payload.len()).sum();
        assert!(stored > 3 * body.len(), "{stored} vs {}", body.len());
    }

    #[test]
    fn a_batch_is_capped_by_count_before_its_messages_are_read() {
        let body = format!(
            r#"{{"batch":[{}]}}"#,
            vec!["1"; MAX_BATCH_MESSAGES + 1].join(",")
        );
        let err = parse(Endpoint::Batch, body.as_bytes(), NOW, &mut ids()).unwrap_err();
        assert_eq!(err.code(), "batch.too_many_messages");
        let body = format!(
            r#"{{"batch":[{}]}}"#,
            vec!["1"; MAX_BATCH_MESSAGES].join(",")
        );
        let p = parse(Endpoint::Batch, body.as_bytes(), NOW, &mut ids()).unwrap();
        assert_eq!(p.rejected.len(), MAX_BATCH_MESSAGES);
        assert_eq!(
            parse(Endpoint::Batch, br#"{"batch":[1,}"#, NOW, &mut ids())
                .unwrap_err()
                .code(),
            "request.json.malformed"
        );
    }

    #[test]
    fn endpoint_decides_the_type() {
        let p = run(
            Endpoint::Single(MessageKind::Identify),
            json!({"type": "track", "userId": "u"}),
        )
        .unwrap();
        assert_eq!(p.accepted[0].kind, MessageKind::Identify);
        assert_eq!(payload(&p.accepted[0])["type"], "identify");
    }

    #[test]
    fn extreme_skew_does_not_panic() {
        let p = run(
            Endpoint::Single(MessageKind::Track),
            json!({"userId": "u", "event": "e",
                   "timestamp": "9999-12-31T23:59:59Z", "sentAt": "-9999-01-01T00:00:00Z"}),
        );
        // Either refused as invalid or accepted; never a panic.
        assert!(p.is_ok());
    }

    #[test]
    fn error_codes_are_unique() {
        let mut codes = MessageError::CODES.to_vec();
        let request = [
            RequestError::MalformedJson(String::new()),
            RequestError::NotObject,
            RequestError::BatchMissing,
            RequestError::BatchNotArray,
            RequestError::BatchEmpty,
            RequestError::WriteKeyInvalid,
            RequestError::TooManyMessages,
            RequestError::ExpansionTooLarge { limit: 0 },
            RequestError::EnvelopeInvalid {
                field: "context",
                error: MessageError::TooDeep,
            },
            RequestError::EnvelopeTooLarge(0),
        ];
        let listed: Vec<&str> = request.iter().map(RequestError::code).collect();
        assert_eq!(listed, RequestError::CODES);
        codes.extend(listed);
        let n = codes.len();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), n);
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            ".{0,12}".prop_map(Value::String),
            Just(json!("2026-11-25T12:00:00Z")),
            Just(json!("9999-12-31T23:59:59-01:00")),
            Just(json!("0000-01-01T00:00:00+14:00")),
            Just(json!("track")),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("type".to_string()),
                        Just("userId".to_string()),
                        Just("anonymousId".to_string()),
                        Just("event".to_string()),
                        Just("messageId".to_string()),
                        Just("timestamp".to_string()),
                        Just("sentAt".to_string()),
                        Just("context".to_string()),
                        Just("batch".to_string()),
                        Just("writeKey".to_string()),
                        ".{0,6}",
                    ],
                    inner,
                    0..8
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// JSON text with what `serde_json::Value` (the router's and the export's parser) refuses:
    /// deep nesting, numbers past `f64`, lone surrogates, next to what it takes.
    fn arb_hostile_value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("1".to_string()),
            Just("1e400".to_string()),
            Just("-1e309".to_string()),
            Just("1.7976931348623157e308".to_string()),
            Just("123456789012345678901234567890".to_string()),
            Just("1e-400".to_string()),
            Just(r#""\ud800""#.to_string()),
            Just(r#""\udc00x""#.to_string()),
            Just(r#""\ud83d\ude00""#.to_string()),
            Just(r#""plain""#.to_string()),
            Just("null".to_string()),
        ];
        (leaf, 0usize..140, any::<bool>()).prop_map(|(leaf, depth, objects)| {
            if objects {
                format!("{}{leaf}{}", r#"{"k":"#.repeat(depth), "}".repeat(depth))
            } else {
                format!("{}{leaf}{}", "[".repeat(depth), "]".repeat(depth))
            }
        })
    }

    proptest! {
        #[test]
        fn whatever_ingest_accepts_every_later_stage_reads(
            value in arb_hostile_value(),
            key in prop_oneof![Just("properties"), Just("userId"), Just("context"), Just(r#"\ud800"#)],
            in_envelope in any::<bool>(),
        ) {
            let message = format!(r#"{{"type":"track","userId":"u","event":"e","{key}":{value}}}"#);
            let bodies = [
                (Endpoint::Single(MessageKind::Track), message.clone()),
                (Endpoint::Batch, if in_envelope {
                    format!(r#"{{"context":{{"x":{value}}},"batch":[{{"type":"track","userId":"u","event":"e"}}]}}"#)
                } else {
                    format!(r#"{{"batch":[{message}]}}"#)
                }),
            ];
            for (endpoint, body) in bodies {
                if let Ok(p) = parse(endpoint, body.as_bytes(), NOW, &mut ids()) {
                    for a in &p.accepted {
                        // The router's parser, and the export / `journal dump` that re-serialise it.
                        let v: Value = serde_json::from_str(&a.payload)
                            .map_err(|e| TestCaseError::fail(format!("{e}: {}", a.payload)))?;
                        prop_assert!(serde_json::to_string(&v).is_ok());
                        prop_assert!(RawValue::from_string(a.payload.clone()).is_ok());
                    }
                }
            }
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
            for e in [Endpoint::Batch, Endpoint::Single(MessageKind::Track)] {
                let _ = parse(e, &body, NOW, &mut ids());
            }
        }

        #[test]
        fn accepted_messages_always_have_ids_and_times(v in arb_json()) {
            for e in [Endpoint::Batch, Endpoint::Single(MessageKind::Page)] {
                let body = v.to_string();
                if let Ok(p) = parse(e, body.as_bytes(), NOW, &mut ids()) {
                    for a in &p.accepted {
                        let out: Value = serde_json::from_str(&a.payload).unwrap();
                        prop_assert!(out["messageId"].is_string());
                        prop_assert_eq!(out["messageId"].as_str().unwrap(), a.message_id.as_str());
                        prop_assert!(out["receivedAt"].is_string());
                        prop_assert!(out["timestamp"].is_string());
                        prop_assert!(out.get("writeKey").is_none());
                        let ident = |v: &Value| match v {
                            Value::String(s) => !s.trim().is_empty(),
                            Value::Number(_) => true,
                            _ => false,
                        };
                        prop_assert!(ident(&out["userId"]) || ident(&out["anonymousId"]));
                    }
                    // Every message of a batch is accounted for: accepted or rejected, never lost.
                    if let (Endpoint::Batch, Some(Value::Array(batch))) = (e, v.get("batch")) {
                        prop_assert_eq!(p.accepted.len() + p.rejected.len(), batch.len());
                    }
                }
            }
        }
    }
}
