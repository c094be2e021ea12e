//! Mitigation rules: any text compiles or lists problems; compiled rules match any request
//! without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match poort::mitigate::rules::compile(text) {
        Ok(rules) => {
            let headers = http::HeaderMap::new();
            for (path, raw) in [("/", "/"), ("/a/b/c", "/a/b/c?x=%2e%2e"), (text.get(..20).unwrap_or(""), text)] {
                let facts = poort::mitigate::Facts {
                    method: "GET",
                    path: std::borrow::Cow::Borrowed(path),
                    raw_target: raw,
                    headers: &headers,
                    client: "192.0.2.1".parse().expect("a literal address"),
                    app: Some("wiki"),
                };
                let _ = rules.check(&facts);
            }
        }
        Err(problems) => assert!(!problems.is_empty()),
    }
});
