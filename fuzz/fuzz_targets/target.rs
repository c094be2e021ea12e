//! The request-target normaliser: never panics, and whatever it accepts, its wire form parses
//! back to the same canonical target (so poort and the upstream read one path).
#![no_main]
use libfuzzer_sys::fuzz_target;
use poort::request::Target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    if let Ok(t) = Target::parse(raw) {
        let wire = t.forward_form(t.path());
        assert_eq!(Target::parse(&wire).as_ref(), Ok(&t), "wire form {wire:?} of {raw:?}");
        assert!(t.path().starts_with('/') && !t.path().contains("/../") && !t.path().contains('\\'));
    }
});
