//! Host parsing: never panics; an accepted host is lower case and accepted again as itself.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = poort::request::parse_host(data) {
        assert_eq!(h, h.to_ascii_lowercase());
        assert_eq!(poort::request::parse_host(h.as_bytes()).as_deref(), Ok(h.as_str()));
    }
});
