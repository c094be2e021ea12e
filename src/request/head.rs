//! The raw HTTP/1 request head, checked byte by byte before the HTTP library reads it
//! (RFC 9112, strictly): the request line, every field line ending in CRLF, field names as
//! tokens with nothing between name and colon, no obs-fold, no NUL or bare CR in values, and
//! exactly one way to know where the body ends. A library that repairs (drops a duplicate
//! length, reads a bare LF as a line end, prefers chunked over a length) is never given the
//! chance. Also the chunked body framing, for the same reason. Pure.

use super::Reject;
use super::target::{MAX_TARGET_LEN, TargetError};

/// The most bytes one request head may take (request line and fields).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most field lines in one head.
pub const MAX_FIELDS: usize = super::MAX_HEADERS;

/// How a checked request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    Length(u64),
    Chunked,
    /// The request asks to switch protocols: what follows may not be HTTP.
    Upgrade,
}

/// Where the head that starts `buf` ends (just past its empty line), if it is complete. A
/// line end is LF here, so that a head using bare LF is found (and then refused).
pub fn head_end(buf: &[u8]) -> Option<usize> {
    head_end_from(buf, 0)
}

/// As `head_end`, for a buffer whose first `from` bytes were looked at already.
pub fn head_end_from(buf: &[u8], from: usize) -> Option<usize> {
    // A line end that straddles the old and the new bytes is up to two bytes back.
    let mut from = from.saturating_sub(2).min(buf.len());
    while let Some(i) = buf[from..].iter().position(|b| *b == b'\n') {
        let at = from + i;
        match &buf[at + 1..] {
            [b'\n', ..] => return Some(at + 2),
            [b'\r', b'\n', ..] => return Some(at + 3),
            [b'\r'] | [] => return None,
            _ => from = at + 1,
        }
    }
    None
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Checks one complete head (as `head_end` delimits it) and says how its body is framed.
pub fn check_head(head: &[u8]) -> Result<Framing, Reject> {
    if head.len() > MAX_HEAD_BYTES {
        return Err(Reject::HeadersTooLarge);
    }
    // Every LF ends a line and must follow a CR; a CR anywhere else is refused too.
    for (i, &b) in head.iter().enumerate() {
        match b {
            b'\n' if i == 0 || head[i - 1] != b'\r' => return Err(Reject::BareLineFeed),
            b'\r' if head.get(i + 1) != Some(&b'\n') => return Err(Reject::BareCarriageReturn),
            0 => return Err(Reject::BadHeaderValue),
            _ => {}
        }
    }
    let mut lines = head.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let http11 = check_request_line(request_line)?;

    let mut fields = 0usize;
    let mut length: Option<u64> = None;
    let mut lengths = 0usize;
    let mut chunked = None::<bool>;
    let mut upgrade = false;
    for line in lines {
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(Reject::ObsFold);
        }
        fields += 1;
        if fields > MAX_FIELDS {
            return Err(Reject::TooManyHeaders);
        }
        let colon = line.iter().position(|b| *b == b':').ok_or(Reject::BadHeaderName)?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.last().is_some_and(|b| *b == b' ' || *b == b'\t') {
            return Err(Reject::SpaceBeforeColon);
        }
        if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
            return Err(Reject::BadHeaderName);
        }
        // Field values: visible characters, spaces, tabs and obs-text; no other controls.
        if value.iter().any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f) {
            return Err(Reject::BadHeaderValue);
        }
        let value = value.trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            if lengths > 1 {
                return Err(Reject::BadContentLength);
            }
            if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
                return Err(Reject::BadContentLength);
            }
            let text = std::str::from_utf8(value).map_err(|_| Reject::BadContentLength)?;
            length = Some(text.parse().map_err(|_| Reject::BadContentLength)?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if chunked.is_some() || !http11 {
                return Err(Reject::BadTransferEncoding);
            }
            chunked = Some(value.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        }
    }
    match (length, chunked) {
        (Some(_), Some(_)) => Err(Reject::LengthAndChunked),
        (_, Some(false)) => Err(Reject::BadTransferEncoding),
        _ if upgrade && http11 => Ok(Framing::Upgrade),
        (None, Some(true)) => Ok(Framing::Chunked),
        (Some(0) | None, None) => Ok(Framing::None),
        (Some(n), None) => Ok(Framing::Length(n)),
    }
}

/// `METHOD SP request-target SP HTTP/1.x`; true for HTTP/1.1.
fn check_request_line(line: &[u8]) -> Result<bool, Reject> {
    let mut parts = line.split(|b| *b == b' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Reject::RequestLine);
    };
    if method.is_empty() || !method.iter().all(|b| is_tchar(*b)) {
        return Err(Reject::RequestLine);
    }
    if target.len() > MAX_TARGET_LEN {
        return Err(Reject::Target(TargetError::TooLong));
    }
    if target.is_empty() || target.iter().any(|b| *b <= b' ' || *b >= 0x7f) {
        return Err(Reject::RequestLine);
    }
    match version {
        b"HTTP/1.1" => Ok(true),
        b"HTTP/1.0" => Ok(false),
        _ => Err(Reject::RequestLine),
    }
}

/// Where a chunked body is (RFC 9112 §7.1): the parser is fed bytes as they arrive and says
/// how many of them belong to the body and whether the body has ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunked {
    Size {
        value: u64,
        digits: u8,
    },
    /// After `;` in a chunk line, up to its CR.
    Extension {
        value: u64,
        len: usize,
    },
    /// A CR was seen at the end of a chunk line.
    SizeLf {
        value: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// Trailer section: `len` bytes into the current line.
    Trailer {
        len: usize,
        total: usize,
        cr: bool,
    },
    Done,
}

/// The most bytes of chunk extensions on one line, and of trailer fields in all.
const MAX_CHUNK_EXT: usize = 1024;
const MAX_TRAILERS: usize = 8 * 1024;

impl Default for Chunked {
    fn default() -> Chunked {
        Chunked::Size { value: 0, digits: 0 }
    }
}

impl Chunked {
    /// Consumes bytes of `input` up to the end of the body; returns how many it took, or why
    /// the framing is broken.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, Reject> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            *self = match std::mem::take(self) {
                Chunked::Done => {
                    *self = Chunked::Done;
                    return Ok(i);
                }
                Chunked::Data { left } => {
                    let n = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    i += n;
                    let left = left - n as u64;
                    *self = if left == 0 { Chunked::DataCr } else { Chunked::Data { left } };
                    continue;
                }
                Chunked::Size { value, digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if digits >= 15 {
                            return Err(Reject::BadChunk);
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        Chunked::Size { value: value * 16 + d, digits: digits + 1 }
                    }
                    b';' if digits > 0 => Chunked::Extension { value, len: 0 },
                    b'\r' if digits > 0 => Chunked::SizeLf { value },
                    _ => return Err(Reject::BadChunk),
                },
                Chunked::Extension { value, len } => match b {
                    b'\r' => Chunked::SizeLf { value },
                    b'\t' | b' '..=b'~' if len < MAX_CHUNK_EXT => Chunked::Extension { value, len: len + 1 },
                    _ => return Err(Reject::BadChunk),
                },
                Chunked::SizeLf { value } => match b {
                    b'\n' if value == 0 => Chunked::Trailer { len: 0, total: 0, cr: false },
                    b'\n' => Chunked::Data { left: value },
                    _ => return Err(Reject::BadChunk),
                },
                Chunked::DataCr => match b {
                    b'\r' => Chunked::DataLf,
                    _ => return Err(Reject::BadChunk),
                },
                Chunked::DataLf => match b {
                    b'\n' => Chunked::default(),
                    _ => return Err(Reject::BadChunk),
                },
                Chunked::Trailer { len, total, cr } => {
                    if total >= MAX_TRAILERS {
                        return Err(Reject::BadChunk);
                    }
                    match (b, cr) {
                        (b'\n', true) if len == 0 => Chunked::Done,
                        (b'\n', true) => Chunked::Trailer { len: 0, total: total + 1, cr: false },
                        (_, true) | (b'\n', false) | (0, _) => return Err(Reject::BadChunk),
                        (b'\r', false) => Chunked::Trailer { len, total: total + 1, cr: true },
                        (b' ' | b'\t', false) if len == 0 => return Err(Reject::ObsFold),
                        _ => Chunked::Trailer { len: len + 1, total: total + 1, cr: false },
                    }
                }
            };
            i += 1;
            if *self == Chunked::Done {
                return Ok(i);
            }
        }
        Ok(i)
    }

    pub fn done(&self) -> bool {
        *self == Chunked::Done
    }

    /// Decodes: consumes framing bytes of `input` up to and including the next run of chunk
    /// data (or the end of the body), and returns how many bytes it consumed and where in
    /// `input` that data lies (empty when `input` held only framing).
    pub fn next_data(&mut self, input: &[u8]) -> Result<(usize, std::ops::Range<usize>), Reject> {
        let mut i = 0;
        while i < input.len() && !self.done() {
            if let Chunked::Data { left } = *self {
                let n = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                let start = i;
                i += self.feed(&input[i..i + n])?;
                return Ok((i, start..i));
            }
            i += self.feed(&input[i..=i])?;
        }
        Ok((i, i..i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(s: &str) -> Result<Framing, Reject> {
        let bytes = s.as_bytes();
        let end = head_end(bytes).expect("a complete head");
        assert_eq!(end, bytes.len(), "the head ends where the test says");
        check_head(bytes)
    }

    /// A field name passes with RFC 9110's tchar (letters, digits and fifteen marks) and with
    /// nothing else: every other byte in a name is refused (a colon ends the name).
    #[test]
    fn a_name_is_tchar_only() {
        let marks = b"!#$%&'*+-.^_`|~";
        for b in (0..=255u8).filter(|b| *b != b':') {
            let mut head = b"GET / HTTP/1.1\r\nX-A".to_vec();
            head.push(b);
            head.extend_from_slice(b"B: v\r\n\r\n");
            let tchar = b.is_ascii_alphanumeric() || marks.contains(&b);
            assert_eq!(check_head(&head).is_ok(), tchar, "a name with byte {b:#04x}");
        }
    }

    #[test]
    fn heads() {
        use Reject::*;
        let ok = [
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", Framing::None),
            ("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n", Framing::Length(5)),
            ("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", Framing::None),
            ("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n", Framing::Chunked),
            ("GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", Framing::Upgrade),
            ("GET / HTTP/1.0\r\nUpgrade: websocket\r\n\r\n", Framing::None),
            ("GET / HTTP/1.1\r\nX-Empty:\r\nUser-Agent: caf\u{e9}\r\n\r\n", Framing::None),
        ];
        for (head, want) in ok {
            assert_eq!(check(head), Ok(want), "{head:?}");
        }
        let bad = [
            ("GET / HTTP/1.1\nHost: a\n\n", BareLineFeed),
            ("GET / HTTP/1.1\r\nHost: a\n\r\n", BareLineFeed),
            ("GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", BareCarriageReturn),
            ("GET / HTTP/1.1\r\nHost: a\r\n x\r\n\r\n", ObsFold),
            ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", SpaceBeforeColon),
            ("GET / HTTP/1.1\r\nHost\t: a\r\n\r\n", SpaceBeforeColon),
            ("GET / HTTP/1.1\r\nHo st: a\r\n\r\n", BadHeaderName),
            ("GET / HTTP/1.1\r\n: a\r\n\r\n", BadHeaderName),
            ("GET / HTTP/1.1\r\nNoColon\r\n\r\n", BadHeaderName),
            ("GET / HTTP/1.1\r\nX: a\0b\r\n\r\n", BadHeaderValue),
            ("GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n", BadHeaderValue),
            ("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", LengthAndChunked),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", LengthAndChunked),
            ("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", BadContentLength),
            ("POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n", BadContentLength),
            ("POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n", BadContentLength),
            ("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", BadContentLength),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", BadTransferEncoding),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", BadTransferEncoding),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                BadTransferEncoding,
            ),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", BadTransferEncoding),
            ("GET  / HTTP/1.1\r\n\r\n", RequestLine),
            ("GET / HTTP/1.1 \r\n\r\n", RequestLine),
            ("GET / HTTP/2.0\r\n\r\n", RequestLine),
            ("PRI * HTTP/2.0\r\n\r\n", RequestLine),
            ("G(T / HTTP/1.1\r\n\r\n", RequestLine),
            ("GET /a\x7fb HTTP/1.1\r\n\r\n", RequestLine),
        ];
        for (head, want) in bad {
            let bytes = head.as_bytes();
            let end = head_end(bytes).unwrap_or(bytes.len());
            assert_eq!(check_head(&bytes[..end]), Err(want), "{head:?}");
        }
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_TARGET_LEN));
        assert_eq!(check(&long), Err(Target(TargetError::TooLong)));
        let many: String = (0..=MAX_FIELDS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(check(&format!("GET / HTTP/1.1\r\n{many}\r\n")), Err(TooManyHeaders));
    }

    #[test]
    fn head_ends() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nBODY"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nBODY"), Some(16));
    }

    proptest::proptest! {
        /// Searching a growing buffer from where the last search stopped finds the same end.
        #[test]
        fn searching_in_steps_finds_the_same_end(
            raw in proptest::collection::vec(proptest::sample::select(vec![b'a', b'\r', b'\n', b':']), 0..60),
            cut in 0usize..60,
        ) {
            let cut = cut.min(raw.len());
            let whole = head_end(&raw);
            let stepped = match head_end_from(&raw[..cut], 0) {
                Some(e) => Some(e),
                None => head_end_from(&raw, cut),
            };
            proptest::prop_assert_eq!(whole, stepped);
        }
    }

    fn chunks(input: &[u8], step: usize) -> Result<(usize, bool), Reject> {
        let mut c = Chunked::default();
        let mut used = 0;
        for part in input.chunks(step) {
            let n = c.feed(part)?;
            used += n;
            if c.done() {
                break;
            }
        }
        Ok((used, c.done()))
    }

    #[test]
    fn chunked_bodies() {
        let good: &[u8] = b"5\r\nhello\r\n1;ext=1\r\n!\r\n0\r\nX-Trailer: 1\r\n\r\nGET /next";
        for step in [1, 2, 3, 7, 100] {
            assert_eq!(chunks(good, step), Ok((good.len() - 9, true)), "step {step}");
        }
        assert_eq!(chunks(b"0\r\n\r\n", 1), Ok((5, true)));
        assert_eq!(chunks(b"A\r\n0123456789\r\n", 4), Ok((15, false)));
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhelloX\r\n",
            b"x\r\n",
            b"\r\n",
            b"-1\r\n",
            b"0\r\n\n",
            b"0\r\nX: 1\n\r\n",
            b"0\r\n folded\r\n\r\n",
            b"1000000000000000\r\n",
            b"5;\x01\r\n",
        ] {
            assert!(chunks(bad, 1).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
