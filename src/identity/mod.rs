//! Who a person is: local users and groups, and password hashing with argon2id.
//! Directory (LDAP) and single sign-on (OIDC) sources will sit beside the local one.

pub mod ldap;
pub mod mfa;
pub mod oidc;
pub mod passkey;
pub mod password;
pub mod seal;
pub mod totp;

/// The authenticated identity a session carries and policy decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub email: Option<String>,
    pub groups: Vec<String>,
}

/// User and group names: plain enough for headers, JWT claims and audit records.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
        && !s.starts_with(['-', '.'])
}
