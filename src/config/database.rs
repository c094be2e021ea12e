//! Where the store is: a SQLite file or a PostgreSQL database. Shown without its password.

use std::path::{Path, PathBuf};

use crate::tls_client::Trust;

/// Where the store is.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database, by URL; with TLS when `tls` is set.
    Postgres { url: String, tls: Option<Trust> },
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// Shows a database without the password a URL may hold.
impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(p) => write!(f, "{}", p.display()),
            Database::Postgres { url, .. } => f.write_str(&redact_url(url)),
        }
    }
}

/// A database URL with its password (in the user part or a `password=` parameter) as `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return redact_pairs(url) };
    let rest = match rest.rsplit_once('@') {
        Some((auth, host)) => match auth.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => rest.to_string(),
        },
        None => rest.to_string(),
    };
    let rest = match rest.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| {
                    // The key as the URL parser reads it: percent-decoded, any case.
                    let key = kv.split('=').next().unwrap_or_default();
                    let key: String = form_urlencoded::parse(key.as_bytes()).map(|(k, _)| k.into_owned()).collect();
                    if key.eq_ignore_ascii_case("password") { "password=***".to_string() } else { kv.to_string() }
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => rest,
    };
    format!("{scheme}://{rest}")
}

impl Database {
    /// A warning when a PostgreSQL URL may send passwords and session data unencrypted to
    /// another machine: no CA file, no `sslmode=require`, and a host that is not loopback.
    pub fn plaintext_warning(&self) -> Option<String> {
        let Database::Postgres { url, tls: None } = self else { return None };
        let config: tokio_postgres::Config = url.parse().ok()?;
        let remote = config.get_hosts().iter().any(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => {
                name != "localhost" && !name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
            tokio_postgres::config::Host::Unix(_) => false,
        });
        remote.then(|| {
            format!(
                "store.database_url: {} may connect without TLS, and password hashes and session data would cross the network in the clear (hint: set database_ca_file, or add ?sslmode=require)",
                redact_url(url)
            )
        })
    }

    /// Reads a database URL, `sqlite://PATH` (relative to `base`) or `postgres://…`, with the
    /// CA file that TLS to PostgreSQL is then required with. On a problem: the key at fault
    /// (`database_url` or `database_ca_file`), what is wrong, and the fix.
    pub fn parse(url: &str, ca_file: Option<PathBuf>, base: &Path) -> Result<Database, (&'static str, String, String)> {
        let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
        if postgres {
            if let Err(e) = url.parse::<tokio_postgres::Config>() {
                let why = format!("{} is not a PostgreSQL URL poort understands: {e}", redact_url(url));
                return Err(("database_url", why, "write postgres://USER:PASSWORD@HOST:PORT/DATABASE".into()));
            }
            // With a CA file TLS is required; `sslmode=require` alone checks the server
            // against the system's roots; otherwise the server's own setting decides.
            let wants_tls =
                ["sslmode=require", "sslmode=verify-ca", "sslmode=verify-full"].iter().any(|m| url.contains(m));
            let tls = match ca_file {
                Some(ca) if !ca.is_file() => {
                    let why = format!("{} is not a readable file", ca.display());
                    return Err((
                        "database_ca_file",
                        why,
                        "give the PEM file of the CA that signed the database server's certificate".into(),
                    ));
                }
                Some(ca) => Some(Trust::CaFile(ca)),
                None if wants_tls => Some(Trust::SystemRoots),
                None => None,
            };
            return Ok(Database::Postgres { url: url.to_string(), tls });
        }
        if ca_file.is_some() {
            let why = "is only used with a postgres:// database URL".to_string();
            return Err(("database_ca_file", why, "remove it, or give a postgres:// URL".into()));
        }
        match url.strip_prefix("sqlite://") {
            Some(p) if !p.is_empty() => Ok(Database::Sqlite(base.join(p))),
            _ => Err((
                "database_url",
                format!("{:?} is neither a sqlite:// nor a postgres:// URL", redact_url(url)),
                "write \"sqlite://PATH\" or \"postgres://USER:PASSWORD@HOST/DATABASE\", or leave it out to use poort.db in data_dir".into(),
            )),
        }
    }

    /// Whether the store can be opened without creating it: a SQLite file exists; a
    /// PostgreSQL database is taken to exist.
    pub fn exists(&self) -> bool {
        match self {
            Database::Sqlite(p) => p.exists(),
            Database::Postgres { .. } => true,
        }
    }
}

impl From<&Path> for Database {
    fn from(p: &Path) -> Database {
        Database::Sqlite(p.to_path_buf())
    }
}
impl From<&PathBuf> for Database {
    fn from(p: &PathBuf) -> Database {
        Database::Sqlite(p.clone())
    }
}
impl From<PathBuf> for Database {
    fn from(p: PathBuf) -> Database {
        Database::Sqlite(p)
    }
}
impl From<&Database> for Database {
    fn from(d: &Database) -> Database {
        d.clone()
    }
}

/// The `key=value` form (`host=db password=secret`) with every value of a key that mentions
/// a password as `***` (quoted values included).
fn redact_pairs(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(eq) = rest.find('=') {
        let key_start = rest[..eq].rfind(char::is_whitespace).map_or(0, |i| i + 1);
        let key = rest[key_start..eq].trim();
        out.push_str(&rest[..=eq]);
        let value = &rest[eq + 1..];
        let end = if let Some(quoted) = value.strip_prefix('\'') {
            quoted.find('\'').map_or(value.len(), |i| i + 2)
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        if key.to_ascii_lowercase().contains("pass") {
            out.push_str("***");
        } else {
            out.push_str(&value[..end]);
        }
        rest = &value[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shown_url_keeps_no_password() {
        assert_eq!(redact_url("postgres://poort:s3cret@db:5432/poort"), "postgres://poort:***@db:5432/poort");
        assert_eq!(
            redact_url("postgres://poort@db/poort?password=s3cret&sslmode=require"),
            "postgres://poort@db/poort?password=***&sslmode=require"
        );
        assert_eq!(redact_url("postgres://p:a@b@db/x"), "postgres://p:***@db/x");
        assert_eq!(redact_url("postgres://db/x?pass%77ord=s3cret"), "postgres://db/x?password=***");
        assert_eq!(redact_url("postgres://db/x?PassWord=s3cret"), "postgres://db/x?password=***");
        assert_eq!(redact_url("postgres://db/poort"), "postgres://db/poort");
        assert_eq!(redact_url("host=db password=s3cret user=p"), "host=db password=*** user=p");
        assert_eq!(redact_url("host=db password='a b c' user=p"), "host=db password=*** user=p");
        assert_eq!(redact_url("host=db sslpassword=x"), "host=db sslpassword=***");
    }
}
