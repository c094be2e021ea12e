//! Cookie decoding: a value is a token only in its one canonical encoding, and finding a
//! cookie in arbitrary header bytes never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use poort::session::cookie;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(raw) = cookie::decode_token(s) {
            assert_eq!(cookie::encode_token(&raw), s);
        }
    }
    let _ = cookie::find([data].into_iter(), cookie::SESSION_COOKIE);
    let _ = cookie::without_poort(data);
});
