//! Control-plane state: OAuth clients, sealed secrets, signing keys, token revocations and the
//! audit log, in `state.db` beside the journal (so admin writes never contend with ingest).
//! Secrets arrive sealed (encrypted by the server's key module); this store never sees plaintext.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use crate::StoreError;

/// File name of the control-plane state inside the data directory.
pub const STATE_FILE: &str = "state.db";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS clients (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    secret_hash   TEXT NOT NULL,
    scopes        TEXT NOT NULL,
    source        TEXT,
    created_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
);
CREATE TABLE IF NOT EXISTS secrets (
    name          TEXT PRIMARY KEY,
    master_key_id TEXT NOT NULL,
    wrapped_key   BLOB NOT NULL,
    ciphertext    BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS signing_keys (
    kid           TEXT PRIMARY KEY,
    public_key    BLOB NOT NULL,
    secret_name   TEXT NOT NULL REFERENCES secrets (name),
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti           TEXT PRIMARY KEY,
    expires_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id     INTEGER PRIMARY KEY,
    at_ms  INTEGER NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRecord {
    pub id: String,
    pub name: String,
    /// argon2id PHC string; never the secret itself.
    pub secret_hash: String,
    /// Space-separated scopes the client may be granted.
    pub scopes: String,
    /// The source its `events:write` tokens send events as.
    pub source: Option<String>,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

/// A secret encrypted under a data key, which is itself wrapped by a master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSecret {
    pub name: String,
    pub master_key_id: String,
    pub wrapped_key: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyRecord {
    pub kid: String,
    pub public_key: Vec<u8>,
    pub secret_name: String,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: i64,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    /// JSON object with the details.
    pub detail: String,
}

pub struct StateStore {
    conn: Mutex<Connection>,
}

impl StateStore {
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        crate::files::create_dir(data_dir)?;
        crate::files::create_file(&data_dir.join(STATE_FILE))?;
        let conn = Connection::open(data_dir.join(STATE_FILE))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes whenever another connection (another process, such as the CLI) commits: a cheap
    /// way to know when cached state must be read again.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    pub fn insert_client(&self, c: &ClientRecord) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO clients (id, name, secret_hash, scopes, source, created_at_ms, revoked_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![c.id, c.name, c.secret_hash, c.scopes, c.source, c.created_at_ms, c.revoked_at_ms],
        )?;
        Ok(())
    }

    pub fn client(&self, id: &str) -> Result<Option<ClientRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, name, secret_hash, scopes, source, created_at_ms, revoked_at_ms FROM clients WHERE id = ?1",
                [id],
                client_row,
            )
            .optional()?)
    }

    pub fn clients(&self) -> Result<Vec<ClientRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, name, secret_hash, scopes, source, created_at_ms, revoked_at_ms FROM clients ORDER BY created_at_ms, id",
        )?;
        let rows = stmt.query_map([], client_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Marks a client revoked; `false` if there is no such client or it was revoked already.
    pub fn revoke_client(&self, id: &str, at_ms: i64) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "UPDATE clients SET revoked_at_ms = ?2 WHERE id = ?1 AND revoked_at_ms IS NULL",
            params![id, at_ms],
        )? == 1)
    }

    pub fn put_secret(&self, s: &SealedSecret, at_ms: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO secrets (name, master_key_id, wrapped_key, ciphertext, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (name) DO UPDATE SET master_key_id = excluded.master_key_id,
               wrapped_key = excluded.wrapped_key, ciphertext = excluded.ciphertext",
            params![s.name, s.master_key_id, s.wrapped_key, s.ciphertext, at_ms],
        )?;
        Ok(())
    }

    /// Stores `s` unless a secret of that name exists (two processes creating one at once
    /// agree on the first). Returns whether it was stored.
    pub fn put_secret_if_absent(&self, s: &SealedSecret, at_ms: i64) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "INSERT OR IGNORE INTO secrets (name, master_key_id, wrapped_key, ciphertext, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![s.name, s.master_key_id, s.wrapped_key, s.ciphertext, at_ms],
        )? == 1)
    }

    pub fn secret(&self, name: &str) -> Result<Option<SealedSecret>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT name, master_key_id, wrapped_key, ciphertext FROM secrets WHERE name = ?1",
                [name],
                |r| {
                    Ok(SealedSecret {
                        name: r.get(0)?,
                        master_key_id: r.get(1)?,
                        wrapped_key: r.get(2)?,
                        ciphertext: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    /// Every sealed secret.
    pub fn secrets(&self) -> Result<Vec<SealedSecret>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, master_key_id, wrapped_key, ciphertext FROM secrets ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(SealedSecret {
                name: r.get(0)?,
                master_key_id: r.get(1)?,
                wrapped_key: r.get(2)?,
                ciphertext: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Replaces wrapped data keys in one transaction; each update applies only if the secret is
    /// still wrapped by the key it was read with (given first). Returns how many applied.
    pub fn replace_wrapped_keys(
        &self,
        updates: &[(String, SealedSecret)],
    ) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut applied = 0;
        for (was, s) in updates {
            applied += tx.execute(
                "UPDATE secrets SET master_key_id = ?1, wrapped_key = ?2 WHERE name = ?3 AND master_key_id = ?4",
                params![s.master_key_id, s.wrapped_key, s.name, was],
            )?;
        }
        tx.commit()?;
        Ok(applied)
    }

    /// Stores a signing key (its private half sealed in `secret`) as the newest.
    pub fn insert_signing_key(
        &self,
        key: &SigningKeyRecord,
        secret: &SealedSecret,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO secrets (name, master_key_id, wrapped_key, ciphertext, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![secret.name, secret.master_key_id, secret.wrapped_key, secret.ciphertext, key.created_at_ms],
        )?;
        tx.execute(
            "INSERT INTO signing_keys (kid, public_key, secret_name, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
            params![key.kid, key.public_key, key.secret_name, key.created_at_ms],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Signing keys, newest first. The newest signs; all of them verify.
    pub fn signing_keys(&self) -> Result<Vec<SigningKeyRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT kid, public_key, secret_name, created_at_ms FROM signing_keys ORDER BY created_at_ms DESC, rowid DESC",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(SigningKeyRecord {
                kid: r.get(0)?,
                public_key: r.get(1)?,
                secret_name: r.get(2)?,
                created_at_ms: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes signing keys retired before `cutoff_ms` (all but the newest), with their secrets.
    pub fn prune_signing_keys(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let newest: Option<String> = tx
            .query_row(
                "SELECT kid FROM signing_keys ORDER BY created_at_ms DESC, rowid DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let Some(newest) = newest else { return Ok(0) };
        // A key stops signing when the next one is created; tokens it signed live at most until
        // that moment plus their lifetime, which `cutoff_ms` accounts for.
        let doomed: Vec<(String, String)> = {
            let mut stmt = tx.prepare(
                "SELECT k.kid, k.secret_name FROM signing_keys k WHERE k.kid != ?1 AND
                   (SELECT min(n.created_at_ms) FROM signing_keys n WHERE n.created_at_ms > k.created_at_ms) < ?2",
            )?;
            let rows =
                stmt.query_map(params![newest, cutoff_ms], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        for (kid, secret) in &doomed {
            tx.execute("DELETE FROM signing_keys WHERE kid = ?1", [kid])?;
            tx.execute("DELETE FROM secrets WHERE name = ?1", [secret])?;
        }
        tx.commit()?;
        Ok(doomed.len())
    }

    /// Records a revoked token id until it expires (expired ones are refused anyway and are
    /// removed here).
    pub fn revoke_token(&self, jti: &str, expires_at_ms: i64) -> Result<(), StoreError> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM revoked_tokens WHERE expires_at_ms < ?1",
            [now_ms],
        )?;
        tx.execute(
            "INSERT OR IGNORE INTO revoked_tokens (jti, expires_at_ms) VALUES (?1, ?2)",
            params![jti, expires_at_ms],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Revoked token ids (with their expiry, ms) that have not expired yet. Read-only.
    pub fn revoked_tokens(&self, now_ms: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT jti, expires_at_ms FROM revoked_tokens WHERE expires_at_ms >= ?1")?;
        let rows = stmt.query_map([now_ms], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn audit(
        &self,
        at_ms: i64,
        actor: &str,
        action: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO audit (at_ms, actor, action, detail) VALUES (?1, ?2, ?3, ?4)",
            params![at_ms, actor, action, detail],
        )?;
        Ok(())
    }

    pub fn audit_log(&self, after_id: i64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, at_ms, actor, action, detail FROM audit WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after_id, limit as i64], |r| {
            Ok(AuditEntry {
                id: r.get(0)?,
                at_ms: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                detail: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn client_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ClientRecord> {
    Ok(ClientRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        secret_hash: r.get(2)?,
        scopes: r.get(3)?,
        source: r.get(4)?,
        created_at_ms: r.get(5)?,
        revoked_at_ms: r.get(6)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_keys_revocations_and_audit() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        let c = ClientRecord {
            id: "c1".into(),
            name: "ci".into(),
            secret_hash: "$argon2id$...".into(),
            scopes: "events:write".into(),
            source: Some("web".into()),
            created_at_ms: 1,
            revoked_at_ms: None,
        };
        s.insert_client(&c).unwrap();
        assert_eq!(s.client("c1").unwrap(), Some(c.clone()));
        assert!(s.revoke_client("c1", 5).unwrap());
        assert!(
            !s.revoke_client("c1", 6).unwrap(),
            "revoking twice changes nothing"
        );
        assert_eq!(s.clients().unwrap()[0].revoked_at_ms, Some(5));

        let sealed = |name: &str| SealedSecret {
            name: name.into(),
            master_key_id: "m1".into(),
            wrapped_key: vec![1],
            ciphertext: vec![2],
        };
        for (kid, at) in [("k1", 100), ("k2", 200), ("k3", 300)] {
            let key = SigningKeyRecord {
                kid: kid.into(),
                public_key: vec![0; 32],
                secret_name: format!("signing/{kid}"),
                created_at_ms: at,
            };
            s.insert_signing_key(&key, &sealed(&key.secret_name))
                .unwrap();
        }
        assert_eq!(s.signing_keys().unwrap()[0].kid, "k3");
        // k1 was replaced at 200, k2 at 300: with a cutoff of 250 only k1 goes.
        assert_eq!(s.prune_signing_keys(250).unwrap(), 1);
        let kids: Vec<String> = s
            .signing_keys()
            .unwrap()
            .into_iter()
            .map(|k| k.kid)
            .collect();
        assert_eq!(kids, ["k3", "k2"]);
        assert!(s.secret("signing/k1").unwrap().is_none());

        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        s.revoke_token("t1", now + 60_000).unwrap();
        s.revoke_token("t0", now - 10).unwrap();
        // The expired one is never listed, and is swept by the next revocation.
        assert_eq!(
            s.revoked_tokens(now).unwrap(),
            [("t1".to_string(), now + 60_000)]
        );

        s.audit(7, "client:c1", "client.created", "{}").unwrap();
        assert_eq!(s.audit_log(0, 10).unwrap()[0].action, "client.created");
    }
}
