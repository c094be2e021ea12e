//! Config resolution: any text gives a config or a list of problems, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(problems) = poort::config::parse(text, std::path::Path::new("/nonexistent")) {
            assert!(!problems.0.is_empty());
        }
    }
});
