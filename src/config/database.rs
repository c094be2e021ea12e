//! Where the store is: a SQLite file or a PostgreSQL database. Shown without its password.

use std::path::{Path, PathBuf};

/// Where the store is.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database, by URL; with TLS when `tls` is set.
    Postgres { url: String, tls: Option<crate::tls_client::Trust> },
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
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
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
                .map(|kv| if kv.starts_with("password=") { "password=***".to_string() } else { kv.to_string() })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => rest,
    };
    format!("{scheme}://{rest}")
}

impl Database {
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
        assert_eq!(redact_url("postgres://db/poort"), "postgres://db/poort");
    }
}
