//! Sign-in against LDAP / Active Directory (docs/identity.md): a service bind finds the user
//! by a filter with the typed name escaped (RFC 4515), then a bind as that user checks the
//! password on a connection of its own. Groups come from `memberOf` or a group search
//! (nested AD groups through `LDAP_MATCHING_RULE_IN_CHAIN`), mapped to poort group names.
//! The service connection is kept and reused; every operation has a time limit.

use std::sync::Arc;

use ldap3::{Ldap as Conn, LdapConnAsync, LdapConnSettings, LdapError, Scope, SearchEntry, ldap_escape};
use tokio::sync::Mutex;

use crate::config::auth::{GroupSource, Ldap as Settings};

/// A directory user whose password checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryUser {
    /// The poort user name: the directory's `username_attribute`, lower case.
    pub name: String,
    pub email: Option<String>,
    /// poort group names, after mapping.
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Unknown user, wrong or empty password, or more than one entry for the name.
    #[error("wrong username or password")]
    Wrong,
    #[error("the directory marks the account disabled")]
    Disabled,
    #[error("the account is in none of the groups allowed to sign in")]
    NotAllowed,
    /// The directory did not answer, or answered with an error other than a bad password.
    #[error("the directory is unavailable: {0}")]
    Unavailable(String),
}

/// A directory entry found for a typed name.
#[derive(Debug, Clone)]
pub struct Found {
    dn: String,
    entry: SearchEntry,
    /// The poort name: `username_attribute`, lower case.
    pub name: String,
}

pub struct Directory {
    settings: Settings,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The service-bound connection, reused across sign-ins; replaced when it fails.
    service: Mutex<Option<Conn>>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory").field("url", &self.settings.url).finish_non_exhaustive()
    }
}

/// LDAP result code for a failed bind (wrong password, unknown or disabled AD account).
const INVALID_CREDENTIALS: u32 = 49;

impl Directory {
    pub fn new(settings: Settings) -> anyhow::Result<Directory> {
        let tls = if settings.url.starts_with("ldaps://") || settings.start_tls {
            Some(crate::identity::client_tls(settings.ca_file.as_deref())?)
        } else {
            None
        };
        Ok(Directory { settings, tls, service: Mutex::new(None) })
    }

    async fn connect(&self) -> Result<Conn, LdapError> {
        let mut s =
            LdapConnSettings::new().set_conn_timeout(self.settings.timeout).set_starttls(self.settings.start_tls);
        if let Some(tls) = &self.tls {
            s = s.set_config(tls.clone());
        }
        let (conn, ldap) = LdapConnAsync::with_settings(s, &self.settings.url).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.drive().await {
                tracing::debug!(error = %e, "LDAP connection ended");
            }
        });
        Ok(ldap)
    }

    /// The service connection, bound; a new one if there is none.
    async fn service(&self) -> Result<Conn, LdapError> {
        let mut slot = self.service.lock().await;
        if let Some(c) = slot.as_mut()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let mut c = self.connect().await?;
        c.with_timeout(self.settings.timeout)
            .simple_bind(&self.settings.bind_dn, &self.settings.bind_password)
            .await?
            .success()?;
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn drop_service(&self) {
        if let Some(mut c) = self.service.lock().await.take() {
            let _ = c.unbind().await;
        }
    }

    /// Checks `user`'s password in the directory and returns who they are there.
    pub async fn authenticate(&self, user: &str, password: &str) -> Result<DirectoryUser, Refusal> {
        let found = self.lookup(user).await?;
        self.verify(&found, user, password).await
    }

    /// Finds the entry for a typed name, and the poort name the directory gives it: the name
    /// lockouts and sessions are keyed on, however the name was typed.
    pub async fn lookup(&self, user: &str) -> Result<Found, Refusal> {
        if user.is_empty() || user.len() > 256 {
            return Err(Refusal::Wrong);
        }
        let (dn, entry) = match self.find(user).await {
            Ok(f) => f,
            Err(Refusal::Unavailable(_)) => {
                // A kept connection may have gone stale: one retry on a new one.
                self.drop_service().await;
                self.find(user).await?
            }
            Err(e) => return Err(e),
        };
        // ASCII only, folded as ASCII: a Unicode fold would make U+212A (Kelvin) a `k`.
        let name = first(&entry, &self.settings.username_attribute)
            .filter(|n| n.is_ascii())
            .map(|n| n.to_ascii_lowercase())
            .filter(|n| crate::names::valid_user_name(n));
        let Some(name) = name else {
            tracing::warn!(dn = %dn, "A directory user name is not usable in poort");
            return Err(Refusal::Wrong);
        };
        Ok(Found { dn, entry, name })
    }

    /// Checks the password of a found entry, then its state and groups.
    pub async fn verify(&self, found: &Found, user: &str, password: &str) -> Result<DirectoryUser, Refusal> {
        // An empty password would be an unauthenticated bind, which many servers accept.
        if password.is_empty() {
            return Err(Refusal::Wrong);
        }
        let Found { dn, entry, name } = found;
        self.bind_as(dn, password).await?;
        if let Some(f) = &self.settings.disabled_filter
            && self.matches(dn, f).await?
        {
            return Err(Refusal::Disabled);
        }
        let groups = self.groups(user, dn, entry).await?;
        let groups = map_groups(&self.settings.group_map, &groups);
        if !self.settings.allowed_groups.is_empty() && !groups.iter().any(|g| self.settings.allowed_groups.contains(g))
        {
            return Err(Refusal::NotAllowed);
        }
        Ok(DirectoryUser { name: name.clone(), email: first(entry, &self.settings.email_attribute), groups })
    }

    /// The one entry `user_filter` finds for `user`.
    async fn find(&self, user: &str) -> Result<(String, SearchEntry), Refusal> {
        let filter = self.settings.user_filter.replace("{user}", &ldap_escape(user));
        let mut attrs = vec![self.settings.username_attribute.as_str(), self.settings.email_attribute.as_str()];
        if self.settings.groups == GroupSource::MemberOf {
            attrs.push("memberOf");
        }
        let mut conn = self.service().await.map_err(unavailable)?;
        let (entries, _) = conn
            .with_timeout(self.settings.timeout)
            .search(&self.settings.base_dn, Scope::Subtree, &filter, attrs)
            .await
            .map_err(unavailable)?
            .success()
            .map_err(unavailable)?;
        let mut entries = entries.into_iter().map(SearchEntry::construct);
        match (entries.next(), entries.next()) {
            (Some(e), None) => Ok((e.dn.clone(), e)),
            (None, _) => Err(Refusal::Wrong),
            (Some(_), Some(_)) => {
                tracing::warn!(filter = %filter, "The user filter matched more than one entry; refusing");
                Err(Refusal::Wrong)
            }
        }
    }

    /// Binds as `dn` on a connection of its own, then closes it.
    async fn bind_as(&self, dn: &str, password: &str) -> Result<(), Refusal> {
        let mut conn = self.connect().await.map_err(unavailable)?;
        let result = conn.with_timeout(self.settings.timeout).simple_bind(dn, password).await;
        let _ = conn.unbind().await;
        match result {
            Ok(r) if r.rc == 0 => Ok(()),
            Ok(r) if r.rc == INVALID_CREDENTIALS => Err(Refusal::Wrong),
            Ok(r) => Err(Refusal::Unavailable(format!("bind answered {} {}", r.rc, r.text))),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Whether the entry at `dn` matches `filter`.
    async fn matches(&self, dn: &str, filter: &str) -> Result<bool, Refusal> {
        let mut conn = self.service().await.map_err(unavailable)?;
        let (entries, _) = conn
            .with_timeout(self.settings.timeout)
            .search(dn, Scope::Base, filter, vec!["1.1"])
            .await
            .map_err(unavailable)?
            .success()
            .map_err(unavailable)?;
        Ok(!entries.is_empty())
    }

    /// Directory group names (and DNs) of the user.
    async fn groups(&self, user: &str, dn: &str, entry: &SearchEntry) -> Result<Vec<String>, Refusal> {
        match &self.settings.groups {
            GroupSource::MemberOf => Ok(entry.attrs.get("memberOf").cloned().unwrap_or_default()),
            GroupSource::Search { base_dn, filter } => {
                let filter = filter.replace("{dn}", &ldap_escape(dn)).replace("{user}", &ldap_escape(user));
                let mut conn = self.service().await.map_err(unavailable)?;
                let attr = self.settings.group_name_attribute.as_str();
                let (entries, _) = conn
                    .with_timeout(self.settings.timeout)
                    .search(base_dn, Scope::Subtree, &filter, vec![attr])
                    .await
                    .map_err(unavailable)?
                    .success()
                    .map_err(unavailable)?;
                Ok(entries.into_iter().map(SearchEntry::construct).map(|e| e.dn).collect())
            }
        }
    }

    /// Checks that the directory answers a service bind (for `poort check --live`).
    pub async fn ping(&self) -> Result<(), Refusal> {
        self.drop_service().await;
        self.service().await.map(|_| ()).map_err(unavailable)
    }
}

fn unavailable(e: LdapError) -> Refusal {
    Refusal::Unavailable(e.to_string())
}

fn first(entry: &SearchEntry, attr: &str) -> Option<String> {
    entry
        .attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(attr))
        .and_then(|(_, v)| v.first().cloned())
        .filter(|v| !v.is_empty())
}

/// The value of a DN's first RDN: `CN=VPN Users,OU=Groups,...` gives `VPN Users`.
fn rdn_value(dn: &str) -> &str {
    let first = dn.split(',').next().unwrap_or(dn);
    first.split_once('=').map_or(first, |(_, v)| v).trim()
}

/// Directory groups (DNs or names) to poort groups: a `group_map` entry by DN or by name wins;
/// otherwise the group's name, lower case, if it is a valid poort name.
pub fn map_groups(map: &[(String, String)], groups: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for g in groups {
        let (dn, name) = (g.to_lowercase(), rdn_value(g).to_lowercase());
        let mapped = map.iter().find(|(from, _)| *from == dn || *from == name).map(|(_, to)| to.clone());
        let group = match mapped {
            Some(to) => to,
            None if crate::names::valid_user_name(&name) => name,
            None => continue,
        };
        if !out.contains(&group) {
            out.push(group);
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_mapped_by_dn_or_name_and_odd_names_dropped() {
        let map = vec![
            ("cn=vpn users,ou=groups,dc=corp,dc=example".to_string(), "staff".to_string()),
            ("domain admins".to_string(), "admins".to_string()),
        ];
        let groups = [
            "CN=VPN Users,OU=Groups,DC=corp,DC=example",
            "CN=Domain Admins,CN=Users,DC=corp,DC=example",
            "cn=Engineering,ou=groups,dc=corp,dc=example",
            "CN=Has Spaces,DC=corp",
        ]
        .map(String::from);
        assert_eq!(map_groups(&map, &groups), ["admins", "engineering", "staff"]);
    }

    #[test]
    fn usernames_cannot_change_the_filter() {
        for (typed, escaped) in
            [("*", "\\2a"), ("admin)(|(uid=*", "admin\\29\\28|\\28uid=\\2a"), ("a\\b", "a\\5cb"), ("nul\0", "nul\\00")]
        {
            assert_eq!(ldap_escape(typed), escaped);
            let f = "(uid={user})".replace("{user}", &ldap_escape(typed));
            assert_eq!(f.matches('(').count(), 1, "{f}");
            assert!(!f.contains('*'), "{f}");
        }
    }
}
