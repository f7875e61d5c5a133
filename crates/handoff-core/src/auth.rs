//! Scopes and roles: what a token may do. Pure, so the policy is easy to read and test.

use std::collections::BTreeSet;
use std::fmt;

/// One permission. Every API except write-key ingest requires a bearer token carrying the
/// route's scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Send events (ingest with a token instead of a write key).
    EventsWrite,
    /// Read configuration and clients.
    AdminRead,
    /// Change configuration, clients and keys.
    AdminWrite,
    /// File and run data-subject requests.
    DsrWrite,
    /// Read the audit log.
    AuditRead,
    /// Reveal tokenised or vaulted values.
    VaultReveal,
    /// Scrape `/metrics`.
    MetricsRead,
}

impl Scope {
    pub const ALL: [Scope; 7] = [
        Scope::EventsWrite,
        Scope::AdminRead,
        Scope::AdminWrite,
        Scope::DsrWrite,
        Scope::AuditRead,
        Scope::VaultReveal,
        Scope::MetricsRead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::EventsWrite => "events:write",
            Scope::AdminRead => "admin:read",
            Scope::AdminWrite => "admin:write",
            Scope::DsrWrite => "dsr:write",
            Scope::AuditRead => "audit:read",
            Scope::VaultReveal => "vault:reveal",
            Scope::MetricsRead => "metrics:read",
        }
    }

    pub fn parse(raw: &str) -> Option<Scope> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

/// A set of scopes, written as OAuth does: space-separated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scopes(BTreeSet<Scope>);

/// A scope string naming something that is not a scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown scope {0:?}; known scopes: events:write admin:read admin:write dsr:write audit:read vault:reveal metrics:read"
)]
pub struct UnknownScope(pub String);

impl Scopes {
    /// Parses `"admin:read audit:read"`; empty items (extra spaces) are ignored.
    pub fn parse(raw: &str) -> Result<Self, UnknownScope> {
        raw.split_ascii_whitespace()
            .map(|s| Scope::parse(s).ok_or_else(|| UnknownScope(s.to_owned())))
            .collect::<Result<_, _>>()
            .map(Scopes)
    }

    pub fn contains(&self, scope: Scope) -> bool {
        self.0.contains(&scope)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = Scope> + '_ {
        self.0.iter().copied()
    }

    /// The scopes to grant for a token request: what was asked for, if the client is allowed all
    /// of it; everything the client is allowed when it asked for nothing (RFC 6749 §3.3). Never
    /// more than `allowed`: asking for more is an error, not a silent narrowing.
    pub fn grant(requested: Option<&Scopes>, allowed: &Scopes) -> Result<Scopes, Scopes> {
        match requested {
            None => Ok(allowed.clone()),
            Some(req) if req.is_empty() => Ok(allowed.clone()),
            Some(req) => {
                let excess: BTreeSet<Scope> = req.0.difference(&allowed.0).copied().collect();
                if excess.is_empty() {
                    Ok(req.clone())
                } else {
                    Err(Scopes(excess))
                }
            }
        }
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        Scopes(iter.into_iter().collect())
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(s.as_str())?;
        }
        Ok(())
    }
}

/// Named bundles of scopes for people and machines with one job each. Least privilege: no role
/// but `vault` can reveal vaulted values, and `admin` cannot send events or file DSRs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A backend that sends events: `events:write`.
    Ingest,
    /// Looks, changes nothing: `admin:read`.
    Viewer,
    /// Runs the gateway: `admin:read admin:write audit:read`.
    Admin,
    /// Reviews who did what: `admin:read audit:read`.
    Auditor,
    /// Handles data-subject requests: `dsr:write audit:read`.
    Privacy,
    /// Reveals vaulted values (payment flows): `vault:reveal`.
    Vault,
    /// Scrapes metrics (Prometheus): `metrics:read`.
    Monitor,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Ingest,
        Role::Viewer,
        Role::Admin,
        Role::Auditor,
        Role::Privacy,
        Role::Vault,
        Role::Monitor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Viewer => "viewer",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
            Role::Privacy => "privacy",
            Role::Vault => "vault",
            Role::Monitor => "monitor",
        }
    }

    pub fn parse(raw: &str) -> Option<Role> {
        Self::ALL.into_iter().find(|r| r.as_str() == raw)
    }

    pub fn scopes(self) -> Scopes {
        use Scope::*;
        let list: &[Scope] = match self {
            Role::Ingest => &[EventsWrite],
            Role::Viewer => &[AdminRead],
            Role::Admin => &[AdminRead, AdminWrite, AuditRead],
            Role::Auditor => &[AdminRead, AuditRead],
            Role::Privacy => &[DsrWrite, AuditRead],
            Role::Vault => &[VaultReveal],
            Role::Monitor => &[MetricsRead],
        };
        list.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        let s = Scopes::parse("audit:read  admin:read").unwrap();
        assert_eq!(s.to_string(), "admin:read audit:read");
        assert_eq!(
            Scopes::parse("admin:*").unwrap_err(),
            UnknownScope("admin:*".into())
        );
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
        }
    }

    #[test]
    fn grants_never_widen() {
        let allowed = Scopes::parse("admin:read audit:read").unwrap();
        assert_eq!(Scopes::grant(None, &allowed).unwrap(), allowed);
        let narrower = Scopes::parse("audit:read").unwrap();
        assert_eq!(Scopes::grant(Some(&narrower), &allowed).unwrap(), narrower);
        let wider = Scopes::parse("audit:read admin:write vault:reveal").unwrap();
        assert_eq!(
            Scopes::grant(Some(&wider), &allowed)
                .unwrap_err()
                .to_string(),
            "admin:write vault:reveal"
        );
    }

    #[test]
    fn only_the_vault_role_reveals() {
        for role in Role::ALL {
            assert_eq!(
                role.scopes().contains(Scope::VaultReveal),
                role == Role::Vault,
                "{role:?}"
            );
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
    }
}
