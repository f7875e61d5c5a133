//! Secrets at rest: envelope encryption under a master key.
//!
//! Each secret gets its own random data key; the secret is encrypted with AES-256-GCM under that
//! data key, and the data key is encrypted ("wrapped") under the master key. The master key comes
//! from `HANDOFF_MASTER_KEY` (base64 of 32 bytes) or a key file, never from the config file.
//! Both encryptions bind the secret's name as associated data, so a sealed value cannot be
//! swapped for another secret's.

use std::io::Write;
use std::path::{Path, PathBuf};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use base64::Engine;
use sha2::{Digest, Sha256};

use handoff_store::state::SealedSecret;

/// Environment variable holding the master key (base64 of 32 random bytes).
pub const MASTER_KEY_ENV: &str = "HANDOFF_MASTER_KEY";
/// Key file created beside the data when no master key is configured (embedded default only).
pub const DEFAULT_KEY_FILE: &str = "master.key";
const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the master key must be base64 of exactly 32 bytes ({0})")]
    Malformed(String),
    #[error("cannot read or create the master key file {path}: {error}")]
    File { path: String, error: std::io::Error },
    #[error(
        "secret {name:?} was sealed under master key {found}, but the configured master key is {configured}"
    )]
    WrongMasterKey {
        name: String,
        found: String,
        configured: String,
    },
    #[error("secret {0:?} does not decrypt: it was tampered with or damaged")]
    Tampered(String),
}

impl KeyError {
    pub fn code(&self) -> &'static str {
        match self {
            KeyError::Malformed(_) => "keys.master.malformed",
            KeyError::File { .. } => "keys.master.file",
            KeyError::WrongMasterKey { .. } => "keys.master.wrong",
            KeyError::Tampered(_) => "keys.secret.tampered",
        }
    }
}

/// Where the master key came from, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Env,
    File(PathBuf),
    /// Created just now, beside the data: fine to try Handoff, not for production.
    Created(PathBuf),
}

#[derive(Clone)]
pub struct MasterKey {
    key: [u8; 32],
    /// A short public fingerprint (first 8 bytes of SHA-256, hex), recorded with each sealed
    /// secret so a wrong key is reported as such.
    id: String,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl MasterKey {
    pub fn from_bytes(key: [u8; 32]) -> Self {
        let digest = Sha256::digest(key);
        let id = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Self { key, id }
    }

    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| KeyError::Malformed(e.to_string()))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| KeyError::Malformed(format!("{} bytes", b.len())))?;
        Ok(Self::from_bytes(key))
    }

    pub fn generate() -> Self {
        Self::from_bytes(rand::random())
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.key)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn seal(&self, name: &str, plaintext: &[u8]) -> SealedSecret {
        let data_key: [u8; 32] = rand::random();
        SealedSecret {
            name: name.to_owned(),
            master_key_id: self.id.clone(),
            wrapped_key: encrypt(&self.key, &data_key, format!("data-key:{name}").as_bytes()),
            ciphertext: encrypt(&data_key, plaintext, name.as_bytes()),
        }
    }

    /// Decrypts a sealed secret; fails on the wrong master key or any tampering.
    pub fn open(&self, sealed: &SealedSecret) -> Result<Vec<u8>, KeyError> {
        if sealed.master_key_id != self.id {
            return Err(KeyError::WrongMasterKey {
                name: sealed.name.clone(),
                found: sealed.master_key_id.clone(),
                configured: self.id.clone(),
            });
        }
        let tampered = || KeyError::Tampered(sealed.name.clone());
        let data_key = decrypt(
            &self.key,
            &sealed.wrapped_key,
            format!("data-key:{}", sealed.name).as_bytes(),
        )
        .ok_or_else(tampered)?;
        let data_key: [u8; 32] = data_key.try_into().map_err(|_| tampered())?;
        decrypt(&data_key, &sealed.ciphertext, sealed.name.as_bytes()).ok_or_else(tampered)
    }
}

impl MasterKey {
    /// The same secret with its data key wrapped under `to` instead of `self` (the ciphertext
    /// itself is untouched).
    pub fn rewrap(&self, to: &MasterKey, sealed: &SealedSecret) -> Result<SealedSecret, KeyError> {
        if sealed.master_key_id != self.id {
            return Err(KeyError::WrongMasterKey {
                name: sealed.name.clone(),
                found: sealed.master_key_id.clone(),
                configured: self.id.clone(),
            });
        }
        let aad = format!("data-key:{}", sealed.name);
        let data_key = decrypt(&self.key, &sealed.wrapped_key, aad.as_bytes())
            .ok_or_else(|| KeyError::Tampered(sealed.name.clone()))?;
        Ok(SealedSecret {
            master_key_id: to.id.clone(),
            wrapped_key: encrypt(&to.key, &data_key, aad.as_bytes()),
            ..sealed.clone()
        })
    }
}

/// Reads master keys from text: base64 keys separated by newlines or commas, newest first.
fn parse_ring(text: &str) -> Result<Vec<MasterKey>, KeyError> {
    let keys = text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(MasterKey::from_base64)
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err(KeyError::Malformed("no key".into()));
    }
    Ok(keys)
}

/// Writes `keys` (newest first) to `path` atomically with mode 0600.
pub fn write_key_file(path: &Path, keys: &[&MasterKey]) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file_error = |error| KeyError::File {
        path: path.display().to_string(),
        error,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(file_error)?;
    for key in keys {
        writeln!(f, "{}", key.to_base64()).map_err(file_error)?;
    }
    f.sync_all().map_err(file_error)?;
    std::fs::rename(&tmp, path).map_err(file_error)?;
    // The rename itself must survive a power cut, or the file could come back holding a key the
    // database no longer uses.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(file_error)?;
    }
    Ok(())
}

/// The master keys in use: the first seals, any of them opens what it sealed. When the keys come
/// from a file, the file is read again before sealing and when a secret names a key not in the
/// ring, so a running gateway follows `handoff keys rotate-master` without a restart.
pub struct KeyRing {
    file: Option<PathBuf>,
    keys: std::sync::RwLock<Vec<MasterKey>>,
}

impl std::fmt::Debug for KeyRing {
    // Fingerprints only: key material never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = self.all().iter().map(|k| k.id().to_owned()).collect();
        f.debug_struct("KeyRing")
            .field("file", &self.file)
            .field("keys", &ids)
            .finish()
    }
}

impl KeyRing {
    pub fn from_keys(keys: Vec<MasterKey>) -> Self {
        Self {
            file: None,
            keys: std::sync::RwLock::new(keys),
        }
    }

    /// The keys from `HANDOFF_MASTER_KEY` (comma-separated, newest first), else from `file`,
    /// else from `data_dir/master.key` (created with mode 0600 when missing).
    pub fn load(
        env: Option<String>,
        file: Option<&Path>,
        data_dir: &Path,
    ) -> Result<(Self, KeySource), KeyError> {
        if let Some(text) = env {
            return Ok((Self::from_keys(parse_ring(&text)?), KeySource::Env));
        }
        let (path, may_create) = match file {
            Some(p) => (p.to_owned(), false),
            None => (data_dir.join(DEFAULT_KEY_FILE), true),
        };
        let file_error = |error| KeyError::File {
            path: path.display().to_string(),
            error,
        };
        let (keys, source) = match std::fs::read_to_string(&path) {
            Ok(text) => (parse_ring(&text)?, KeySource::File(path.clone())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && may_create => {
                let key = MasterKey::generate();
                handoff_store::files::create_dir(data_dir).map_err(file_error)?;
                write_key_file(&path, &[&key])?;
                (vec![key], KeySource::Created(path.clone()))
            }
            Err(e) => return Err(file_error(e)),
        };
        Ok((
            Self {
                file: Some(path),
                keys: std::sync::RwLock::new(keys),
            },
            source,
        ))
    }

    /// The file the keys come from (none when they come from the environment).
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    fn refresh(&self) {
        let Some(path) = &self.file else { return };
        match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| parse_ring(&t).map_err(|e| e.to_string()))
        {
            Ok(keys) => *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot re-read the master key file; keeping the keys in memory")
            }
        }
    }

    pub fn current(&self) -> MasterKey {
        self.keys.read().unwrap_or_else(|e| e.into_inner())[0].clone()
    }

    pub fn all(&self) -> Vec<MasterKey> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Seals with the newest key (after re-reading the file).
    pub fn seal(&self, name: &str, plaintext: &[u8]) -> SealedSecret {
        self.refresh();
        self.current().seal(name, plaintext)
    }

    /// Opens with the key that sealed it, re-reading the file once if that key is not known.
    pub fn open(&self, sealed: &SealedSecret) -> Result<Vec<u8>, KeyError> {
        let find = || {
            self.keys
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|k| k.id() == sealed.master_key_id)
                .cloned()
        };
        let key = match find() {
            Some(k) => k,
            None => {
                self.refresh();
                find().ok_or_else(|| KeyError::WrongMasterKey {
                    name: sealed.name.clone(),
                    found: sealed.master_key_id.clone(),
                    configured: self.current().id().to_owned(),
                })?
            }
        };
        key.open(sealed)
    }
}

/// What `handoff keys rotate-master` did.
#[derive(Debug)]
pub struct Rotation {
    pub from: Vec<String>,
    pub to: String,
    pub rewrapped: usize,
}

/// How long `rotate_master` waits before its last check: longer than SQLite's busy timeout (5 s),
/// so a gateway that read the key file just before it changed and was waiting to store a secret
/// sealed under the old key has stored it by then.
pub const ROTATION_GRACE: std::time::Duration = std::time::Duration::from_secs(6);

/// Replaces the master keys in `file` by a new one, re-wrapping every secret's data key under
/// it, while gateways keep running:
/// 1. the file lists the new key before the old ones (gateways re-read it: they open with either
///    and seal with the new one);
/// 2. every secret is re-wrapped in one transaction (each update conditional on the key it was
///    read with);
/// 3. the file keeps the new key alone;
/// 4. after `grace`, anything sealed under an old key meanwhile is re-wrapped too (this process
///    still holds the old keys).
///
/// An exclusive lock on `<file>.lock` keeps two rotations from interleaving.
pub fn rotate_master(
    file: &Path,
    state: &handoff_store::state::StateStore,
    grace: std::time::Duration,
) -> Result<Rotation, crate::oauth::AuthError> {
    let file_error = |error| KeyError::File {
        path: file.display().to_string(),
        error,
    };
    let lock_path = file.with_extension("lock");
    handoff_store::files::create_file(&lock_path).map_err(file_error)?;
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(&lock_path)
        .map_err(file_error)?;
    lock.lock().map_err(file_error)?;
    let text = std::fs::read_to_string(file).map_err(file_error)?;
    let old = parse_ring(&text)?;
    let new = MasterKey::generate();
    let mut both: Vec<&MasterKey> = vec![&new];
    both.extend(old.iter());
    write_key_file(file, &both)?;
    let rewrap_all = || -> Result<usize, crate::oauth::AuthError> {
        let mut updates = Vec::new();
        for sealed in state.secrets()? {
            if sealed.master_key_id == new.id() {
                continue;
            }
            let key = old
                .iter()
                .find(|k| k.id() == sealed.master_key_id)
                .ok_or_else(|| KeyError::WrongMasterKey {
                    name: sealed.name.clone(),
                    found: sealed.master_key_id.clone(),
                    configured: old[0].id().to_owned(),
                })?;
            updates.push((sealed.master_key_id.clone(), key.rewrap(&new, &sealed)?));
        }
        Ok(state.replace_wrapped_keys(&updates)?)
    };
    let mut rewrapped = rewrap_all()?;
    write_key_file(file, &[&new])?;
    std::thread::sleep(grace);
    rewrapped += rewrap_all()?;
    drop(lock);
    Ok(Rotation {
        from: old.iter().map(|k| k.id().to_owned()).collect(),
        to: new.id().to_owned(),
        rewrapped,
    })
}

fn cipher(key: &[u8; 32]) -> Aes256Gcm {
    Aes256Gcm::new_from_slice(key).expect("a 32-byte key is valid for AES-256")
}

/// AES-256-GCM with a random nonce (prepended), authenticating `aad` too.
pub(crate) fn encrypt(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let nonce_bytes: [u8; NONCE_LEN] = rand::random();
    let nonce = aes_gcm::aead::Nonce::<Aes256Gcm>::from(nonce_bytes);
    let mut out = nonce_bytes.to_vec();
    out.extend(
        cipher(key)
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail"),
    );
    out
}

/// The plaintext of [`encrypt`]'s output, if it opens with `key` and `aad`.
pub(crate) fn decrypt(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_LEN {
        return None;
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let nonce = aes_gcm::aead::Nonce::<Aes256Gcm>::try_from(nonce).ok()?;
    cipher(key).decrypt(&nonce, Payload { msg: ct, aad }).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_every_kind_of_tampering() {
        let master = MasterKey::generate();
        let secret = b"vendor-api-key-0123456789";
        let sealed = master.seal("vendor/meta", secret);
        assert_eq!(master.open(&sealed).unwrap(), secret);
        let blob = [sealed.wrapped_key.clone(), sealed.ciphertext.clone()].concat();
        assert!(
            !blob.windows(secret.len()).any(|w| w == secret),
            "no plaintext in what is stored"
        );

        let other = MasterKey::generate();
        assert_eq!(other.open(&sealed).unwrap_err().code(), "keys.master.wrong");
        let forged_id = SealedSecret {
            master_key_id: other.id().to_owned(),
            ..sealed.clone()
        };
        assert_eq!(
            other.open(&forged_id).unwrap_err().code(),
            "keys.secret.tampered"
        );

        let mut flipped = sealed.clone();
        let last = flipped.ciphertext.len() - 1;
        flipped.ciphertext[last] ^= 1;
        assert_eq!(
            master.open(&flipped).unwrap_err().code(),
            "keys.secret.tampered"
        );
        let mut wrapped = sealed.clone();
        wrapped.wrapped_key[20] ^= 1;
        assert_eq!(
            master.open(&wrapped).unwrap_err().code(),
            "keys.secret.tampered"
        );
        let renamed = SealedSecret {
            name: "vendor/google".into(),
            ..sealed.clone()
        };
        assert_eq!(
            master.open(&renamed).unwrap_err().code(),
            "keys.secret.tampered",
            "bound to its name"
        );
        let short = SealedSecret {
            ciphertext: vec![1, 2],
            ..sealed
        };
        assert_eq!(
            master.open(&short).unwrap_err().code(),
            "keys.secret.tampered"
        );
    }

    #[test]
    fn load_prefers_env_then_file_then_creates_one_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (created, source) = KeyRing::load(None, None, dir.path()).unwrap();
        let created = created.current();
        assert!(matches!(source, KeySource::Created(_)));
        let mode = std::fs::metadata(dir.path().join(DEFAULT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, source) = KeyRing::load(None, None, dir.path()).unwrap();
        let again = again.current();
        assert!(matches!(source, KeySource::File(_)));
        assert_eq!(again.id(), created.id());
        let env = MasterKey::generate();
        let (from_env, source) = KeyRing::load(Some(env.to_base64()), None, dir.path()).unwrap();
        let from_env = from_env.current();
        assert_eq!((from_env.id(), source), (env.id(), KeySource::Env));
        assert_eq!(
            KeyRing::load(Some("c2hvcnQ=".into()), None, dir.path())
                .unwrap_err()
                .code(),
            "keys.master.malformed"
        );
        let missing = dir.path().join("nope.key");
        assert_eq!(
            KeyRing::load(None, Some(&missing), dir.path())
                .unwrap_err()
                .code(),
            "keys.master.file"
        );
        assert!(
            !format!("{env:?}").contains(&env.to_base64()),
            "Debug never prints the key"
        );
    }

    #[test]
    fn rotation_rewraps_everything_and_a_running_ring_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = handoff_store::state::StateStore::open(dir.path()).unwrap();
        let (running, _) = KeyRing::load(None, None, dir.path()).unwrap();
        let old_id = running.current().id().to_owned();
        for name in ["a", "b"] {
            state
                .put_secret(&running.seal(name, name.as_bytes()), 0)
                .unwrap();
        }
        let file = dir.path().join(DEFAULT_KEY_FILE);
        let r = rotate_master(&file, &state, std::time::Duration::ZERO).unwrap();
        assert_eq!((r.from, r.rewrapped), (vec![old_id], 2));
        for s in state.secrets().unwrap() {
            assert_eq!(s.master_key_id, r.to);
        }
        // The file now holds the new key alone, still 0600.
        let (fresh, _) = KeyRing::load(None, None, dir.path()).unwrap();
        assert_eq!(fresh.all().len(), 1);
        assert_eq!(fresh.current().id(), r.to);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // The ring loaded before the rotation follows it: opens re-wrapped secrets, seals anew.
        assert_eq!(
            running.open(&state.secret("a").unwrap().unwrap()).unwrap(),
            b"a"
        );
        assert_eq!(running.seal("c", b"c").master_key_id, r.to);
        // The new key, given through the environment, opens them too.
        let (env_ring, _) =
            KeyRing::load(Some(fresh.current().to_base64()), None, dir.path()).unwrap();
        assert_eq!(
            env_ring.open(&state.secret("b").unwrap().unwrap()).unwrap(),
            b"b"
        );
        assert!(!format!("{env_ring:?}").contains(&fresh.current().to_base64()));
    }

    #[test]
    fn a_ring_of_several_keys_opens_with_any_and_seals_with_the_first() {
        let (new, old) = (MasterKey::generate(), MasterKey::generate());
        let sealed_old = old.seal("x", b"1");
        let ring = KeyRing::from_keys(
            parse_ring(&format!("{}, {}", new.to_base64(), old.to_base64())).unwrap(),
        );
        assert_eq!(ring.open(&sealed_old).unwrap(), b"1");
        assert_eq!(ring.seal("y", b"2").master_key_id, new.id());
        assert_eq!(
            parse_ring(" \n").unwrap_err().code(),
            "keys.master.malformed"
        );
        assert_eq!(
            KeyRing::from_keys(vec![new])
                .open(&sealed_old)
                .unwrap_err()
                .code(),
            "keys.master.wrong"
        );
    }
}
