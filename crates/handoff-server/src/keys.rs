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

    /// The master key from `HANDOFF_MASTER_KEY`, else from `file`, else from `data_dir/master.key`
    /// (created with mode 0600 when missing).
    pub fn load(
        env: Option<String>,
        file: Option<&Path>,
        data_dir: &Path,
    ) -> Result<(Self, KeySource), KeyError> {
        if let Some(text) = env {
            return Ok((Self::from_base64(&text)?, KeySource::Env));
        }
        let (path, may_create) = match file {
            Some(p) => (p.to_owned(), false),
            None => (data_dir.join(DEFAULT_KEY_FILE), true),
        };
        let file_error = |error| KeyError::File {
            path: path.display().to_string(),
            error,
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok((Self::from_base64(&text)?, KeySource::File(path))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && may_create => {
                let key = Self::generate();
                std::fs::create_dir_all(data_dir).map_err(file_error)?;
                let mut f = {
                    use std::os::unix::fs::OpenOptionsExt;
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                        .map_err(file_error)?
                };
                writeln!(f, "{}", key.to_base64()).map_err(file_error)?;
                f.sync_all().map_err(file_error)?;
                Ok((key, KeySource::Created(path)))
            }
            Err(e) => Err(file_error(e)),
        }
    }

    fn cipher(key: &[u8; 32]) -> Aes256Gcm {
        Aes256Gcm::new_from_slice(key).expect("a 32-byte key is valid for AES-256")
    }

    fn encrypt(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let nonce = aes_gcm::aead::Nonce::<Aes256Gcm>::from(nonce_bytes);
        let mut out = nonce_bytes.to_vec();
        out.extend(
            Self::cipher(key)
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

    fn decrypt(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce = aes_gcm::aead::Nonce::<Aes256Gcm>::try_from(nonce).ok()?;
        Self::cipher(key)
            .decrypt(&nonce, Payload { msg: ct, aad })
            .ok()
    }

    /// Encrypts `plaintext` as the secret `name` under a fresh data key.
    pub fn seal(&self, name: &str, plaintext: &[u8]) -> SealedSecret {
        let data_key: [u8; 32] = rand::random();
        SealedSecret {
            name: name.to_owned(),
            master_key_id: self.id.clone(),
            wrapped_key: Self::encrypt(&self.key, &data_key, format!("data-key:{name}").as_bytes()),
            ciphertext: Self::encrypt(&data_key, plaintext, name.as_bytes()),
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
        let data_key = Self::decrypt(
            &self.key,
            &sealed.wrapped_key,
            format!("data-key:{}", sealed.name).as_bytes(),
        )
        .ok_or_else(tampered)?;
        let data_key: [u8; 32] = data_key.try_into().map_err(|_| tampered())?;
        Self::decrypt(&data_key, &sealed.ciphertext, sealed.name.as_bytes()).ok_or_else(tampered)
    }
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
        let (created, source) = MasterKey::load(None, None, dir.path()).unwrap();
        assert!(matches!(source, KeySource::Created(_)));
        let mode = std::fs::metadata(dir.path().join(DEFAULT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, source) = MasterKey::load(None, None, dir.path()).unwrap();
        assert!(matches!(source, KeySource::File(_)));
        assert_eq!(again.id(), created.id());
        let env = MasterKey::generate();
        let (from_env, source) = MasterKey::load(Some(env.to_base64()), None, dir.path()).unwrap();
        assert_eq!((from_env.id(), source), (env.id(), KeySource::Env));
        assert_eq!(
            MasterKey::load(Some("c2hvcnQ=".into()), None, dir.path())
                .unwrap_err()
                .code(),
            "keys.master.malformed"
        );
        let missing = dir.path().join("nope.key");
        assert_eq!(
            MasterKey::load(None, Some(&missing), dir.path())
                .unwrap_err()
                .code(),
            "keys.master.file"
        );
        assert!(
            !format!("{env:?}").contains(&env.to_base64()),
            "Debug never prints the key"
        );
    }
}
