//! The raw request head and chunked framing checks: any bytes are judged without panicking;
//! a head that passes ends where `head_end` says; a chunked body never takes more bytes than
//! it is given, in one piece or fed byte by byte.
#![no_main]
use libfuzzer_sys::fuzz_target;
use poort::request::head::{Chunked, check_head, head_end};

fuzz_target!(|data: &[u8]| {
    if let Some(end) = head_end(data) {
        assert!(end <= data.len());
        let _ = check_head(&data[..end]);
    }
    let mut whole = Chunked::default();
    let taken = whole.feed(data);
    if let Ok(n) = taken {
        assert!(n <= data.len());
    }
    let mut bytewise = Chunked::default();
    let mut used = 0;
    let mut failed = false;
    for b in data {
        match bytewise.feed(std::slice::from_ref(b)) {
            Ok(n) => used += n,
            Err(_) => {
                failed = true;
                break;
            }
        }
        if bytewise.done() {
            break;
        }
    }
    // The same framing, whatever the pieces.
    match taken {
        Ok(n) => assert!(!failed && used == n, "whole {n}, bytewise {used}"),
        Err(_) => assert!(failed),
    }
});
