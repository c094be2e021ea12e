//! Front-door checks on a parsed request, before anything else looks at it: the canonical
//! target, the one Host, bounded headers, strict framing, the allowed methods and the client
//! address. Pure: no I/O, no clock. A rejection maps to a fixed status and a constant page.

pub mod head;
pub mod headers;
mod target;

pub use target::{MAX_TARGET_LEN, Target, TargetError, fold_case};

use std::net::IpAddr;

use http::{HeaderMap, Method, StatusCode, Uri, Version, header};
use ipnet::IpNet;

/// Most header fields in one request.
pub const MAX_HEADERS: usize = 100;
/// Most bytes of header names and values together (hyper bounds the raw head as well).
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// Most bytes of cookies, all `Cookie` fields together.
pub const MAX_COOKIE_BYTES: usize = 8 * 1024;
/// Longest Host value.
const MAX_HOST_LEN: usize = 255;

/// Why the front door refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("bad request target: {0}")]
    Target(TargetError),
    #[error("missing or duplicate host")]
    HostCount,
    #[error("malformed host")]
    BadHost,
    #[error("host header and request authority differ")]
    HostMismatch,
    #[error("too many header fields")]
    TooManyHeaders,
    #[error("header fields too large")]
    HeadersTooLarge,
    #[error("cookies too large")]
    CookiesTooLarge,
    #[error("content-length together with transfer-encoding")]
    LengthAndChunked,
    #[error("transfer-encoding other than a single chunked")]
    BadTransferEncoding,
    #[error("duplicate or invalid content-length")]
    BadContentLength,
    #[error("method not allowed")]
    Method,
    #[error("a line ends in a bare LF")]
    BareLineFeed,
    #[error("a CR that does not end a line")]
    BareCarriageReturn,
    #[error("a header field folded over lines")]
    ObsFold,
    #[error("whitespace between a header name and its colon")]
    SpaceBeforeColon,
    #[error("malformed header name")]
    BadHeaderName,
    #[error("control character in a header value")]
    BadHeaderValue,
    #[error("malformed request line")]
    RequestLine,
    #[error("malformed chunked body")]
    BadChunk,
}

impl Reject {
    pub fn status(self) -> StatusCode {
        match self {
            Reject::Target(TargetError::TooLong) => StatusCode::URI_TOO_LONG,
            Reject::TooManyHeaders | Reject::HeadersTooLarge | Reject::CookiesTooLarge => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            Reject::Method => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// A stable short name for logs, audit records and metrics.
    pub fn code(self) -> &'static str {
        match self {
            Reject::Target(e) => match e {
                TargetError::TooLong => "target_too_long",
                TargetError::NotOriginForm => "target_not_origin_form",
                TargetError::ForbiddenByte => "target_forbidden_byte",
                TargetError::BadEscape => "target_bad_escape",
                TargetError::EncodedDelimiter => "target_encoded_delimiter",
                TargetError::Control => "target_control_byte",
                TargetError::InvalidUtf8 => "target_invalid_utf8",
                TargetError::DotSegment => "target_dot_segment",
                TargetError::EmptySegment => "target_empty_segment",
                TargetError::PathParameter => "target_path_parameter",
                TargetError::Backslash => "target_backslash",
                TargetError::BadQuery => "target_bad_query",
            },
            Reject::HostCount => "host_count",
            Reject::BadHost => "host_malformed",
            Reject::HostMismatch => "host_mismatch",
            Reject::TooManyHeaders => "too_many_headers",
            Reject::HeadersTooLarge => "headers_too_large",
            Reject::CookiesTooLarge => "cookies_too_large",
            Reject::LengthAndChunked => "framing_length_and_chunked",
            Reject::BadTransferEncoding => "framing_transfer_encoding",
            Reject::BadContentLength => "framing_content_length",
            Reject::Method => "method_not_allowed",
            Reject::BareLineFeed => "framing_bare_lf",
            Reject::BareCarriageReturn => "framing_bare_cr",
            Reject::ObsFold => "framing_obs_fold",
            Reject::SpaceBeforeColon => "framing_space_before_colon",
            Reject::BadHeaderName => "header_bad_name",
            Reject::BadHeaderValue => "header_bad_value",
            Reject::RequestLine => "request_line_malformed",
            Reject::BadChunk => "framing_bad_chunk",
        }
    }
}

/// What the front door hands on: the canonical target and host, and the declared body length.
#[derive(Debug, Clone)]
pub struct Front {
    pub target: Target,
    /// Lower-case host name without the port.
    pub host: String,
    pub content_length: Option<u64>,
}

/// Checks one request head. `uri` and `headers` are as the HTTP library parsed them; for
/// HTTP/1 the URI is the raw request target.
pub fn check(method: &Method, uri: &Uri, version: Version, headers: &HeaderMap) -> Result<Front, Reject> {
    check_method(method)?;
    check_header_bounds(headers)?;
    let content_length = check_framing(version, headers)?;
    let raw_target = match (version, uri.scheme()) {
        // HTTP/2 carries the authority in its own pseudo-header; the path is origin-form.
        (Version::HTTP_2, _) => uri.path_and_query().map(|p| p.as_str()),
        // HTTP/1 absolute-form (a proxy request) or authority-form: not for a gateway.
        (_, Some(_)) => None,
        _ => uri.path_and_query().map(|p| p.as_str()),
    };
    let raw_target = raw_target.ok_or(Reject::Target(TargetError::NotOriginForm))?;
    let target = Target::parse(raw_target).map_err(Reject::Target)?;
    let host = request_host(version, uri, headers)?;
    Ok(Front { target, host, content_length })
}

fn check_method(method: &Method) -> Result<(), Reject> {
    match *method {
        Method::GET | Method::HEAD | Method::POST | Method::PUT | Method::PATCH | Method::DELETE | Method::OPTIONS => {
            Ok(())
        }
        _ => Err(Reject::Method),
    }
}

fn check_header_bounds(headers: &HeaderMap) -> Result<(), Reject> {
    if headers.len() > MAX_HEADERS {
        return Err(Reject::TooManyHeaders);
    }
    let mut total = 0usize;
    let mut cookies = 0usize;
    for (name, value) in headers {
        total += name.as_str().len() + value.len();
        if name == header::COOKIE {
            cookies += value.len();
        }
    }
    if total > MAX_HEADER_BYTES {
        return Err(Reject::HeadersTooLarge);
    }
    if cookies > MAX_COOKIE_BYTES {
        return Err(Reject::CookiesTooLarge);
    }
    Ok(())
}

/// RFC 9112 §6: exactly one way to know where the body ends.
fn check_framing(version: Version, headers: &HeaderMap) -> Result<Option<u64>, Reject> {
    let mut te = headers.get_all(header::TRANSFER_ENCODING).iter();
    let mut cl = headers.get_all(header::CONTENT_LENGTH).iter();
    let (te1, te2) = (te.next(), te.next());
    let (cl1, cl2) = (cl.next(), cl.next());
    if te1.is_some() && cl1.is_some() {
        return Err(Reject::LengthAndChunked);
    }
    if let Some(te) = te1 {
        let single_chunked = te2.is_none()
            && version == Version::HTTP_11
            && te.to_str().map(|s| s.trim().eq_ignore_ascii_case("chunked")).unwrap_or(false);
        if !single_chunked {
            return Err(Reject::BadTransferEncoding);
        }
    }
    match (cl1, cl2) {
        (None, _) => Ok(None),
        (Some(_), Some(_)) => Err(Reject::BadContentLength),
        (Some(v), None) => {
            let s = v.to_str().map_err(|_| Reject::BadContentLength)?;
            if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Reject::BadContentLength);
            }
            s.parse().map(Some).map_err(|_| Reject::BadContentLength)
        }
    }
}

fn request_host(version: Version, uri: &Uri, headers: &HeaderMap) -> Result<String, Reject> {
    let mut values = headers.get_all(header::HOST).iter();
    let (first, second) = (values.next(), values.next());
    if second.is_some() {
        return Err(Reject::HostCount);
    }
    let from_header = match first {
        Some(v) => Some(parse_host(v.as_bytes())?),
        None => None,
    };
    let from_uri = match uri.authority() {
        Some(a) => Some(parse_host(a.as_str().as_bytes())?),
        None => None,
    };
    match (from_header, from_uri) {
        (Some(h), Some(u)) if h != u => Err(Reject::HostMismatch),
        (Some(h), _) => Ok(h),
        (None, Some(u)) if version == Version::HTTP_2 => Ok(u),
        _ => Err(Reject::HostCount),
    }
}

/// Parses `host[:port]` into a lower-case name. Accepts DNS names, IPv4 and bracketed IPv6.
pub fn parse_host(raw: &[u8]) -> Result<String, Reject> {
    if raw.is_empty() || raw.len() > MAX_HOST_LEN {
        return Err(Reject::BadHost);
    }
    let s = std::str::from_utf8(raw).map_err(|_| Reject::BadHost)?;
    let (name, port) = if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']').ok_or(Reject::BadHost)?;
        let inner = &rest[..end];
        inner.parse::<std::net::Ipv6Addr>().map_err(|_| Reject::BadHost)?;
        (&s[..end + 2], &rest[end + 1..])
    } else {
        match s.find(':') {
            Some(i) => (&s[..i], &s[i..]),
            None => (s, ""),
        }
    };
    if !port.is_empty() {
        let digits = port.strip_prefix(':').ok_or(Reject::BadHost)?;
        if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Reject::BadHost);
        }
    }
    if !name.starts_with('[') {
        let ok = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
            });
        if !ok {
            return Err(Reject::BadHost);
        }
    }
    Ok(name.to_ascii_lowercase())
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the right-most
/// `X-Forwarded-For` entry that is not itself a trusted proxy (docs/threat-model.md, rule 4).
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut addr = peer;
    // Walk the fields from the last one backwards, each field's list right to left.
    let fields: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
    for field in fields.iter().rev() {
        let Ok(list) = field.to_str() else { return addr };
        for entry in list.rsplit(',') {
            match entry.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    addr = ip;
                    if !is_trusted(&ip) {
                        return ip;
                    }
                }
                Err(_) => return addr,
            }
        }
    }
    addr
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(lines: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in lines {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    fn run(method: &str, target: &str, headers: &[(&str, &str)]) -> Result<Front, Reject> {
        let uri: Uri = target.parse().unwrap();
        check(&method.parse().unwrap(), &uri, Version::HTTP_11, &head(headers))
    }

    #[test]
    fn framing_and_hosts() {
        assert!(run("GET", "/", &[("host", "Gate.Example:8443")]).is_ok_and(|f| f.host == "gate.example"));
        assert_eq!(run("GET", "/", &[]).unwrap_err(), Reject::HostCount);
        assert_eq!(run("GET", "/", &[("host", "a"), ("host", "b")]).unwrap_err(), Reject::HostCount);
        assert_eq!(run("GET", "/", &[("host", "a b")]).unwrap_err(), Reject::BadHost);
        assert_eq!(run("GET", "/", &[("host", "a:x")]).unwrap_err(), Reject::BadHost);
        assert_eq!(run("GET", "/", &[("host", &"a".repeat(300))]).unwrap_err(), Reject::BadHost);
        assert!(run("GET", "/", &[("host", "[::1]:8443")]).is_ok_and(|f| f.host == "[::1]"));
        let te_cl = [("host", "a"), ("content-length", "3"), ("transfer-encoding", "chunked")];
        assert_eq!(run("POST", "/", &te_cl).unwrap_err(), Reject::LengthAndChunked);
        let te2 = [("host", "a"), ("transfer-encoding", "chunked, chunked")];
        assert_eq!(run("POST", "/", &te2).unwrap_err(), Reject::BadTransferEncoding);
        let te_dup = [("host", "a"), ("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")];
        assert_eq!(run("POST", "/", &te_dup).unwrap_err(), Reject::BadTransferEncoding);
        let te_gzip = [("host", "a"), ("transfer-encoding", "gzip")];
        assert_eq!(run("POST", "/", &te_gzip).unwrap_err(), Reject::BadTransferEncoding);
        let cl_dup = [("host", "a"), ("content-length", "3"), ("content-length", "3")];
        assert_eq!(run("POST", "/", &cl_dup).unwrap_err(), Reject::BadContentLength);
        let cl_sign = [("host", "a"), ("content-length", "+3")];
        assert_eq!(run("POST", "/", &cl_sign).unwrap_err(), Reject::BadContentLength);
        assert!(run("POST", "/", &[("host", "a"), ("content-length", "3")]).is_ok_and(|f| f.content_length == Some(3)));
        assert_eq!(run("TRACE", "/", &[("host", "a")]).unwrap_err(), Reject::Method);
        assert_eq!(run("GET", "http://a/", &[("host", "a")]).unwrap_err().code(), "target_not_origin_form");
        let big_cookie = "c=".to_owned() + &"x".repeat(MAX_COOKIE_BYTES);
        assert_eq!(run("GET", "/", &[("host", "a"), ("cookie", &big_cookie)]).unwrap_err(), Reject::CookiesTooLarge);
    }

    #[test]
    fn forwarded_for_counts_only_from_trusted_peers() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = head(&[("x-forwarded-for", "1.2.3.4, 10.0.0.7")]);
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(client_addr(peer, &h, &trusted), "1.2.3.4".parse::<IpAddr>().unwrap());
        let outsider: IpAddr = "8.8.8.8".parse().unwrap();
        assert_eq!(client_addr(outsider, &h, &trusted), outsider);
        let spoof = head(&[("x-forwarded-for", "127.0.0.1, 5.6.7.8")]);
        assert_eq!(client_addr(peer, &spoof, &trusted), "5.6.7.8".parse::<IpAddr>().unwrap());
        let garbage = head(&[("x-forwarded-for", "nonsense")]);
        assert_eq!(client_addr(peer, &garbage, &trusted), peer);
    }
}
