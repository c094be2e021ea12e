//! `[auth.ldap]` and `[auth.oidc.NAME]`: where users other than local accounts come from
//! (docs/identity.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::resolve::Collector;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    pub ldap: Option<LdapFile>,
    #[serde(default)]
    pub oidc: std::collections::BTreeMap<String, OidcFile>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LdapFile {
    pub url: Option<String>,
    pub start_tls: Option<bool>,
    pub insecure_plaintext: Option<bool>,
    pub ca_file: Option<String>,
    pub bind_dn: Option<String>,
    pub bind_password_file: Option<String>,
    pub base_dn: Option<String>,
    pub user_filter: Option<String>,
    pub username_attribute: Option<String>,
    pub email_attribute: Option<String>,
    pub groups: Option<String>,
    pub group_base_dn: Option<String>,
    pub group_filter: Option<String>,
    pub group_name_attribute: Option<String>,
    pub nested_groups: Option<bool>,
    #[serde(default)]
    pub group_map: std::collections::BTreeMap<String, String>,
    pub disabled_filter: Option<String>,
    pub allowed_groups: Option<Vec<String>>,
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OidcFile {
    pub title: Option<String>,
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_file: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub username_claim: Option<String>,
    pub email_claim: Option<String>,
    pub groups_claim: Option<String>,
    #[serde(default)]
    pub group_map: std::collections::BTreeMap<String, String>,
    pub allowed_groups: Option<Vec<String>>,
    pub allowed_email_domains: Option<Vec<String>>,
    pub trust_mfa: Option<bool>,
    pub mfa_amr: Option<Vec<String>>,
    pub mfa_acr: Option<Vec<String>>,
    pub logout: Option<bool>,
    pub ca_file: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Auth {
    pub ldap: Option<Ldap>,
    pub oidc: Vec<Oidc>,
}

/// Where a directory user's groups come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupSource {
    /// The user entry's `memberOf` values (Active Directory, OpenLDAP with the memberof overlay).
    MemberOf,
    /// A search under `base_dn` with `filter` (`{dn}` and `{user}` filled in, escaped).
    Search { base_dn: String, filter: String },
}

#[derive(Clone)]
pub struct Ldap {
    pub url: String,
    pub start_tls: bool,
    pub ca_file: Option<PathBuf>,
    pub bind_dn: String,
    pub bind_password: String,
    pub base_dn: String,
    pub user_filter: String,
    pub username_attribute: String,
    pub email_attribute: String,
    pub groups: GroupSource,
    pub group_name_attribute: String,
    /// Directory group (name or DN, lower case) to poort group.
    pub group_map: Vec<(String, String)>,
    pub disabled_filter: Option<String>,
    pub allowed_groups: Vec<String>,
    pub timeout: Duration,
}

impl std::fmt::Debug for Ldap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ldap").field("url", &self.url).field("bind_dn", &self.bind_dn).finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub struct Oidc {
    pub name: String,
    pub title: String,
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    pub scopes: Vec<String>,
    pub username_claim: String,
    pub email_claim: String,
    pub groups_claim: String,
    pub group_map: Vec<(String, String)>,
    pub allowed_groups: Vec<String>,
    pub allowed_email_domains: Vec<String>,
    pub trust_mfa: bool,
    pub mfa_amr: Vec<String>,
    pub mfa_acr: Vec<String>,
    pub logout: bool,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc").field("name", &self.name).field("issuer", &self.issuer).finish_non_exhaustive()
    }
}

/// Reads a secret from a file: the first line, without its line ending.
fn secret(c: &mut Collector, key: &str, raw: Option<&str>, at: &dyn Fn(&str) -> PathBuf) -> String {
    let Some(raw) = raw else {
        c.add(key, "missing", "a file holding the secret on its first line, readable only by poort");
        return String::new();
    };
    let path = at(raw);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim_end_matches(['\r', '\n']).is_empty() => s.lines().next().unwrap_or("").to_string(),
        Ok(_) => {
            c.add(key, format!("{} is empty", path.display()), "write the secret on its first line");
            String::new()
        }
        Err(e) => {
            c.add(key, format!("cannot read {}: {e}", path.display()), "give a readable file");
            String::new()
        }
    }
}

fn group_map(c: &mut Collector, key: &str, raw: std::collections::BTreeMap<String, String>) -> Vec<(String, String)> {
    raw.into_iter()
        .filter_map(|(from, to)| {
            if crate::names::valid_user_name(&to) {
                Some((from.to_lowercase(), to))
            } else {
                c.add(
                    format!("{key}.group_map"),
                    format!("{to:?} is not a poort group name"),
                    "use a-z, 0-9, -, _, . and @",
                );
                None
            }
        })
        .collect()
}

fn filter(c: &mut Collector, key: &str, raw: &str, must_have: &str) -> String {
    let balanced = raw.starts_with('(')
        && raw.ends_with(')')
        && raw.chars().filter(|&ch| ch == '(').count() == raw.chars().filter(|&ch| ch == ')').count();
    if !balanced {
        c.add(key, format!("{raw:?} is not an LDAP filter"), "for example \"(sAMAccountName={user})\"");
    } else if !must_have.is_empty() && !raw.contains(must_have) {
        c.add(key, format!("{raw:?} does not contain {must_have}"), format!("put {must_have} where the value goes"));
    }
    raw.to_string()
}

pub(super) fn resolve(c: &mut Collector, f: AuthFile, base: &Path) -> Auth {
    let at = |p: &str| -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
    };
    let ldap = f.ldap.map(|l| resolve_ldap(c, l, &at));
    let oidc = f.oidc.into_iter().filter_map(|(name, o)| resolve_oidc(c, name, o, &at)).collect();
    Auth { ldap, oidc }
}

fn resolve_ldap(c: &mut Collector, l: LdapFile, at: &dyn Fn(&str) -> PathBuf) -> Ldap {
    let url = l.url.unwrap_or_default();
    let start_tls = l.start_tls.unwrap_or(false);
    if url.starts_with("ldaps://") {
        if start_tls {
            c.add("auth.ldap.start_tls", "StartTLS on an ldaps:// URL", "use one: ldaps:// or ldap:// with start_tls");
        }
    } else if url.starts_with("ldap://") {
        if !start_tls && !l.insecure_plaintext.unwrap_or(false) {
            c.add(
                "auth.ldap.url",
                "ldap:// without StartTLS sends passwords in the clear",
                "use ldaps://, or set start_tls = true; insecure_plaintext = true only for a test directory",
            );
        }
    } else {
        c.add(
            "auth.ldap.url",
            format!("{url:?} is not an ldaps:// or ldap:// URL"),
            "for example \"ldaps://dc1.corp.example.com\"",
        );
    }
    let need = |c: &mut Collector, key: &str, v: Option<String>, hint: &str| {
        v.filter(|s| !s.is_empty()).unwrap_or_else(|| {
            c.add(format!("auth.ldap.{key}"), "missing", hint);
            String::new()
        })
    };
    let bind_dn = need(c, "bind_dn", l.bind_dn, "the DN of a service account that may search for users");
    let bind_password = secret(c, "auth.ldap.bind_password_file", l.bind_password_file.as_deref(), at);
    let base_dn = need(c, "base_dn", l.base_dn, "where users are searched, for example \"DC=corp,DC=example,DC=com\"");
    let user_filter = filter(c, "auth.ldap.user_filter", l.user_filter.as_deref().unwrap_or("(uid={user})"), "{user}");
    let nested = l.nested_groups.unwrap_or(false);
    let groups = match (l.groups.as_deref().unwrap_or("memberOf"), nested) {
        ("memberOf", false) => GroupSource::MemberOf,
        ("memberOf", true) | ("search", _) => {
            let default = if nested { "(member:1.2.840.113556.1.4.1941:={dn})" } else { "(member={dn})" };
            let f = filter(c, "auth.ldap.group_filter", l.group_filter.as_deref().unwrap_or(default), "");
            GroupSource::Search { base_dn: l.group_base_dn.clone().unwrap_or_else(|| base_dn.clone()), filter: f }
        }
        (other, _) => {
            c.add("auth.ldap.groups", format!("{other:?} is not a choice"), "\"memberOf\" or \"search\"");
            GroupSource::MemberOf
        }
    };
    let disabled_filter = l.disabled_filter.map(|f| filter(c, "auth.ldap.disabled_filter", &f, ""));
    Ldap {
        url,
        start_tls,
        ca_file: l.ca_file.as_deref().map(at),
        bind_dn,
        bind_password,
        base_dn,
        user_filter,
        username_attribute: l.username_attribute.unwrap_or_else(|| "uid".into()),
        email_attribute: l.email_attribute.unwrap_or_else(|| "mail".into()),
        groups,
        group_name_attribute: l.group_name_attribute.unwrap_or_else(|| "cn".into()),
        group_map: group_map(c, "auth.ldap", l.group_map),
        disabled_filter,
        allowed_groups: l.allowed_groups.unwrap_or_default(),
        timeout: c.duration("auth.ldap.timeout", &l.timeout, Duration::from_secs(5)),
    }
}

fn resolve_oidc(c: &mut Collector, name: String, o: OidcFile, at: &dyn Fn(&str) -> PathBuf) -> Option<Oidc> {
    let key = format!("auth.oidc.{name}");
    if !crate::names::valid_entry_name(&name) {
        c.add(&key, format!("{name:?} is not a provider name"), "use 1-64 of a-z, 0-9, - and _");
        return None;
    }
    let issuer = o.issuer.unwrap_or_default().trim_end_matches('/').to_string();
    match url_host(&issuer) {
        Some((true, _)) => {}
        Some((false, host)) if is_loopback(host) => {}
        _ => c.add(
            format!("{key}.issuer"),
            format!("{issuer:?} is not an https:// issuer URL"),
            "the provider's issuer, for example \"https://login.microsoftonline.com/TENANT/v2.0\" (http:// only on loopback)",
        ),
    }
    let client_id = o.client_id.unwrap_or_default();
    if client_id.is_empty() {
        c.add(format!("{key}.client_id"), "missing", "the client id the provider gave poort");
    }
    let client_secret = secret(c, &format!("{key}.client_secret_file"), o.client_secret_file.as_deref(), at);
    let scopes = o.scopes.unwrap_or_else(|| vec!["openid".into(), "email".into(), "profile".into()]);
    Some(Oidc {
        title: o.title.unwrap_or_else(|| name.clone()),
        issuer,
        client_id,
        client_secret,
        scopes,
        username_claim: o.username_claim.unwrap_or_else(|| "preferred_username".into()),
        email_claim: o.email_claim.unwrap_or_else(|| "email".into()),
        groups_claim: o.groups_claim.unwrap_or_else(|| "groups".into()),
        group_map: group_map(c, &key, o.group_map),
        allowed_groups: o.allowed_groups.unwrap_or_default(),
        allowed_email_domains: o.allowed_email_domains.unwrap_or_default().iter().map(|d| d.to_lowercase()).collect(),
        trust_mfa: o.trust_mfa.unwrap_or(false),
        mfa_amr: o.mfa_amr.unwrap_or_else(|| ["mfa", "otp", "hwk", "swk", "fido"].map(String::from).to_vec()),
        mfa_acr: o.mfa_acr.unwrap_or_default(),
        logout: o.logout.unwrap_or(true),
        ca_file: o.ca_file.as_deref().map(at),
        timeout: c.duration(&format!("{key}.timeout"), &o.timeout, Duration::from_secs(10)),
        name,
    })
}

/// (is https, host) of an http(s) URL.
fn url_host(url: &str) -> Option<(bool, &str)> {
    let (https, rest) = match url.strip_prefix("https://") {
        Some(r) => (true, r),
        None => (false, url.strip_prefix("http://")?),
    };
    let authority = rest.split('/').next()?;
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.is_empty() => h,
        _ => authority,
    };
    (!host.is_empty()).then_some((https, host))
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn problems(text: &str) -> Vec<String> {
        match crate::config::parse(text, Path::new("/nonexistent")) {
            Ok(_) => Vec::new(),
            Err(p) => p.0.into_iter().map(|p| p.path).collect(),
        }
    }

    #[test]
    fn unsafe_or_incomplete_sources_are_refused_by_key() {
        let text = r#"
            [auth.ldap]
            url = "ldap://dc1.corp.example"
            bind_dn = "cn=poort"
            bind_password_file = "missing-file"
            base_dn = "dc=corp"
            user_filter = "(uid=carol)"
            [auth.oidc.Bad]
            issuer = "https://id.example"
            [auth.oidc.plain]
            issuer = "http://id.example"
            client_id = "poort"
            client_secret_file = "missing-file"
        "#;
        let p = problems(text);
        for key in [
            "auth.ldap.url",
            "auth.ldap.bind_password_file",
            "auth.ldap.user_filter",
            "auth.oidc.Bad",
            "auth.oidc.plain.issuer",
            "auth.oidc.plain.client_secret_file",
        ] {
            assert!(p.iter().any(|k| k == key), "{key} not reported in {p:?}");
        }
    }

    #[test]
    fn plain_ldap_needs_starttls_or_an_explicit_insecure_key() {
        let dir = std::env::temp_dir().join(format!("poort-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pw"), "secret\n").unwrap();
        let base = |extra: &str| {
            format!(
                "[auth.ldap]\nurl = \"ldap://127.0.0.1:389\"\nbind_dn = \"cn=poort\"\nbind_password_file = \"{}\"\nbase_dn = \"dc=x\"\n{extra}",
                dir.join("pw").display()
            )
        };
        assert_eq!(problems(&base("")), ["auth.ldap.url"]);
        assert!(problems(&base("start_tls = true")).is_empty());
        assert!(problems(&base("insecure_plaintext = true")).is_empty());
        let cfg = crate::config::parse(&base("start_tls = true"), Path::new("/")).unwrap();
        assert_eq!(cfg.auth.ldap.unwrap().bind_password, "secret");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
