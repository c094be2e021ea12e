//! Cookie codec: find poort's cookies in `Cookie` header values, check the token format strictly
//! before any lookup, and build `Set-Cookie` values. Pure.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The session cookie. `__Host-` means Secure, no Domain, Path=/: no other host can set it.
pub const SESSION_COOKIE: &str = "__Host-poort";
/// The anti-CSRF cookie (double submit: forms carry the same value in a hidden field).
pub const CSRF_COOKIE: &str = "__Host-poort-csrf";

/// Length of a 32-byte token in unpadded base64url.
pub const TOKEN_LEN: usize = 43;

pub fn encode_token(raw: &[u8; 32]) -> String {
    crate::secret::b64(raw)
}

/// A token is exactly 43 base64url characters that decode to 32 bytes, in canonical form
/// (the last character carries no stray bits). Anything else is not a token.
pub fn decode_token(s: &str) -> Option<[u8; 32]> {
    if s.len() != TOKEN_LEN || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return None;
    }
    // On the stack: every request with a cookie comes here.
    let mut raw = [0u8; 33];
    if URL_SAFE_NO_PAD.decode_slice(s, &mut raw).ok()? != 32 {
        return None;
    }
    let raw: [u8; 32] = raw[..32].try_into().ok()?;
    let mut again = [0u8; TOKEN_LEN];
    let n = URL_SAFE_NO_PAD.encode_slice(raw, &mut again).ok()?;
    (again[..n] == *s.as_bytes()).then_some(raw)
}

/// The value of cookie `name` across all `Cookie` header values. None if absent or present
/// more than once (two values for one name means someone planted one).
pub fn find<'a>(headers: impl Iterator<Item = &'a [u8]>, name: &str) -> Option<&'a str> {
    let mut found = None;
    for h in headers {
        let Ok(h) = std::str::from_utf8(h) else { continue };
        for pair in h.split(';') {
            let pair = pair.trim_matches(' ');
            if let Some((k, v)) = pair.split_once('=')
                && k == name
            {
                if found.is_some() {
                    return None;
                }
                found = Some(v);
            }
        }
    }
    found
}

/// A `Cookie` value without poort's own cookies, or None if nothing is left.
pub fn without_poort(value: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(value).ok()?;
    let kept: Vec<&str> = s
        .split(';')
        .map(|p| p.trim_matches(' '))
        .filter(|p| {
            let name = p.split_once('=').map_or(*p, |(k, _)| k);
            !name.starts_with("__Host-poort") && !p.is_empty()
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

pub fn set_session(value: &str) -> String {
    format!("{SESSION_COOKIE}={value}; Path=/; Secure; HttpOnly; SameSite=Lax")
}

pub fn clear_session() -> String {
    format!("{SESSION_COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0")
}

/// Ties a single sign-on in flight to the browser that started it. Lax, so that it comes back
/// with the provider's redirect.
pub const SSO_COOKIE: &str = "__Host-poort-sso";

pub fn set_sso(value: &str) -> String {
    format!("{SSO_COOKIE}={value}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=600")
}

pub fn clear_sso() -> String {
    format!("{SSO_COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0")
}

pub fn set_csrf(value: &str) -> String {
    format!("{CSRF_COOKIE}={value}; Path=/; Secure; HttpOnly; SameSite=Strict")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_format_is_strict() {
        let raw = [7u8; 32];
        let t = encode_token(&raw);
        assert_eq!(decode_token(&t), Some(raw));
        assert_eq!(decode_token(&t[..42]), None);
        assert_eq!(decode_token(&format!("{t}A")), None);
        assert_eq!(decode_token(&t.replace('H', "+")), None);
        assert_eq!(decode_token(&format!("{}=", &t[..42])), None);
        // Non-canonical: same bytes, different trailing bits.
        let last = t.as_bytes()[42];
        let other = if last == b'c' { "d" } else { "c" };
        let tweaked = format!("{}{}", &t[..42], other);
        assert_ne!(decode_token(&tweaked), Some(raw));
    }

    #[test]
    fn finds_exactly_one_cookie() {
        let h = [&b"a=1; __Host-poort=abc; b=2"[..]];
        assert_eq!(find(h.into_iter(), SESSION_COOKIE), Some("abc"));
        let dup = [&b"__Host-poort=abc"[..], &b"__Host-poort=def"[..]];
        assert_eq!(find(dup.into_iter(), SESSION_COOKIE), None);
        let prefix = [&b"__Host-poort-csrf=x"[..]];
        assert_eq!(find(prefix.into_iter(), SESSION_COOKIE), None);
        assert_eq!(without_poort(b"a=1; __Host-poort=abc; __Host-poort-csrf=z; b=2").as_deref(), Some("a=1; b=2"));
        assert_eq!(without_poort(b"__Host-poort=abc"), None);
    }

    proptest::proptest! {
        /// Any single changed character of a valid token is either rejected or a different token.
        #[test]
        fn any_changed_char_is_another_token(pos in 0usize..TOKEN_LEN, c in proptest::char::range('!', '~')) {
            let raw = [42u8; 32];
            let t = encode_token(&raw);
            let mut chars: Vec<char> = t.chars().collect();
            proptest::prop_assume!(chars[pos] != c);
            chars[pos] = c;
            let changed: String = chars.into_iter().collect();
            proptest::prop_assert_ne!(decode_token(&changed), Some(raw));
        }
    }
}
