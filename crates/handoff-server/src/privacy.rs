//! What the ledger and the subject store answer, and data-subject requests: the logic behind
//! `/v1/dsr`, `/admin/v1/reports/*`, `/admin/v1/audit/verify` and the `handoff dsr | report |
//! audit` commands (both call these functions, so they cannot disagree).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use handoff_connectors::connector::Connector;
use handoff_connectors::erasure::{Erasure, ErasureTarget};
use handoff_core::consent::StoredPreferences;
use handoff_core::policy::identifiers_as_sent;
use handoff_core::policy::model::{Destination, PolicySettings};
use handoff_core::subject::{IdKind, Identifier, SubjectKey};
use handoff_core::time_fmt::{format_millis, parse_client, unix_millis};
use handoff_store::dsr::{self, NewTask};
use handoff_store::ledger::{self, Entry, Row};
use handoff_store::outbox::OutboxStore;
use handoff_store::sqlite::now_ms;
use handoff_store::{StoreError, subjects};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::oauth::{Auth, AuthError};

/// Sealed-secret names of this installation's privacy keys.
pub const SUBJECT_KEY_SECRET: &str = "subjects/hmac-key";
pub const LEDGER_KEY_SECRET: &str = "ledger/signing-key";
/// Name of the secret delivery ids are keyed with (see `DeliveryIdKey`).
pub const DELIVERY_ID_KEY_SECRET: &str = "delivery/id-key";
/// Longest note an operator can give when confirming a vendor's part by hand.
pub const MAX_NOTE_CHARS: usize = 500;

/// Name of the secret the identifiers sent to vendors are sealed and digested with.
pub const SENT_IDS_KEY_SECRET: &str = "subjects/sent-identifiers-key";
/// The data key event payloads are encrypted under in the journal (key id 1; a later
/// rotation adds `journal/payload-key-2`, and so on, keeping the older ones to read with).
pub const JOURNAL_KEY_SECRET: &str = "journal/payload-key-1";

/// Seals the identifiers each vendor is sent (`handoff_store::sent_ids`): AES-256-GCM and
/// HMAC-SHA-256, each under its own key derived from one installation secret (itself sealed
/// under the master key).
pub struct IdentifierSealer {
    seal: [u8; 32],
    digest: [u8; 32],
}

impl IdentifierSealer {
    pub fn new(secret: [u8; 32]) -> Self {
        // HKDF-Expand (RFC 5869) with one block per key: HMAC(secret, info || 0x01).
        let expand = |info: &[u8]| -> [u8; 32] {
            use hmac::{KeyInit, Mac};
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&secret)
                .expect("HMAC takes a key of any size");
            mac.update(info);
            mac.update(&[1]);
            mac.finalize().into_bytes().into()
        };
        Self {
            seal: expand(b"handoff sent-identifiers seal"),
            digest: expand(b"handoff sent-identifiers digest"),
        }
    }
}

impl handoff_store::sent_ids::Sealer for IdentifierSealer {
    fn digest(&self, kind: &str, value: &str) -> [u8; 16] {
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.digest)
            .expect("HMAC takes a key of any size");
        mac.update(kind.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }
    fn seal(&self, aad: &[u8], value: &[u8]) -> Vec<u8> {
        crate::keys::encrypt(&self.seal, value, aad)
    }
    fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        crate::keys::decrypt(&self.seal, sealed, aad)
    }
}

/// The keys identifiers are hashed under and ledger checkpoints are signed with, created on
/// first use and sealed under the master key.
pub struct PrivacyKeys {
    pub subjects: SubjectKey,
    pub ledger: ed25519_dalek::SigningKey,
    pub delivery_ids: handoff_connectors::wire::DeliveryIdKey,
    pub sent_ids: Arc<IdentifierSealer>,
    /// Encrypts and decrypts event payloads in the journal.
    pub journal: Arc<handoff_store::sealed_payloads::PayloadCipher>,
}

pub fn keys(auth: &Auth) -> Result<PrivacyKeys, AuthError> {
    let as32 = |v: Vec<u8>| -> Result<[u8; 32], AuthError> {
        v.try_into().map_err(|_| {
            AuthError::Store(StoreError::Io(std::io::Error::other(
                "a stored privacy key is not 32 bytes",
            )))
        })
    };
    let random = || rand::random::<[u8; 32]>().to_vec();
    let subjects = as32(auth.installation_secret(SUBJECT_KEY_SECRET, random)?)?;
    let ledger = as32(auth.installation_secret(LEDGER_KEY_SECRET, random)?)?;
    let delivery_ids = as32(auth.installation_secret(DELIVERY_ID_KEY_SECRET, random)?)?;
    let sent_ids = as32(auth.installation_secret(SENT_IDS_KEY_SECRET, random)?)?;
    let journal = as32(auth.installation_secret(JOURNAL_KEY_SECRET, random)?)?;
    Ok(PrivacyKeys {
        subjects: SubjectKey::new(subjects),
        ledger: ed25519_dalek::SigningKey::from_bytes(&ledger),
        delivery_ids: handoff_connectors::wire::DeliveryIdKey::new(delivery_ids),
        sent_ids: Arc::new(IdentifierSealer::new(sent_ids)),
        journal: Arc::new(journal_cipher(journal)),
    })
}

/// The journal's cipher from its data key ([`JOURNAL_KEY_SECRET`]).
pub fn journal_cipher(key: [u8; 32]) -> handoff_store::sealed_payloads::PayloadCipher {
    handoff_store::sealed_payloads::PayloadCipher::with_key(key)
}

/// Everything requests and reports need, in the gateway and in the CLI alike.
pub struct Privacy {
    pub store: Arc<OutboxStore>,
    pub data_dir: PathBuf,
    pub subject_key: SubjectKey,
    pub destinations: Vec<(Destination, Arc<dyn Connector>)>,
    /// Policy settings (the deadline of requests; how identifiers are read).
    pub settings: PolicySettings,
    /// Decrypts the journal's payloads (an access request exports the events still held).
    pub journal_cipher: Arc<handoff_store::sealed_payloads::PayloadCipher>,
    /// The gateway's journal: erasure overwrites events through its writer (one writer per
    /// file). `None` in CLI commands, which write the file themselves.
    pub journal: Option<Arc<dyn handoff_store::Journal>>,
}

/// A user-facing error with a stable code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PrivacyError {
    pub code: &'static str,
    pub message: String,
    /// 404-like (nothing found) rather than 400-like (bad input).
    pub not_found: bool,
}

impl PrivacyError {
    fn bad(code: &'static str, message: impl Into<String>) -> Self {
        PrivacyError {
            code,
            message: message.into(),
            not_found: false,
        }
    }
}

impl From<StoreError> for PrivacyError {
    fn from(e: StoreError) -> Self {
        PrivacyError {
            code: "store.error",
            message: e.to_string(),
            not_found: false,
        }
    }
}

/// Who a request or report is about, as given.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    #[serde(rename = "userId", default)]
    pub user_id: Option<String>,
    #[serde(rename = "anonymousId", default)]
    pub anonymous_id: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
}

impl Identity {
    fn identifiers(&self) -> Vec<Identifier> {
        [
            (IdKind::UserId, &self.user_id),
            (IdKind::AnonymousId, &self.anonymous_id),
            (IdKind::Email, &self.email),
        ]
        .into_iter()
        .filter_map(|(kind, v)| {
            v.as_ref()
                .filter(|v| !v.trim().is_empty())
                .map(|v| Identifier {
                    kind,
                    value: v.trim().to_owned(),
                })
        })
        .collect()
    }
}

/// How a task records that its vendor was asked about an identifier: its kind and keyed hash.
fn named_as(kind: &str, hash: &str) -> String {
    format!("{kind}:{hash}")
}

/// `POST /v1/dsr`'s body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DsrInput {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(flatten)]
    pub identity: Identity,
    /// Overrides the configured deadline (e.g. 45 for a CCPA request).
    #[serde(default)]
    pub deadline_days: Option<u32>,
}

pub const DSR_KINDS: [&str; 3] = ["access", "erasure", "opt_out"];

impl Privacy {
    fn hashes(&self, identity: &Identity) -> Result<Vec<(&'static str, String)>, PrivacyError> {
        let ids = identity.identifiers();
        if ids.is_empty() {
            return Err(PrivacyError::bad(
                "dsr.identity.missing",
                "name the person by userId, anonymousId or email",
            ));
        }
        Ok(ids
            .iter()
            .map(|i| (i.kind.as_str(), self.subject_key.hash(i)))
            .collect())
    }

    /// The subject these identifiers belong to, without creating one.
    pub fn find_subject(&self, identity: &Identity) -> Result<subjects::Subject, PrivacyError> {
        let hashes = self.hashes(identity)?;
        self.store
            .with_reader(|c| {
                for (_, h) in &hashes {
                    if let Some(s) = subjects::find(c, h)? {
                        return Ok(Some(s));
                    }
                }
                Ok(None)
            })?
            .ok_or(PrivacyError {
                code: "subject.unknown",
                message: "no events of this person passed through Handoff".into(),
                not_found: true,
            })
    }

    /// Files a request (or returns the one already filed for the person: requests are
    /// idempotent). Returns the request and whether it is new.
    pub fn file(
        &self,
        input: &DsrInput,
        requested_by: &str,
    ) -> Result<(dsr::Request, bool), PrivacyError> {
        if !DSR_KINDS.contains(&input.kind.as_str()) {
            return Err(PrivacyError::bad(
                "dsr.type.unknown",
                format!(
                    "type {:?} is not one of {}",
                    input.kind,
                    DSR_KINDS.join(", ")
                ),
            ));
        }
        let days = input
            .deadline_days
            .unwrap_or(self.settings.dsr_deadline_days);
        if !(1..=365).contains(&days) {
            return Err(PrivacyError::bad(
                "dsr.deadline.invalid",
                "deadline_days must be between 1 and 365",
            ));
        }
        let hashes = self.hashes(&input.identity)?;
        let kind = input.kind.as_str();
        if kind == "access" {
            // Asking what is held must not make Handoff hold something: an unknown person gets
            // that answer, and no subject is created for them.
            match self.find_subject(&input.identity) {
                Err(e) if e.code == "subject.unknown" => {
                    return Err(PrivacyError {
                        code: "dsr.no_data_held",
                        message: "no data is held about this person: no event routed so far names these identifiers (events are routed within seconds of arriving, and only when destinations are configured), so there is nothing to export and no request was filed".into(),
                        ..e
                    });
                }
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
        let now = now_ms();
        let (id, new, erase) = self.store.transact(|tx| {
            let subject = subjects::resolve(tx, &hashes, now)?
                .subject
                .expect("identifiers given");
            if let Some(id) = dsr::existing(tx, &subject.id, kind)? {
                // The same request again: nothing new is filed, but the journal is erased
                // again (in case erasing it failed the first time; it is idempotent), and
                // vendors are asked about identifiers this filing names for the first time.
                let mut entries = Vec::new();
                let mut erase = Vec::new();
                dsr::set_subject(tx, &id, &subject.id)?;
                if kind == "erasure" {
                    erase = dsr::event_seqs(tx, &subject.id)?;
                    let asked =
                        self.extend_erasure(tx, &id, &subject.id, &input.identity, &hashes)?;
                    if asked > 0 {
                        dsr::reopen(tx, &id)?;
                        entries.push(Entry {
                            kind: ledger::kind::DSR,
                            subject: subject.id.clone(),
                            outcome: "erasure.extended".into(),
                            detail: format!(
                                "request {id} filed again by {requested_by}, naming more of the person: {asked} vendor(s) to ask"
                            ),
                            ..Entry::default()
                        });
                    }
                }
                return Ok(((id, false, erase), entries));
            }
            let id: String = std::iter::once("dsr_".to_owned())
                .chain(rand::random::<[u8; 10]>().iter().map(|b| format!("{b:02x}")))
                .collect();
            let mut entry = Entry {
                kind: ledger::kind::DSR,
                subject: subject.id.clone(),
                outcome: format!("{kind}.filed"),
                detail: format!("request {id} by {requested_by}"),
                ..Entry::default()
            };
            let mut entries = Vec::new();
            let mut tasks = Vec::new();
            let mut erase = Vec::new();
            match kind {
                "erasure" => {
                    subjects::suppress(tx, &subject.id, now)?;
                    let (queued, dead) = dsr::purge_queues(tx, &subject.id)?;
                    erase = dsr::event_seqs(tx, &subject.id)?;
                    entry.detail = format!(
                        "{}; suppressed; purged {queued} queued and {dead} dead-lettered payloads and {} journal events",
                        entry.detail,
                        erase.len()
                    );
                    let named = hashes
                        .iter()
                        .map(|(kind, h)| named_as(kind, h))
                        .collect::<Vec<_>>()
                        .join(",");
                    for (destination, vendor) in dsr::recipients(tx, &subject.id)? {
                        tasks.push(self.erasure_task(
                            tx,
                            &id,
                            &subject.id,
                            (destination, vendor),
                            &input.identity,
                            named.clone(),
                            None,
                        )?);
                    }
                }
                "opt_out" => {
                    let mut prefs = subject
                        .preferences
                        .as_deref()
                        .and_then(StoredPreferences::from_json)
                        .unwrap_or_default();
                    prefs.opt_out_of_sale = true;
                    subjects::set_preferences(tx, &subject.id, &prefs.to_json())?;
                    subjects::changed(tx)?;
                }
                _ => {}
            }
            dsr::insert(
                tx,
                &id,
                kind,
                &subject.id,
                requested_by,
                now,
                now + i64::from(days) * 86_400_000,
                &tasks,
            )?;
            entries.push(entry);
            Ok(((id, true, erase), entries))
        })?;
        if !erase.is_empty() {
            match &self.journal {
                // The API runs requests on blocking threads (`spawn_blocking`), where waiting
                // for the writer's answer is allowed; `block_in_place` also covers a worker
                // thread of the multi-threaded runtime.
                Some(journal) => {
                    tokio::task::block_in_place(|| {
                        tokio::runtime::Handle::current().block_on(journal.erase_events(erase))
                    })?;
                }
                None => {
                    handoff_store::sqlite::erase_events(&self.data_dir, &erase)?;
                }
            }
        }
        if kind == "erasure" {
            let given = input.identity.identifiers();
            let of = |email: bool| -> Vec<&str> {
                given
                    .iter()
                    .filter(|i| (i.kind == IdKind::Email) == email)
                    .map(|i| i.value.as_str())
                    .collect()
            };
            let (ids, emails) = (of(false), of(true));
            let n = handoff_store::sqlite::erase_quarantined(&self.data_dir, &ids, &emails)?;
            if n > 0 {
                tracing::info!(dsr = %id, messages = n, "erased quarantined messages that named the person");
            }
        }
        let request = self.get(&id)?;
        Ok((request, new))
    }

    /// A vendor's part of erasure `id`: naming the person by the identifiers in `identity` as
    /// this destination sent them (hashed or pseudonymised where it transforms them), plus those
    /// of an `earlier` call still to be made, and the vendor's own ids for them.
    #[allow(clippy::too_many_arguments)]
    fn erasure_task(
        &self,
        tx: &handoff_store::Conn,
        id: &str,
        subject: &str,
        (destination, vendor): (String, String),
        identity: &Identity,
        named: String,
        earlier: Option<&ErasureTarget>,
    ) -> Result<NewTask, StoreError> {
        let Some((dest, connector)) = self.destinations.iter().find(|(d, _)| d.id == destination)
        else {
            return Ok(NewTask {
                instructions: format!(
                    "{destination} received this person's data but is no longer configured: ask the vendor to erase it by hand, then confirm"
                ),
                destination,
                vendor,
                manual: true,
                target: String::new(),
                named,
            });
        };
        let (user_id, anonymous_id, email) = identifiers_as_sent(
            dest,
            &self.settings,
            identity.user_id.as_deref(),
            identity.anonymous_id.as_deref(),
            identity.email.as_deref(),
        );
        let mut target = ErasureTarget {
            dsr_id: id.to_owned(),
            subject_id: subject.to_owned(),
            user_ids: user_id.into_iter().collect(),
            anonymous_ids: anonymous_id.into_iter().collect(),
            emails: email.into_iter().collect(),
            vendor_refs: subjects::vendor_refs(tx, &destination, subject)?,
        };
        // Everything the vendor was sent about the person (and anyone merged into them), as it
        // received it, not only what the request names.
        if let Some(sealer) = self.store.identifier_sealer() {
            let (sent, unreadable) = handoff_store::sent_ids::read(
                tx,
                sealer.as_ref(),
                &subjects::aliases(tx, subject)?,
                &destination,
            )?;
            if unreadable > 0 {
                tracing::warn!(dsr = %id, destination = %destination, rows = unreadable, "stored identifiers that do not open were skipped");
            }
            for (kind, value) in sent {
                let list = match kind.as_str() {
                    handoff_store::sent_ids::USER_ID => &mut target.user_ids,
                    handoff_store::sent_ids::ANONYMOUS_ID => &mut target.anonymous_ids,
                    _ => &mut target.emails,
                };
                if !list.contains(&value) {
                    list.push(value);
                }
            }
        }
        if let Some(e) = earlier {
            for (ours, theirs) in [
                (&mut target.user_ids, &e.user_ids),
                (&mut target.anonymous_ids, &e.anonymous_ids),
                (&mut target.emails, &e.emails),
            ] {
                for v in theirs {
                    if !ours.contains(v) {
                        ours.push(v.clone());
                    }
                }
            }
        }
        let (manual, instructions) = match connector
            .erasure(&target, time::OffsetDateTime::now_utc())
        {
            Erasure::Calls(_) => (false, String::new()),
            Erasure::Manual(how) => (true, how),
            // The ledger says this vendor received the person's data, so "nothing to name
            // them by" needs a human.
            Erasure::NothingHeld(why) => (
                true,
                format!(
                    "Handoff cannot name this person to the vendor ({why}). Ask the vendor to erase the data it received (see `handoff report subject --id {subject}`), then confirm with `handoff dsr confirm DSR_ID {destination}`."
                ),
            ),
        };
        Ok(NewTask {
            destination,
            vendor,
            manual,
            target: serde_json::to_string(&target).expect("a target always serialises"),
            instructions,
            named,
        })
    }

    /// Erasure `id` filed again: vendors that received the person's data and have no part yet
    /// get one, and vendors called before are called again about the identifiers this filing
    /// names for the first time (which they may know the person by). Returns how many.
    fn extend_erasure(
        &self,
        tx: &handoff_store::Conn,
        id: &str,
        subject: &str,
        identity: &Identity,
        hashes: &[(&str, String)],
    ) -> Result<usize, StoreError> {
        let tasks = dsr::get(tx, id)?.map(|r| r.tasks).unwrap_or_default();
        // `hashes` are those of `identity.identifiers()`, in order.
        let given: Vec<(String, Identifier)> = identity
            .identifiers()
            .into_iter()
            .zip(hashes)
            .map(|(i, (kind, hash))| (named_as(kind, hash), i))
            .collect();
        let mut asked = 0;
        for (destination, vendor) in dsr::recipients(tx, subject)? {
            let task = tasks.iter().find(|t| t.destination == destination);
            let named: BTreeSet<&str> = task
                .map(|t| t.named.split(',').filter(|h| !h.is_empty()).collect())
                .unwrap_or_default();
            // Only what this vendor has not been asked about yet.
            let mut fresh = Identity::default();
            for (hash, i) in &given {
                if named.contains(hash.as_str()) {
                    continue;
                }
                let field = match i.kind {
                    IdKind::UserId => &mut fresh.user_id,
                    IdKind::AnonymousId => &mut fresh.anonymous_id,
                    IdKind::Email => &mut fresh.email,
                };
                *field = Some(i.value.clone());
            }
            if fresh.identifiers().is_empty() && task.is_some() {
                continue;
            }
            let all_named = named
                .iter()
                .copied()
                .chain(given.iter().map(|(h, _)| h.as_str()))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join(",");
            match task {
                None => {
                    let new = self.erasure_task(
                        tx,
                        id,
                        subject,
                        (destination, vendor),
                        identity,
                        all_named,
                        None,
                    )?;
                    dsr::add_task(tx, id, &new)?;
                    asked += 1;
                }
                // Called before (pending or done), or left to an operator who has not confirmed
                // yet (the vendor was sent none of the identifiers, or refused the call): the
                // new identifiers may let Handoff call it.
                Some(t) if t.method == "api" || t.status != dsr::status::DONE => {
                    let earlier: Option<ErasureTarget> = t
                        .target
                        .as_deref()
                        .and_then(|t| serde_json::from_str(t).ok());
                    let again = self.erasure_task(
                        tx,
                        id,
                        subject,
                        (destination.clone(), vendor),
                        &fresh,
                        all_named,
                        earlier.as_ref(),
                    )?;
                    if again.manual || t.target.as_deref() == Some(again.target.as_str()) {
                        // Nothing new to name them by at this vendor.
                        dsr::rename_task(tx, id, &destination, &again.named, None)?;
                    } else {
                        dsr::rename_task(tx, id, &destination, &again.named, Some(&again.target))?;
                        asked += 1;
                    }
                }
                // Done by hand: the operator worked from the subject report.
                Some(_) => {}
            }
        }
        Ok(asked)
    }

    pub fn get(&self, id: &str) -> Result<dsr::Request, PrivacyError> {
        self.store
            .with_reader(|c| dsr::get(c, id))?
            .ok_or(PrivacyError {
                code: "dsr.not_found",
                message: format!("no request {id}"),
                not_found: true,
            })
    }

    /// A request as the API shows it: its vendors' status, and for access requests the export.
    pub fn view(&self, request: &dsr::Request) -> Result<Value, PrivacyError> {
        let mut v = serde_json::to_value(request).expect("a request serialises");
        v["created_at"] = json!(rfc3339(request.created_at_ms));
        v["deadline"] = json!(rfc3339(request.deadline_at_ms));
        v["overdue"] =
            json!(request.status == dsr::status::OPEN && now_ms() > request.deadline_at_ms);
        if let Some(t) = request.completed_at_ms {
            v["completed_at"] = json!(rfc3339(t));
        }
        if request.kind == "access" {
            v["export"] = self.export(&request.subject)?;
        }
        // What an operator quotes to a vendor they must ask by hand, built from the task's
        // target when shown: never stored in the instructions, and gone once the part is done
        // (the target is).
        if let Some(tasks) = v["tasks"].as_array_mut() {
            for (view, task) in tasks.iter_mut().zip(&request.tasks) {
                if task.method == "manual"
                    && task.status != dsr::status::DONE
                    && let Some(target) = task
                        .target
                        .as_deref()
                        .and_then(|t| serde_json::from_str::<ErasureTarget>(t).ok())
                {
                    view["quote"] = json!(target.quote());
                }
            }
        }
        Ok(v)
    }

    /// An operator confirms a manual vendor task (e.g. Meta) as done.
    /// Marks a vendor's part of request `id` done (an operator did it by hand), with `note`
    /// (what was done, a ticket number) in the ledger. Returns the request, and `true` when that
    /// part was done already (then nothing changes).
    pub fn confirm(
        &self,
        id: &str,
        destination: &str,
        by: &str,
        note: Option<&str>,
    ) -> Result<(dsr::Request, bool), PrivacyError> {
        if let Some(note) = note
            && (note.chars().count() > MAX_NOTE_CHARS || note.chars().any(char::is_control))
        {
            return Err(PrivacyError::bad(
                "dsr.note.invalid",
                format!("a note is one line of at most {MAX_NOTE_CHARS} characters"),
            ));
        }
        let request = self.get(id)?;
        let Some(task) = request.tasks.iter().find(|t| t.destination == destination) else {
            return Err(PrivacyError {
                code: "dsr.task.not_found",
                message: format!("request {id} has no task for {destination}"),
                not_found: true,
            });
        };
        if task.status == dsr::status::DONE {
            return Ok((request, true));
        }
        let now = now_ms();
        self.store.transact(|tx| {
            let how = match note.map(str::trim).filter(|n| !n.is_empty()) {
                Some(note) => format!("confirmed by {by}: {note}"),
                None => format!("confirmed by {by}"),
            };
            let entry = dsr::confirm_erasure(tx, id, destination, &task.vendor, &how, None, now)?;
            Ok(((), entry.into_iter().collect()))
        })?;
        Ok((self.get(id)?, false))
    }

    /// What Handoff holds about a subject and what each vendor received.
    pub fn export(&self, subject: &str) -> Result<Value, PrivacyError> {
        let (s, kinds, rows, queued, dead, held) = self.store.with_reader(|c| {
            let s = subjects::load(c, subject)?;
            let kinds = subjects::identifier_kinds(c, subject)?;
            let rows = ledger::for_subject(c, subject)?;
            let (queued, dead) = handoff_store::outbox::held_for_subject(c, subject)?;
            let held = dsr::event_seqs(c, subject)?;
            Ok((s, kinds, rows, queued, dead, held))
        })?;
        let s = s.ok_or(PrivacyError {
            code: "subject.unknown",
            message: format!("no subject {subject}"),
            not_found: true,
        })?;
        // Every event of theirs the journal holds, also those no destination has decided yet.
        let seqs: Vec<handoff_store::Seq> = held;
        let events: Vec<Value> = handoff_store::sqlite::read_events_at(
            &self.data_dir,
            Some(self.journal_cipher.as_ref()),
            &seqs,
        )?
        .into_iter()
        .map(|e| {
            json!({
                "seq": e.seq,
                "messageId": e.message_id,
                "event": serde_json::from_str::<Value>(&e.payload).unwrap_or(Value::Null),
            })
        })
        .collect();
        Ok(json!({
            "subject": subject,
            "created_at": rfc3339(s.created_at_ms),
            "suppressed_at": s.suppressed_at_ms.map(rfc3339),
            "preferences": s.preferences.as_deref().and_then(|p| serde_json::from_str::<Value>(p).ok()),
            "identifiers": kinds.iter().map(|(k, n)| (k.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "held": {"events": events, "queued_payloads": queued, "dead_letters": dead},
            "vendors": per_vendor(&rows),
        }))
    }

    /// Everything sent about one person, per vendor, with the ledger entries.
    pub fn subject_report(&self, identity_or_id: SubjectQuery) -> Result<Report, PrivacyError> {
        let subject = match identity_or_id {
            SubjectQuery::Id(id) => id,
            SubjectQuery::Identity(i) => self.find_subject(&i)?.id,
        };
        let rows = self
            .store
            .with_reader(|c| ledger::for_subject(c, &subject))?;
        let vendors = per_vendor(&rows);
        let csv = vendors
            .iter()
            .map(|v| {
                vec![
                    v["vendor"].as_str().unwrap_or("").to_owned(),
                    join(&v["destinations"]),
                    v["handoffs"].to_string(),
                    v["first"].as_str().unwrap_or("").to_owned(),
                    v["last"].as_str().unwrap_or("").to_owned(),
                    join(&v["purposes"]),
                    join(&v["legal_bases"]),
                    join(&v["categories"]),
                    join(&v["fields"]),
                ]
            })
            .collect();
        Ok(Report {
            json: json!({"subject": subject, "vendors": vendors, "entries": rows}),
            header: vec![
                "vendor",
                "destinations",
                "handoffs",
                "first",
                "last",
                "purposes",
                "legal_bases",
                "categories",
                "fields",
            ],
            rows: csv,
        })
    }

    /// For an incident at `vendor`: the subjects whose data it received in `[from, to)`, with
    /// the categories and fields, and counts.
    ///
    /// `name` is a vendor id or a destination id (then only that destination's handoffs). A
    /// name that is neither, among the configured destinations and those the ledger records,
    /// is an error listing the known ones: an empty report must mean "nothing was sent".
    pub fn exposure(&self, name: &str, from_ms: i64, to_ms: i64) -> Result<Report, PrivacyError> {
        let mut recipients: Vec<(String, String)> = self
            .store
            .with_reader(ledger::recipients)?
            .into_iter()
            .chain(
                self.destinations
                    .iter()
                    .map(|(d, _)| (d.vendor.id.to_string(), d.id.to_string())),
            )
            .collect();
        recipients.sort();
        recipients.dedup();
        let filter = if recipients.iter().any(|(v, _)| v == name) {
            ledger::Recipient::Vendor(name)
        } else if recipients.iter().any(|(_, d)| d == name) {
            ledger::Recipient::Destination(name)
        } else {
            let mut vendors: Vec<&str> = recipients.iter().map(|(v, _)| v.as_str()).collect();
            vendors.dedup();
            let destinations: Vec<&str> = recipients.iter().map(|(_, d)| d.as_str()).collect();
            return Err(PrivacyError::bad(
                "report.vendor.unknown",
                format!(
                    "no vendor or destination {name:?} is configured or has received anything; vendors: {}; destinations: {}",
                    if vendors.is_empty() {
                        "none".to_owned()
                    } else {
                        vendors.join(", ")
                    },
                    if destinations.is_empty() {
                        "none".to_owned()
                    } else {
                        destinations.join(", ")
                    },
                ),
            ));
        };
        let vendor = name;
        let rows = self
            .store
            .with_reader(|c| ledger::delivered(c, filter, from_ms, to_ms))?;
        let mut per: BTreeMap<&str, Agg> = BTreeMap::new();
        let mut all = Agg::default();
        for r in &rows {
            let subject = if r.subject.is_empty() {
                "(none)"
            } else {
                &r.subject
            };
            per.entry(subject).or_default().add(r);
            all.add(r);
        }
        let affected: Vec<Value> = per
            .iter()
            .map(|(s, a)| {
                let mut v = a.to_json();
                v["subject"] = json!(s);
                v
            })
            .collect();
        let csv = affected
            .iter()
            .map(|v| {
                vec![
                    v["subject"].as_str().unwrap_or("").to_owned(),
                    v["handoffs"].to_string(),
                    v["first"].as_str().unwrap_or("").to_owned(),
                    v["last"].as_str().unwrap_or("").to_owned(),
                    join(&v["categories"]),
                    join(&v["fields"]),
                ]
            })
            .collect();
        let mut summary = all.to_json();
        summary["subjects"] = json!(per.len());
        Ok(Report {
            json: json!({
                "vendor": vendor,
                "from": rfc3339(from_ms),
                "to": rfc3339(to_ms),
                "summary": summary,
                "affected": affected,
            }),
            header: vec![
                "subject",
                "handoffs",
                "first",
                "last",
                "categories",
                "fields",
            ],
            rows: csv,
        })
    }

    /// Records of processing: per vendor, purpose and day, the handoffs, subjects and
    /// categories in `[from, to)`.
    pub fn processing(&self, from_ms: i64, to_ms: i64) -> Result<Report, PrivacyError> {
        let rows = self
            .store
            .with_reader(|c| ledger::delivered(c, ledger::Recipient::All, from_ms, to_ms))?;
        // (vendor, purpose, day) → (handoffs, subjects, categories)
        type Day = (u64, BTreeSet<String>, BTreeSet<String>);
        let mut per: BTreeMap<(String, String, String), Day> = BTreeMap::new();
        for r in &rows {
            let day = rfc3339(r.at_ms).get(..10).unwrap_or("").to_owned();
            for purpose in r.purposes.split(',').filter(|p| !p.is_empty()) {
                let e = per
                    .entry((r.vendor.clone(), purpose.to_owned(), day.clone()))
                    .or_default();
                e.0 += 1;
                if !r.subject.is_empty() {
                    e.1.insert(r.subject.clone());
                }
                e.2.extend(split(&r.categories));
            }
        }
        let mut out = Vec::new();
        let mut csv = Vec::new();
        for ((vendor, purpose, day), (n, subjects, cats)) in per {
            let cats: Vec<String> = cats.into_iter().collect();
            csv.push(vec![
                vendor.clone(),
                purpose.clone(),
                day.clone(),
                n.to_string(),
                subjects.len().to_string(),
                cats.join(";"),
            ]);
            out.push(
                json!({"vendor": vendor, "purpose": purpose, "day": day, "handoffs": n,
                "subjects": subjects.len(), "categories": cats}),
            );
        }
        Ok(Report {
            json: json!({"from": rfc3339(from_ms), "to": rfc3339(to_ms), "rows": out}),
            header: vec![
                "vendor",
                "purpose",
                "day",
                "handoffs",
                "subjects",
                "categories",
            ],
            rows: csv,
        })
    }
}

pub enum SubjectQuery {
    Id(String),
    Identity(Identity),
}

/// A report in both forms.
pub struct Report {
    pub json: Value,
    pub header: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Report {
    pub fn to_csv(&self) -> String {
        let mut w = csv::Writer::from_writer(Vec::new());
        let _ = w.write_record(&self.header);
        for r in &self.rows {
            let _ = w.write_record(r);
        }
        String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
    }
}

fn split(list: &str) -> impl Iterator<Item = String> + '_ {
    list.split(',').filter(|s| !s.is_empty()).map(str::to_owned)
}

fn join(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(";")
        })
        .unwrap_or_default()
}

pub fn rfc3339(ms: i64) -> String {
    // Empty for an instant past the representable years (an open-ended `to`).
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map(format_millis)
        .unwrap_or_default()
}

/// Parses `2026-11-01` (midnight UTC) or a time as clients send them (RFC 3339 / ISO 8601), as
/// Unix milliseconds.
pub fn parse_time(s: &str) -> Result<i64, PrivacyError> {
    if let Some(t) = parse_client(s) {
        return Ok(unix_millis(t));
    }
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(s, &fmt)
        .map(|d| d.midnight().assume_utc().unix_timestamp() * 1000)
        .map_err(|_| {
            PrivacyError::bad(
                "report.time.invalid",
                format!("{s:?} is not a date (2026-11-01) or an RFC 3339 time"),
            )
        })
}

#[derive(Default)]
struct Agg {
    handoffs: u64,
    first: Option<i64>,
    last: Option<i64>,
    destinations: BTreeSet<String>,
    purposes: BTreeSet<String>,
    legal_bases: BTreeSet<String>,
    categories: BTreeSet<String>,
    fields: BTreeSet<String>,
}

impl Agg {
    fn add(&mut self, r: &Row) {
        self.handoffs += 1;
        self.first = Some(self.first.map_or(r.at_ms, |f| f.min(r.at_ms)));
        self.last = Some(self.last.map_or(r.at_ms, |l| l.max(r.at_ms)));
        self.destinations.insert(r.destination.clone());
        self.purposes.extend(split(&r.purposes));
        if !r.legal_basis.is_empty() {
            self.legal_bases.insert(r.legal_basis.clone());
        }
        self.categories.extend(split(&r.categories));
        self.fields.extend(split(&r.fields));
    }

    fn to_json(&self) -> Value {
        json!({
            "handoffs": self.handoffs,
            "first": self.first.map(rfc3339),
            "last": self.last.map(rfc3339),
            "destinations": self.destinations,
            "purposes": self.purposes,
            "legal_bases": self.legal_bases,
            "categories": self.categories,
            "fields": self.fields,
        })
    }
}

/// Delivered handoffs per vendor, from a subject's ledger entries.
fn per_vendor(rows: &[Row]) -> Vec<Value> {
    let mut per: BTreeMap<&str, Agg> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| r.kind == ledger::kind::DELIVERY && r.outcome == "delivered")
    {
        per.entry(&r.vendor).or_default().add(r);
    }
    per.into_iter()
        .map(|(vendor, a)| {
            let mut v = a.to_json();
            v["vendor"] = json!(vendor);
            v
        })
        .collect()
}

/// Walks the ledger: the chain, the checkpoints (against `public_key`), and every
/// destination's cursor.
pub fn verify(
    store: &OutboxStore,
    public_key: &ed25519_dalek::VerifyingKey,
) -> Result<ledger::Verification, StoreError> {
    store.verify_ledger(public_key)
}
