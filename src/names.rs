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

/// An email address as poort stores it for a local user and passes on to apps (a header, a
/// claim): one line of visible characters with one `@` inside, none of the characters that
/// would need quoting in a header, in HTML or in a mail address; at most 254 bytes.
pub fn valid_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else { return false };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && s.len() <= 254
        && !domain.contains('@')
        && s.bytes().all(|b| b.is_ascii_graphic() && !b"<>\"'(),;:[]\\`".contains(&b))
}

/// Why an account cannot be made (or changed) with these names, if it cannot: a user name,
/// group names and an email address as poort takes them, in the words the command line and
/// the admin console both show.
pub fn account_problem(user: &str, groups: &[String], email: Option<&str>) -> Option<String> {
    const NAMES: &str = "use letters, digits, and - _ . @ (at most 64)";
    if !valid_user_name(user) {
        return Some(format!("{user:?} is not a valid user name: {NAMES}"));
    }
    if let Some(g) = groups.iter().find(|g| !valid_user_name(g)) {
        return Some(format!("{g:?} is not a valid group name: {NAMES}"));
    }
    email.filter(|e| !valid_email(e)).map(|e| {
        format!(
            "{e:?} is not an email address poort accepts: one line, like name@example.com, without spaces, quotes or <>"
        )
    })
}

/// The name of an app, a tunnel or a provider: lower-case letters, digits, `-` and `_`.
pub fn valid_entry_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        for ok in ["alice@example.com", "a.b+tag@sub.example.org", "x_y-z@e.nl"] {
            assert!(valid_email(ok), "{ok}");
        }
        for bad in [
            "",
            "alice",
            "@example.com",
            "alice@",
            "alice@localhost",
            "a@b@c.d",
            "a b@c.d",
            "a\n@c.d",
            "a\"><img src=x>@c.d",
            "n@x.y\n{\"kind\":1}",
            "a@.c",
            "a@c.",
            "é@c.d",
        ] {
            assert!(!valid_email(bad), "{bad:?}");
        }
    }
}
