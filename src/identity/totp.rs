//! Time-based one-time passwords (RFC 6238 over RFC 4226 HOTP): HMAC-SHA-1, 6 digits, 30-second
//! steps, one step of drift either way. Pure: the time and the secret are passed in. Replay
//! protection (each step used once per user) lives in the store.

use ring::hmac;

pub const DIGITS: u32 = 6;
pub const STEP: i64 = 30;
/// Steps of clock drift accepted on each side.
pub const DRIFT: i64 = 1;
/// Length of a new secret in bytes (160 bits, as RFC 4226 recommends).
pub const SECRET_LEN: usize = 20;

/// HOTP value for `counter` (RFC 4226 §5.3), `digits` long.
pub fn hotp(secret: &[u8], counter: u64, digits: u32) -> u32 {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let mac = hmac::sign(&key, &counter.to_be_bytes());
    let h = mac.as_ref();
    let offset = (h[h.len() - 1] & 0x0f) as usize;
    let bin = u32::from_be_bytes([h[offset] & 0x7f, h[offset + 1], h[offset + 2], h[offset + 3]]);
    bin % 10u32.pow(digits)
}

/// The step a Unix time falls in.
pub fn step_at(now: i64) -> i64 {
    now.div_euclid(STEP)
}

/// The code for a step, zero-padded.
pub fn code_at_step(secret: &[u8], step: i64) -> String {
    format!("{:0width$}", hotp(secret, step as u64, DIGITS), width = DIGITS as usize)
}

/// Finds the step within the drift window whose code is `code`. The caller must still make
/// sure the step was not used before. Codes are compared in constant time.
pub fn matching_step(secret: &[u8], code: &str, now: i64) -> Option<i64> {
    use subtle::ConstantTimeEq;
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let current = step_at(now);
    let mut found = None;
    for step in current - DRIFT..=current + DRIFT {
        // No early exit: every candidate costs the same.
        if bool::from(code_at_step(secret, step).as_bytes().ct_eq(code.as_bytes())) && found.is_none() {
            found = Some(step);
        }
    }
    found
}

/// RFC 4648 base32 without padding, as authenticator apps expect the secret.
pub fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    for chunk in data.chunks(5) {
        let mut buf = [0u8; 5];
        buf[..chunk.len()].copy_from_slice(chunk);
        let bits = u64::from_be_bytes([0, 0, 0, buf[0], buf[1], buf[2], buf[3], buf[4]]);
        let chars = (chunk.len() * 8).div_ceil(5);
        for i in 0..chars {
            out.push(ALPHABET[((bits >> (35 - i * 5)) & 0x1f) as usize] as char);
        }
    }
    out
}

/// The `otpauth://` URI an authenticator app reads from the QR code.
pub fn otpauth_uri(issuer: &str, user: &str, secret: &[u8]) -> String {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20");
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP}",
        enc(issuer),
        enc(user),
        base32(secret),
        enc(issuer)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 Appendix B, SHA-1 rows (8 digits).
    #[test]
    fn rfc6238_vectors() {
        let secret = b"12345678901234567890";
        let rows = [
            (59, 94287082),
            (1111111109, 7081804),
            (1111111111, 14050471),
            (1234567890, 89005924),
            (2000000000, 69279037),
            (20000000000i64, 65353130),
        ];
        for (t, want) in rows {
            assert_eq!(hotp(secret, (t / 30) as u64, 8), want, "T={t}");
        }
        // Six digits are the last six of the same value.
        assert_eq!(code_at_step(secret, 59 / 30), "287082");
    }

    /// RFC 4226 Appendix D.
    #[test]
    fn rfc4226_vectors() {
        let want = [755224, 287082, 359152, 969429, 338314, 254676, 287922, 162583, 399871, 520489];
        for (i, w) in want.iter().enumerate() {
            assert_eq!(hotp(b"12345678901234567890", i as u64, 6), *w);
        }
    }

    #[test]
    fn drift_window() {
        let s = [7u8; 20];
        let now = 1_800_000_000;
        let step = step_at(now);
        assert_eq!(matching_step(&s, &code_at_step(&s, step), now), Some(step));
        assert_eq!(matching_step(&s, &code_at_step(&s, step - 1), now), Some(step - 1));
        assert_eq!(matching_step(&s, &code_at_step(&s, step + 1), now), Some(step + 1));
        assert_eq!(matching_step(&s, &code_at_step(&s, step - 2), now), None, "two steps ago is too old");
        assert_eq!(matching_step(&s, "12345", now), None);
        assert_eq!(matching_step(&s, "12345a", now), None);
    }

    #[test]
    fn base32_rfc4648() {
        for (input, want) in [
            ("", ""),
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foo", "MZXW6"),
            ("foob", "MZXW6YQ"),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI"),
        ] {
            assert_eq!(base32(input.as_bytes()), want);
        }
        assert!(
            otpauth_uri("poort", "alice smith", &[0u8; 20])
                .starts_with("otpauth://totp/poort:alice%20smith?secret=AAAA")
        );
    }
}
