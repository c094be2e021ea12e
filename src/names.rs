//! Who a person is, in poort's words: their `Identity`; and the two kinds of names poort
//! checks, side by side because they differ: the names of people and groups (from local
//! accounts, a directory or a provider) and the names of the entries an operator declares
//! (apps, tunnels, providers). Both appear in URLs, headers, JWT claims and audit records, so
//! both stay plain.

/// The authenticated identity a session carries and policy decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub email: Option<String>,
    pub groups: Vec<String>,
}

/// A user or group name: letters, digits and `-_.@`, not starting with `-` or `.`, at most 64.
pub fn valid_user_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
        && !s.starts_with(['-', '.'])
}

/// The name of an app, a tunnel or a provider: lower-case letters, digits, `-` and `_`.
pub fn valid_entry_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}
