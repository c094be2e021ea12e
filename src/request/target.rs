//! The request target, parsed and canonicalised exactly once (docs/threat-model.md, rules 1 and 2).
//!
//! `Target::parse` is pure: it takes the raw path and query bytes and either returns the one
//! canonical form that routing, policy, logging and forwarding all use, or a rejection. It never
//! repairs: anything another parser could read differently is refused.

use std::fmt;

/// Longest raw request target we accept; longer targets get 414.
pub const MAX_TARGET_LEN: usize = 8192;

/// Why a request target was refused. Each variant is a condition a test can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("request target is too long")]
    TooLong,
    #[error("request target is not in origin form")]
    NotOriginForm,
    #[error("byte not allowed in a path")]
    ForbiddenByte,
    #[error("malformed percent escape")]
    BadEscape,
    #[error("encoded path separator, dot, percent or parameter delimiter")]
    EncodedDelimiter,
    #[error("control byte")]
    Control,
    #[error("path is not valid utf-8")]
    InvalidUtf8,
    #[error("dot-segment in path")]
    DotSegment,
    #[error("empty path segment")]
    EmptySegment,
    #[error("path parameter (';')")]
    PathParameter,
    #[error("backslash in path")]
    Backslash,
    #[error("byte not allowed in the query")]
    BadQuery,
}

/// A canonical request target: a decoded, absolute path with no dot-segments, no empty
/// segments (except a trailing slash), no `;`, no `\`, no control characters; and the raw
/// query, checked for forbidden bytes but otherwise passed on untouched.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    path: String,
    query: Option<String>,
    /// `fold_case(path)` where it differs from `path`: routing and rules read it, and it is
    /// made once, here.
    key: Option<String>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Target({:?}", self.path)?;
        if let Some(q) = &self.query {
            write!(f, " ?{q:?}")?;
        }
        f.write_str(")")
    }
}

impl Target {
    /// Parses a raw origin-form target (`/path?query`). `raw` is the bytes as the client sent
    /// them, before any decoding by the HTTP library.
    pub fn parse(raw: &str) -> Result<Target, TargetError> {
        if raw.len() > MAX_TARGET_LEN {
            return Err(TargetError::TooLong);
        }
        let (raw_path, raw_query) = match raw.find('?') {
            Some(i) => (&raw[..i], Some(&raw[i + 1..])),
            None => (raw, None),
        };
        if !raw_path.starts_with('/') {
            return Err(TargetError::NotOriginForm);
        }
        let path = canonical_path(raw_path.as_bytes())?;
        let query = match raw_query {
            Some(q) => {
                check_query(q.as_bytes())?;
                if q.is_empty() { None } else { Some(q.to_owned()) }
            }
            None => None,
        };
        let key = match fold_case(&path) {
            std::borrow::Cow::Owned(k) => Some(k),
            std::borrow::Cow::Borrowed(_) => None,
        };
        Ok(Target { path, query, key })
    }

    /// The decoded canonical path, always starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }

    /// The path as routing and mitigation rules compare it: case folded (`fold_case`).
    pub fn match_key(&self) -> &str {
        self.key.as_deref().unwrap_or(&self.path)
    }

    /// The path re-encoded for the wire: what the upstream receives (after any prefix strip).
    pub fn encode_path(path: &str, out: &mut String) {
        for &b in path.as_bytes() {
            if is_pchar_raw(b) || b == b'/' {
                out.push(b as char);
            } else {
                out.push('%');
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 0xf) as usize] as char);
            }
        }
    }

    /// The full target to forward: encoded `path` (which may differ from `self.path()` when
    /// an app strips its prefix) and the query.
    pub fn forward_form(&self, path: &str) -> String {
        let mut out = String::with_capacity(path.len() + self.query.as_ref().map_or(0, |q| q.len() + 1));
        self.forward_form_onto(path, &mut out);
        out
    }

    /// `forward_form`, written at the end of `out`.
    pub fn forward_form_onto(&self, path: &str, out: &mut String) {
        Target::encode_path(path, out);
        if let Some(q) = &self.query {
            out.push('?');
            out.push_str(q);
        }
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The one form in which paths are compared by routing and by mitigation rules: ASCII letters
/// in lower case, and the few other letters whose simple case mapping is an ASCII letter
/// (U+0130 dotted capital I, U+0131 dotless i, U+017F long s, U+212A Kelvin sign) folded to
/// that letter; and dots and spaces at the end of a segment dropped, as Windows and IIS drop
/// them (`/secret.` and `/secret ` are `/secret` there). An upstream that compares paths
/// without regard to case, in ASCII or in Unicode, or on Windows, then serves the same
/// resource for every spelling that meets the same rule. Allocates only when something
/// changes.
pub fn fold_case(path: &str) -> std::borrow::Cow<'_, str> {
    let needs = |c: char| c.is_ascii_uppercase() || (!c.is_ascii() && ascii_fold(c).is_some());
    let trailing = path.split('/').any(|seg| seg.ends_with(['.', ' ']) && seg != "." && seg != "..");
    if !trailing && !path.chars().any(needs) {
        return std::borrow::Cow::Borrowed(path);
    }
    let folded: String =
        path.chars().map(|c| if c.is_ascii() { c.to_ascii_lowercase() } else { ascii_fold(c).unwrap_or(c) }).collect();
    if !trailing {
        return std::borrow::Cow::Owned(folded);
    }
    let segments: Vec<&str> = folded.split('/').map(|seg| seg.trim_end_matches(['.', ' '])).collect();
    std::borrow::Cow::Owned(segments.join("/"))
}

/// The lower-case ASCII letter a non-ASCII character turns into under a simple (one
/// character to one character) case mapping, if any.
fn ascii_fold(c: char) -> Option<char> {
    // Its simple lowercase mapping is `i`; the full one (Rust's) adds a combining dot.
    if c == '\u{130}' {
        return Some('i');
    }
    fn single(mut it: impl Iterator<Item = char>) -> Option<char> {
        let first = it.next()?;
        it.next().is_none().then_some(first)
    }
    [single(c.to_lowercase()), single(c.to_uppercase())]
        .into_iter()
        .flatten()
        .find(char::is_ascii_alphabetic)
        .map(|a| a.to_ascii_lowercase())
}

/// RFC 3986 `pchar` minus `%` (escapes are handled apart) and minus `;` (path parameters are
/// refused: Tomcat and others treat them as delimiters, CVE-2020-5902).
fn is_pchar_raw(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b':'
                | b'@'
        )
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn canonical_path(raw: &[u8]) -> Result<String, TargetError> {
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        match b {
            b'%' => {
                let (h, l) = match (raw.get(i + 1), raw.get(i + 2)) {
                    (Some(&h), Some(&l)) => (h, l),
                    _ => return Err(TargetError::BadEscape),
                };
                let v = match (hex_val(h), hex_val(l)) {
                    (Some(h), Some(l)) => (h << 4) | l,
                    _ => return Err(TargetError::BadEscape),
                };
                // Escapes that would decode to a delimiter or to another escape: a second parser
                // that decodes once more (or not at all) would see a different path.
                if matches!(v, b'/' | b'\\' | b'.' | b'%' | b';' | b'?' | b'#') {
                    return Err(TargetError::EncodedDelimiter);
                }
                if v < 0x20 || v == 0x7f {
                    return Err(TargetError::Control);
                }
                decoded.push(v);
                i += 3;
            }
            b';' => return Err(TargetError::PathParameter),
            b'\\' => return Err(TargetError::Backslash),
            0..=0x1f | 0x7f => return Err(TargetError::Control),
            b'/' => {
                decoded.push(b);
                i += 1;
            }
            _ if is_pchar_raw(b) => {
                decoded.push(b);
                i += 1;
            }
            _ => return Err(TargetError::ForbiddenByte),
        }
    }
    // std's UTF-8 validation refuses overlong forms (%c0%ae), surrogates and truncated sequences.
    let path = String::from_utf8(decoded).map_err(|_| TargetError::InvalidUtf8)?;
    if path.chars().any(|c| c.is_control()) {
        // C1 controls (U+0080..U+009F) decoded from valid UTF-8.
        return Err(TargetError::Control);
    }
    let mut segments = path[1..].split('/').peekable();
    while let Some(seg) = segments.next() {
        if seg == "." || seg == ".." {
            return Err(TargetError::DotSegment);
        }
        // Only the last segment may be empty (a trailing slash, or the root path).
        if seg.is_empty() && segments.peek().is_some() {
            return Err(TargetError::EmptySegment);
        }
    }
    Ok(path)
}

/// The query is not used for routing or policy (rule 3), but it is forwarded, so it must not
/// carry bytes that could break the request line on the way out.
fn check_query(q: &[u8]) -> Result<(), TargetError> {
    let mut i = 0;
    while i < q.len() {
        let b = q[i];
        if b == b'%' {
            match (q.get(i + 1).copied().and_then(hex_val), q.get(i + 2).copied().and_then(hex_val)) {
                (Some(_), Some(_)) => i += 3,
                _ => return Err(TargetError::BadQuery),
            }
            continue;
        }
        if !(is_pchar_raw(b) || matches!(b, b'/' | b'?' | b';')) {
            return Err(TargetError::BadQuery);
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_canonicalises() {
        let cases = [
            ("/", "/", None),
            ("/wiki/", "/wiki/", None),
            ("/wiki/Page?x=1&y=%2F", "/wiki/Page", Some("x=1&y=%2F")),
            ("/caf%C3%A9", "/café", None),
            ("/a%20b", "/a b", None),
            ("/a?", "/a", None),
            ("/~user/file.txt", "/~user/file.txt", None),
            ("/x/..y/.z", "/x/..y/.z", None),
        ];
        for (raw, path, query) in cases {
            let t = Target::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(t.path(), path, "{raw}");
            assert_eq!(t.query(), query, "{raw}");
        }
    }

    #[test]
    fn rejects_ambiguity() {
        use TargetError::*;
        let cases = [
            ("/..", DotSegment),
            ("/a/../b", DotSegment),
            ("/a/./b", DotSegment),
            ("/vpn/../vpns/cfg/smb.conf", DotSegment),
            ("/%2e%2e/etc/passwd", EncodedDelimiter),
            ("/%2E%2E/", EncodedDelimiter),
            ("/.%2e/", EncodedDelimiter),
            ("/a%2fb", EncodedDelimiter),
            ("/a%2Fb", EncodedDelimiter),
            ("/a%5cb", EncodedDelimiter),
            ("/a%00b", Control),
            ("/a%0d%0aX:1", Control),
            ("/%252e%252e/", EncodedDelimiter),
            ("/%2577ebui", EncodedDelimiter),
            ("/%c0%ae%c0%ae/", InvalidUtf8),
            ("/%e0%80%ae", InvalidUtf8),
            ("/%ff", InvalidUtf8),
            ("/%c2%85", Control),
            ("/app/..;/x", PathParameter),
            ("/a;jsessionid=1", PathParameter),
            ("/a%3bb", EncodedDelimiter),
            ("/a\\b", Backslash),
            ("/a\tb", Control),
            ("//evil", EmptySegment),
            ("/a//b", EmptySegment),
            ("/a%", BadEscape),
            ("/a%g0", BadEscape),
            ("/a b", ForbiddenByte),
            ("/a\"b", ForbiddenByte),
            ("/a{b}", ForbiddenByte),
            ("/a#b", ForbiddenByte),
            ("http://evil/", NotOriginForm),
            ("*", NotOriginForm),
            ("/a?b c", BadQuery),
            ("/a?b%zz", BadQuery),
            ("/a?b\r\n", BadQuery),
        ];
        for (raw, want) in cases {
            assert_eq!(Target::parse(raw), Err(want), "{raw:?}");
        }
        assert_eq!(Target::parse(&format!("/{}", "a".repeat(MAX_TARGET_LEN))), Err(TooLong));
    }

    #[test]
    fn case_folding_for_matching() {
        assert_eq!(fold_case("/wiki/page"), "/wiki/page");
        assert!(matches!(fold_case("/wiki/page"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(fold_case("/WIKI/Page"), "/wiki/page");
        // Letters whose case mapping lands in ASCII: an upstream comparing in Unicode would
        // read them as these.
        assert_eq!(fold_case("/wı\u{212A}i/ſecret"), "/wiki/secret");
        // Other letters stay as they are.
        assert_eq!(fold_case("/Café/Ärger"), "/café/Ärger");
        assert_eq!(fold_case("/ADM\u{130}N"), "/admin");
        // Windows drops dots and spaces at the end of a segment.
        assert_eq!(fold_case("/up/secret./x"), "/up/secret/x");
        assert_eq!(fold_case("/up/Secret . "), "/up/secret");
        assert_eq!(fold_case("/up/v1.2/"), "/up/v1.2/");
    }

    #[test]
    fn forward_form_reencodes() {
        let t = Target::parse("/caf%C3%A9/a%20b?q=%41").unwrap();
        assert_eq!(t.forward_form(t.path()), "/caf%C3%A9/a%20b?q=%41");
        assert_eq!(t.forward_form("/x"), "/x?q=%41");
    }

    proptest::proptest! {
        /// Whatever is accepted, its wire form parses back to itself: normalising twice gives
        /// the same result, so poort and the upstream read the same path.
        #[test]
        fn canonical_form_is_a_fixed_point(raw in "/[a-zA-Z0-9%./;\\\\~:@!$&'()*+,= -]{0,40}") {
            if let Ok(t) = Target::parse(&raw) {
                let wire = t.forward_form(t.path());
                let again = Target::parse(&wire).expect("the wire form of an accepted target parses");
                proptest::prop_assert_eq!(again, t);
            }
        }
    }
}
