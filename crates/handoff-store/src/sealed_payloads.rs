//! Event payloads at rest: each is encrypted with AES-256-GCM under a data key that the
//! gateway keeps sealed under the master key (in `state.db`, never in `journal.db`), so a copied
//! `journal.db` reveals nobody. The sequence number is bound as associated data: a payload
//! moved to another row does not decrypt.
//!
//! Each write (the events of one request, sealed together) gets a key of its own, HMAC-SHA-256
//! of the data key and a random 16-byte salt, so no key comes near AES-GCM's limit on random
//! nonces (2^32 messages per key, days at high rates on one key); salts do not collide in
//! practice. Deriving per write rather than per event keeps the cost off the journal's writer.
//!
//! Stored form (a BLOB in the `payload` column): version byte `2`, the data key's id (4 bytes,
//! big-endian: derived from the key, [`key_id`], so another installation's key is recognised), the salt (16 bytes), a random 12-byte nonce, then the ciphertext with its
//! 16-byte tag. Text in the column is a payload stored before encryption, or an erased one: read
//! as it is.

use std::collections::HashMap;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, Payload};
use rusqlite::types::ValueRef;

use crate::{Seq, StoreError};

/// Version 2: a salt per write (version 1, one key for every payload, is no longer read).
const VERSION: u8 = 2;
const SALT: usize = 16;
const HEADER: usize = 1 + 4 + SALT + 12;

/// The journal's data keys: the current one encrypts, every one decrypts.
pub struct PayloadCipher {
    current: u32,
    keys: HashMap<u32, [u8; 32]>,
}

/// The key of one payload: HMAC-SHA-256(data key, label || salt).
fn payload_key(data_key: &[u8; 32], salt: &[u8]) -> Aes256Gcm {
    use hmac::{KeyInit as _, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(data_key).expect("HMAC takes any key");
    mac.update(b"handoff journal payload key\0");
    mac.update(salt);
    let key: [u8; 32] = mac.finalize().into_bytes().into();
    Aes256Gcm::new(&key.into())
}

impl std::fmt::Debug for PayloadCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PayloadCipher(current key {}, <secret>)", self.current)
    }
}

fn aad(seq: Seq) -> [u8; 29] {
    let mut a = [0u8; 29];
    a[..21].copy_from_slice(b"handoff journal event");
    a[21..].copy_from_slice(&seq.to_be_bytes());
    a
}

impl PayloadCipher {
    /// `keys` by id; `current` must be one of them.
    pub fn new(current: u32, keys: impl IntoIterator<Item = (u32, [u8; 32])>) -> Self {
        let keys: HashMap<u32, [u8; 32]> = keys.into_iter().collect();
        assert!(
            keys.contains_key(&current),
            "the current key is one of the keys"
        );
        PayloadCipher { current, keys }
    }

    /// The stored form of the payload of event `seq` (one write of its own).
    pub fn seal(&self, seq: Seq, payload: &str) -> Vec<u8> {
        self.sealer().seal(seq, payload)
    }

    /// Seals the payloads of one write under one derived key.
    pub fn sealer(&self) -> Sealer {
        let salt: [u8; SALT] = rand::random();
        Sealer {
            key_id: self.current,
            salt,
            aead: payload_key(&self.keys[&self.current], &salt),
        }
    }

    /// The payload of event `seq` from its stored form.
    pub fn open(&self, seq: Seq, stored: &[u8]) -> Result<String, StoreError> {
        self.opener().open(seq, stored)
    }

    /// Opens stored payloads one after the other, deriving each write's key once.
    pub fn opener(&self) -> Opener<'_> {
        Opener {
            cipher: self,
            last: None,
        }
    }
}

/// Seals the payloads of one write ([`PayloadCipher::sealer`]).
pub struct Sealer {
    key_id: u32,
    salt: [u8; SALT],
    aead: Aes256Gcm,
}

impl Sealer {
    pub fn seal(&self, seq: Seq, payload: &str) -> Vec<u8> {
        let nonce: [u8; 12] = rand::random();
        let ct = self
            .aead
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: payload.as_bytes(),
                    aad: &aad(seq),
                },
            )
            .expect("AES-GCM encrypts any message this size");
        let mut out = Vec::with_capacity(HEADER + ct.len());
        out.push(VERSION);
        out.extend_from_slice(&self.key_id.to_be_bytes());
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }
}

/// Opens stored payloads ([`PayloadCipher::opener`]), keeping the last write's key.
pub struct Opener<'a> {
    cipher: &'a PayloadCipher,
    last: Option<(u32, [u8; SALT], Aes256Gcm)>,
}

impl Opener<'_> {
    pub fn open(&mut self, seq: Seq, stored: &[u8]) -> Result<String, StoreError> {
        let undecryptable = |why: &str| StoreError::Undecryptable {
            seq,
            why: why.to_owned(),
        };
        if stored.len() < HEADER + 16 || stored[0] != VERSION {
            return Err(undecryptable("not a sealed payload of a known version"));
        }
        let id = u32::from_be_bytes(stored[1..5].try_into().expect("4 bytes"));
        let salt: [u8; SALT] = stored[5..5 + SALT].try_into().expect("16 bytes");
        let cached = matches!(&self.last, Some((i, s, _)) if *i == id && *s == salt);
        if !cached {
            let key = self.cipher.keys.get(&id).ok_or_else(|| {
                undecryptable(&format!(
                    "sealed under data key {id}, which this gateway does not hold"
                ))
            })?;
            self.last = Some((id, salt, payload_key(key, &salt)));
        }
        let (_, _, aead) = self.last.as_ref().expect("set above");
        let nonce: [u8; 12] = stored[5 + SALT..HEADER].try_into().expect("12 bytes");
        let plain = aead
            .decrypt(
                &nonce.into(),
                Payload {
                    msg: &stored[HEADER..],
                    aad: &aad(seq),
                },
            )
            .map_err(|_| {
                undecryptable(
                    "it fails its authentication tag (altered, or moved from another row)",
                )
            })?;
        String::from_utf8(plain).map_err(|_| undecryptable("the decrypted payload is not UTF-8"))
    }
}

/// The id of a data key: the first 4 bytes of HMAC-SHA-256(key, label), so a payload sealed
/// under another installation's key is told from a damaged one.
pub fn key_id(key: &[u8; 32]) -> u32 {
    use hmac::{KeyInit as _, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(b"handoff journal data key id");
    let d = mac.finalize().into_bytes();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

impl PayloadCipher {
    /// A cipher with one data key, under its own [`key_id`].
    pub fn with_key(key: [u8; 32]) -> Self {
        let id = key_id(&key);
        PayloadCipher::new(id, [(id, key)])
    }

    /// `true` when `stored` is a well-formed sealed payload under a data key this cipher does
    /// not hold (a configuration fault, not damage).
    pub fn is_foreign(&self, stored: &[u8]) -> bool {
        stored.len() >= HEADER + 16
            && stored[0] == VERSION
            && !self.keys.contains_key(&u32::from_be_bytes(
                stored[1..5].try_into().expect("4 bytes"),
            ))
    }
}

/// A `payload` column value as the event's text: text as stored, a blob decrypted.
pub(crate) fn read(
    value: ValueRef<'_>,
    seq: Seq,
    opener: Option<&mut Opener<'_>>,
) -> Result<String, StoreError> {
    match value {
        ValueRef::Text(t) => Ok(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => match opener {
            Some(o) => o.open(seq, b),
            None => Err(StoreError::Undecryptable {
                seq,
                why: "the payload is encrypted and no data key was given (pass the master key)"
                    .into(),
            }),
        },
        _ => Err(StoreError::Undecryptable {
            seq,
            why: "the payload column holds neither text nor a sealed payload".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_payloads_open_only_in_their_row_and_with_their_key() {
        let c = PayloadCipher::new(2, [(1, [1u8; 32]), (2, [2u8; 32])]);
        let text = r#"{"type":"track","userId":"jane@example.com"}"#;
        let sealed = c.seal(7, text);
        assert!(
            !sealed.windows(4).any(|w| w == b"jane"),
            "nothing in the clear"
        );
        assert_eq!(&sealed[1..5], &2u32.to_be_bytes(), "the current key's id");
        assert_eq!(c.open(7, &sealed).unwrap(), text);
        assert!(c.open(8, &sealed).is_err(), "moved to another row");
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(c.open(7, &altered).is_err(), "tampered");
        assert!(c.open(7, &sealed[..10]).is_err(), "truncated");
        let other = PayloadCipher::new(2, [(2, [9u8; 32])]);
        assert!(
            other.open(7, &sealed).is_err(),
            "another installation's key"
        );
        let only_old = PayloadCipher::new(1, [(1, [1u8; 32])]);
        let Err(StoreError::Undecryptable { why, .. }) = only_old.open(7, &sealed) else {
            panic!()
        };
        assert!(why.contains("data key 2"), "{why}");
        // Older keys still open what they sealed.
        assert_eq!(c.open(3, &only_old.seal(3, "old")).unwrap(), "old");
        assert_ne!(c.seal(7, text), sealed, "a fresh nonce each time");
    }

    #[test]
    fn another_installations_key_is_recognised_as_such() {
        let (ours, theirs) = (
            PayloadCipher::with_key([1u8; 32]),
            PayloadCipher::with_key([2u8; 32]),
        );
        let sealed = theirs.seal(5, "x");
        assert!(ours.is_foreign(&sealed), "their key id is not ours");
        assert!(!theirs.is_foreign(&sealed));
        assert!(
            !ours.is_foreign(&sealed[..20]),
            "a damaged blob is damage, not foreign"
        );
        assert_ne!(key_id(&[1u8; 32]), key_id(&[2u8; 32]));
    }

    #[test]
    fn one_write_shares_a_derived_key_and_each_write_gets_its_own() {
        let c = PayloadCipher::new(1, [(1, [3u8; 32])]);
        let (w1, w2) = (c.sealer(), c.sealer());
        let (a, b, d) = (w1.seal(1, "a"), w1.seal(2, "b"), w2.seal(3, "d"));
        assert_eq!(a[5..21], b[5..21], "one salt per write");
        assert_ne!(a[5..21], d[5..21], "another write, another key");
        assert_ne!(a[21..33], b[21..33], "a nonce per payload");
        let mut o = c.opener();
        assert_eq!(o.open(1, &a).unwrap(), "a");
        assert_eq!(o.open(3, &d).unwrap(), "d");
        assert_eq!(o.open(2, &b).unwrap(), "b");
        assert!(
            o.open(2, &a).is_err(),
            "the row binding holds with a cached key"
        );
    }
}
