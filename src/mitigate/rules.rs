//! Mitigation rules: the file format, its checking, and matching. Pure: `compile` turns file
//! text into `Rules` or every problem with its place; `Rules::check` decides for one request.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// Counts up with every published file; a gateway never goes back to a lower one.
    version: Option<u64>,
    /// After this time (RFC 3339) the file is no longer accepted.
    expires: Option<toml::Value>,
    #[serde(rename = "rule")]
    rules: Option<Vec<FileRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    id: Option<String>,
    reason: Option<String>,
    action: Option<String>,
    /// For `throttle`: `N/s`, `N/m` or `N/h` per client address.
    rate: Option<String>,
    path_exact: Option<String>,
    path_prefix: Option<String>,
    path_glob: Option<String>,
    raw: Option<Vec<String>>,
    method: Option<Vec<String>>,
    header: Option<Vec<FileHeader>>,
    client: Option<Vec<String>>,
    app: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHeader {
    name: String,
    present: Option<bool>,
    equals: Option<String>,
    contains: Option<String>,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// 403 with the maintenance-style page.
    Deny,
    /// 429 once a client address made more than `count` requests within `per_secs`.
    Throttle { count: u32, per_secs: u32 },
    /// Audit and count, then carry on.
    Log,
}

/// Features of the raw request target (path and query, as sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawFeature {
    EncodedDot,
    EncodedSlash,
    DoubleEncoding,
    DotDot,
    Semicolon,
    Backslash,
    NullByte,
    NonAscii,
}

impl RawFeature {
    const ALL: [(&'static str, RawFeature); 8] = [
        ("encoded_dot", RawFeature::EncodedDot),
        ("encoded_slash", RawFeature::EncodedSlash),
        ("double_encoding", RawFeature::DoubleEncoding),
        ("dot_dot", RawFeature::DotDot),
        ("semicolon", RawFeature::Semicolon),
        ("backslash", RawFeature::Backslash),
        ("null_byte", RawFeature::NullByte),
        ("non_ascii", RawFeature::NonAscii),
    ];

    /// Whether the raw target shows this feature (case-insensitive for escapes).
    pub fn present(self, raw: &str) -> bool {
        let lower = raw.to_ascii_lowercase();
        match self {
            RawFeature::EncodedDot => lower.contains("%2e"),
            RawFeature::EncodedSlash => lower.contains("%2f") || lower.contains("%5c"),
            RawFeature::DoubleEncoding => lower.contains("%25"),
            RawFeature::DotDot => {
                lower.contains("..") || lower.contains("%2e%2e") || lower.contains(".%2e") || lower.contains("%2e.")
            }
            RawFeature::Semicolon => lower.contains(';') || lower.contains("%3b"),
            RawFeature::Backslash => lower.contains('\\') || lower.contains("%5c"),
            RawFeature::NullByte => lower.contains("%00"),
            RawFeature::NonAscii => {
                !raw.is_ascii()
                    || lower.as_bytes().windows(3).any(|w| w[0] == b'%' && matches!(w[1], b'8'..=b'9' | b'a'..=b'f'))
            }
        }
    }
}

/// Header values are compared as bytes, ASCII letters without regard to case: a value that
/// is not valid UTF-8 is still a value a rule must see.
#[derive(Debug, Clone)]
enum HeaderTest {
    Present(bool),
    /// Lower case.
    Equals(Vec<u8>),
    /// Lower case.
    Contains(Vec<u8>),
}

#[derive(Debug, Clone)]
enum PathTest {
    Exact(String),
    Prefix(String),
    Glob(Vec<String>),
}

/// One checked rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    pub reason: String,
    pub action: Action,
    path: Option<PathTest>,
    raw: Vec<RawFeature>,
    methods: Vec<String>,
    headers: Vec<(String, HeaderTest)>,
    clients: Vec<IpNet>,
    app: Option<String>,
}

/// The request facts rules look at.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    pub method: &'a str,
    /// The canonical path in the form rules match on: `Target::match_key`.
    pub path: std::borrow::Cow<'a, str>,
    /// The target as sent (path and query).
    pub raw_target: &'a str,
    pub headers: &'a http::HeaderMap,
    pub client: IpAddr,
    /// The app the request routes to, if any.
    pub app: Option<&'a str>,
}

impl<'a> Facts<'a> {
    /// The facts of a request the front door accepted.
    pub fn of(
        method: &'a str,
        target: &'a crate::request::Target,
        raw_target: &'a str,
        headers: &'a http::HeaderMap,
        client: IpAddr,
        app: Option<&'a str>,
    ) -> Facts<'a> {
        Facts { method, path: std::borrow::Cow::Borrowed(target.match_key()), raw_target, headers, client, app }
    }
}

/// A checked rule set, in file order.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub rules: Vec<Rule>,
    /// The file's `version`, if it gives one.
    pub version: Option<u64>,
    /// The file's `expires`, as a Unix time.
    pub expires: Option<i64>,
    /// The file says `rule = []` itself: no rules on purpose, not an empty or cut-off file.
    pub explicitly_empty: bool,
}

/// `*` matches within one segment, `**` any number of whole segments.
fn glob(pattern: &[String], segs: &[&str]) -> bool {
    match pattern.split_first() {
        None => segs.is_empty(),
        Some((p, rest)) if p == "**" => (0..=segs.len()).any(|i| glob(rest, &segs[i..])),
        Some((p, rest)) => match segs.split_first() {
            Some((s, more)) => segment_match(p.as_bytes(), s.as_bytes()) && glob(rest, more),
            None => false,
        },
    }
}

fn segment_match(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| segment_match(rest, &s[i..])),
        Some((c, rest)) => s.split_first().is_some_and(|(d, more)| c == d && segment_match(rest, more)),
    }
}

/// A path without its trailing slash (the root stays `/`): `/a/b/` and `/a/b` meet the same
/// rules, since many upstreams serve both alike.
fn without_trailing_slash(p: &str) -> &str {
    if p.len() > 1 { p.strip_suffix('/').unwrap_or(p) } else { p }
}

/// ASCII-case-insensitive search for lower-case `needle` in `hay`.
fn contains_folded(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

impl Rule {
    fn matches(&self, f: &Facts<'_>) -> bool {
        let path = without_trailing_slash(&f.path);
        let path_ok = match &self.path {
            None => true,
            Some(PathTest::Exact(p)) => path == p,
            Some(PathTest::Prefix(p)) => path.starts_with(p.as_str()) || path == p.trim_end_matches('/'),
            Some(PathTest::Glob(g)) => {
                let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
                glob(g, &segs)
            }
        };
        path_ok
            && self.raw.iter().all(|r| r.present(f.raw_target))
            // HEAD is GET without the body: an app answers it with its GET handler.
            && (self.methods.is_empty()
                || self.methods.iter().any(|m| m == f.method || (m == "GET" && f.method == "HEAD")))
            && self.headers.iter().all(|(name, t)| {
                let mut values = f.headers.get_all(name.as_str()).iter().map(|v| v.as_bytes());
                match t {
                    HeaderTest::Present(want) => f.headers.contains_key(name.as_str()) == *want,
                    HeaderTest::Equals(v) => values.any(|x| x.eq_ignore_ascii_case(v)),
                    HeaderTest::Contains(v) => values.any(|x| contains_folded(x, v)),
                }
            })
            && (self.clients.is_empty() || self.clients.iter().any(|n| n.contains(&f.client)))
            && self.app.as_deref().is_none_or(|a| f.app == Some(a))
    }
}

impl Rules {
    /// The first rule (in file order) that matches, with its position.
    pub fn check(&self, f: &Facts<'_>) -> Option<(usize, &Rule)> {
        self.rules.iter().enumerate().find(|(_, r)| r.matches(f))
    }
}

/// Parses `N/s`, `N/m` or `N/h` into (N, seconds).
fn parse_rate(s: &str) -> Option<(u32, u32)> {
    let (n, unit) = s.split_once('/')?;
    let n: u32 = n.trim().parse().ok().filter(|n| *n > 0)?;
    let secs = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return None,
    };
    Some((n, secs))
}

/// Checks a rules file completely; either every rule is good or nothing is returned but the
/// problems, each as `rule[ID].key: what (hint)`.
pub fn compile(text: &str) -> Result<Rules, Vec<String>> {
    let file: File = toml::from_str(text).map_err(|e| vec![format!("rules file: {}", e.message())])?;
    let mut problems = Vec::new();
    let mut rules = Vec::new();
    let explicitly_empty = file.rules.as_ref().is_some_and(Vec::is_empty);
    let expires = match &file.expires {
        None => None,
        Some(v) => {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Datetime(d) => d.to_string(),
                other => other.to_string(),
            };
            match humantime::parse_rfc3339_weak(&text) {
                Ok(t) => Some(t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)),
                Err(_) => {
                    problems
                        .push(format!("expires: {text:?} is not a time (hint: expires = \"2027-01-31T00:00:00Z\")"));
                    None
                }
            }
        }
    };
    for (i, r) in file.rules.unwrap_or_default().into_iter().enumerate() {
        let id = r.id.clone().unwrap_or_else(|| format!("#{i}"));
        // What the operator wrote, valid or not: a rule with a bad condition is reported for
        // that condition, not also as matching everything.
        let nonempty = |v: &Option<Vec<_>>| v.as_ref().is_some_and(|v| !v.is_empty());
        let has_condition = r.path_exact.is_some()
            || r.path_prefix.is_some()
            || r.path_glob.is_some()
            || nonempty(&r.raw)
            || nonempty(&r.method)
            || r.header.as_ref().is_some_and(|v| !v.is_empty())
            || nonempty(&r.client)
            || r.app.is_some();
        let mut bad = |key: &str, msg: String| problems.push(format!("rule[{id}].{key}: {msg}"));
        if r.id.as_deref().is_none_or(|s| s.is_empty() || s.len() > 64) {
            bad("id", "missing or longer than 64 characters (hint: id = \"CVE-2025-0001\")".into());
        }
        let action = match (r.action.as_deref(), r.rate.as_deref()) {
            (Some("deny"), None) => Some(Action::Deny),
            (Some("log"), None) => Some(Action::Log),
            (Some("throttle"), Some(rate)) => match parse_rate(rate) {
                Some((count, per_secs)) => Some(Action::Throttle { count, per_secs }),
                None => {
                    bad("rate", format!("{rate:?} is not a rate (hint: \"10/s\", \"60/m\" or \"100/h\")"));
                    None
                }
            },
            (Some("throttle"), None) => {
                bad("rate", "throttle needs a rate (hint: rate = \"10/m\")".into());
                None
            }
            (Some("deny" | "log"), Some(_)) => {
                bad("rate", "only throttle takes a rate".into());
                None
            }
            (other, _) => {
                bad("action", format!("{:?} is not deny, throttle or log", other.unwrap_or("")));
                None
            }
        };
        let paths = [r.path_exact.as_ref(), r.path_prefix.as_ref(), r.path_glob.as_ref()];
        if paths.iter().filter(|p| p.is_some()).count() > 1 {
            bad("path", "give one of path_exact, path_prefix, path_glob".into());
        }
        // Patterns are brought into the form requests are matched in: canonical (escapes
        // decoded, as the front door does) and case folded.
        let mut pattern = |key: &str, p: &str| -> String {
            // Letters beyond ASCII may be written as they are.
            let escaped: String =
                p.bytes().map(|b| if b.is_ascii() { (b as char).to_string() } else { format!("%{b:02X}") }).collect();
            match crate::request::Target::parse(&escaped) {
                Ok(t) if t.query().is_none() && !p.contains('?') => without_trailing_slash(t.match_key()).to_string(),
                _ => {
                    bad(key, format!("{p:?} is not a canonical path (hint: start with /, no .., //, ; or ?)"));
                    String::new()
                }
            }
        };
        let path = if let Some(p) = r.path_exact {
            Some(PathTest::Exact(pattern("path_exact", &p)))
        } else if let Some(p) = r.path_prefix {
            // A segment prefix: "/vpns" matches /vpns and /vpns/x, never /vpnsx.
            let p = pattern("path_prefix", &p);
            let p = if p.ends_with('/') { p } else { format!("{p}/") };
            Some(PathTest::Prefix(p))
        } else if let Some(g) = r.path_glob {
            let g = pattern("path_glob", &g);
            Some(PathTest::Glob(g.trim_start_matches('/').split('/').map(str::to_string).collect()))
        } else {
            None
        };
        let mut raw = Vec::new();
        for f in r.raw.unwrap_or_default() {
            match RawFeature::ALL.iter().find(|(n, _)| *n == f) {
                Some((_, feat)) => raw.push(*feat),
                None => {
                    let names: Vec<&str> = RawFeature::ALL.iter().map(|(n, _)| *n).collect();
                    bad("raw", format!("{f:?} is not a feature (hint: one of {})", names.join(", ")));
                }
            }
        }
        let methods: Vec<String> = r.method.unwrap_or_default().into_iter().map(|m| m.to_ascii_uppercase()).collect();
        let mut headers = Vec::new();
        for h in r.header.unwrap_or_default() {
            let name = h.name.to_ascii_lowercase();
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                bad("header", format!("{:?} is not a header name", h.name));
                continue;
            }
            let test = match (h.present, h.equals, h.contains) {
                (Some(p), None, None) => HeaderTest::Present(p),
                (None, Some(v), None) => HeaderTest::Equals(v.to_ascii_lowercase().into_bytes()),
                (None, None, Some(v)) => HeaderTest::Contains(v.to_ascii_lowercase().into_bytes()),
                _ => {
                    bad("header", format!("{name}: give exactly one of present, equals, contains"));
                    continue;
                }
            };
            headers.push((name, test));
        }
        let mut clients = Vec::new();
        for c in r.client.unwrap_or_default() {
            match c.parse::<IpNet>().or_else(|_| c.parse::<IpAddr>().map(IpNet::from)) {
                Ok(n) => clients.push(n),
                Err(_) => bad("client", format!("{c:?} is not an address or CIDR range")),
            }
        }
        if !has_condition {
            bad("match", "the rule has no condition and would match every request (hint: add path_prefix, raw, method, header, client or app)".into());
        }
        if let Some(action) = action {
            rules.push(Rule {
                id,
                reason: r.reason.unwrap_or_default(),
                action,
                path,
                raw,
                methods,
                headers,
                clients,
                app: r.app,
            });
        }
    }
    if problems.is_empty() {
        Ok(Rules { rules, version: file.version, expires, explicitly_empty })
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(method: &'a str, path: &'a str, raw: &'a str, headers: &'a http::HeaderMap) -> Facts<'a> {
        let path = crate::request::fold_case(path);
        Facts { method, path, raw_target: raw, headers, client: "192.0.2.7".parse().unwrap(), app: Some("wiki") }
    }

    #[test]
    fn matching() {
        let rules = compile(
            r#"
            [[rule]]
            id = "vpns"
            reason = "traversal target of CVE-2019-19781"
            action = "deny"
            path_prefix = "/vpns"
            [[rule]]
            id = "scanner"
            action = "log"
            header = [{ name = "User-Agent", contains = "SQLMAP" }]
            [[rule]]
            id = "admin-glob"
            action = "throttle"
            rate = "5/m"
            path_glob = "/wiki/*/admin/**"
            method = ["post"]
            [[rule]]
            id = "export"
            action = "deny"
            path_prefix = "/export"
            method = ["GET"]
            [[rule]]
            id = "lang-dotdot"
            action = "deny"
            raw = ["dot_dot"]
            app = "wiki"
            client = ["192.0.2.0/24"]
            "#,
        )
        .unwrap();
        let h = http::HeaderMap::new();
        let mut ua = http::HeaderMap::new();
        ua.insert("user-agent", "Mozilla sqlmap/1.7".parse().unwrap());
        let id = |f: Facts<'_>| rules.check(&f).map(|(_, r)| r.id.clone());
        assert_eq!(id(facts("GET", "/vpns/cfg", "/vpns/cfg", &h)).as_deref(), Some("vpns"));
        assert_eq!(id(facts("GET", "/vpns", "/vpns", &h)).as_deref(), Some("vpns"));
        assert_eq!(id(facts("GET", "/vpnsx", "/vpnsx", &h)), None, "segment prefix, not string prefix");
        assert_eq!(id(facts("GET", "/x", "/x", &ua)).as_deref(), Some("scanner"));
        assert_eq!(id(facts("POST", "/wiki/a/admin/b/c", "/wiki/a/admin/b/c", &h)).as_deref(), Some("admin-glob"));
        assert_eq!(id(facts("GET", "/wiki/a/admin/b", "/wiki/a/admin/b", &h)), None, "method must match");
        assert_eq!(id(facts("POST", "/wiki/a/b/admin", "/wiki/a/b/admin", &h)), None, "* is one segment");
        assert_eq!(id(facts("GET", "/wiki/p", "/wiki/p?lang=../../etc", &h)).as_deref(), Some("lang-dotdot"));
        assert_eq!(id(facts("GET", "/wiki/p", "/wiki/p?lang=en", &h)), None);
        assert!(matches!(rules.rules[2].action, Action::Throttle { count: 5, per_secs: 60 }));
        // A GET rule covers HEAD, which apps answer with their GET handler; not POST.
        assert_eq!(id(facts("HEAD", "/export/all", "/export/all", &h)).as_deref(), Some("export"));
        assert_eq!(id(facts("POST", "/export/all", "/export/all", &h)), None);
    }

    #[test]
    fn every_problem_is_reported() {
        let errs = compile(
            r#"
            [[rule]]
            id = "a"
            action = "block"
            path_prefix = "x"
            [[rule]]
            id = "b"
            action = "throttle"
            client = ["300.1.1.1"]
            [[rule]]
            id = "c"
            action = "deny"
            raw = ["weird"]
            [[rule]]
            id = "d"
            action = "log"
            "#,
        )
        .unwrap_err();
        let want =
            ["rule[a].action", "rule[a].path_prefix", "rule[b].rate", "rule[b].client", "rule[c].raw", "rule[d].match"];
        assert_eq!(errs.len(), want.len(), "{errs:#?}");
        for (e, w) in errs.iter().zip(want) {
            assert!(e.starts_with(w), "{e} should start with {w}");
        }
        assert!(compile("[[rule]]\nid = \"x\"\nactoin = \"deny\"\n").is_err(), "unknown keys are refused");
    }

    #[test]
    fn letter_case_trailing_slash_and_raw_header_bytes() {
        let rules = compile(
            r#"
            [[rule]]
            id = "admin"
            action = "deny"
            path_glob = "/whoami/Admin/**"
            [[rule]]
            id = "secret"
            action = "deny"
            path_exact = "/up/secret/"
            [[rule]]
            id = "caf"
            action = "deny"
            path_prefix = "/caf%C3%A9"
            [[rule]]
            id = "sqlmap"
            action = "deny"
            header = [{ name = "user-agent", contains = "SQLMap" }]
            "#,
        )
        .unwrap();
        let h = http::HeaderMap::new();
        let id = |path: &str, h: &http::HeaderMap| rules.check(&facts("GET", path, path, h)).map(|(_, r)| r.id.clone());
        for p in ["/whoami/admin/panel", "/WHOAMI/admin/panel", "/WhoAmI/ADMIN/x/y", "/whoami/admin/", "/whoami/admin"]
        {
            assert_eq!(id(p, &h).as_deref(), Some("admin"), "{p}");
        }
        // Letters an upstream comparing in Unicode reads as ASCII.
        assert_eq!(id("/whoam\u{131}/adm\u{131}n/x", &h).as_deref(), Some("admin"));
        for p in ["/up/secret", "/up/secret/", "/UP/Secret/"] {
            assert_eq!(id(p, &h).as_deref(), Some("secret"), "{p}");
        }
        assert_eq!(id("/up/secrets", &h), None);
        assert_eq!(id("/CAFÉ/x", &h), None, "only ASCII-mapped letters fold");
        assert_eq!(id("/café/x", &h).as_deref(), Some("caf"), "patterns are decoded like requests");
        let mut ua = http::HeaderMap::new();
        ua.insert("user-agent", http::HeaderValue::from_bytes(b"sqlmap\xff/1.0").unwrap());
        assert_eq!(id("/x", &ua).as_deref(), Some("sqlmap"), "a value that is not UTF-8 is still seen");
        // The globs docs/mitigation.md gives for Windows' aliases.
        let windows = compile(
            "[[rule]]\nid = \"ads\"\naction = \"deny\"\npath_glob = \"/app/**/*::$data\"\n[[rule]]\nid = \"short\"\naction = \"deny\"\npath_glob = \"/app/**/*~1*\"\n",
        )
        .unwrap();
        let win = |p: &str| windows.check(&facts("GET", p, p, &h)).map(|(_, r)| r.id.clone());
        assert_eq!(win("/app/x/secret.txt::$DATA").as_deref(), Some("ads"));
        assert_eq!(win("/app/SECRE~1.TXT").as_deref(), Some("short"));
        assert_eq!(win("/app/secret.txt"), None);
        // Patterns that are not canonical paths are refused, not silently never matched.
        for bad in ["/a/../b", "/a//b", "/a;x", "/a?b", "wiki"] {
            let text = format!("[[rule]]\nid = \"x\"\naction = \"deny\"\npath_prefix = {bad:?}\n");
            assert!(compile(&text).is_err(), "{bad}");
        }
    }

    /// One spelling of a path: every character as it is, in the other case, or percent-encoded
    /// (with either case of hex digits).
    fn spell(path: &str, choices: &[u8]) -> String {
        let mut out = String::new();
        let escape = |out: &mut String, c: char, upper: bool| {
            for b in c.encode_utf8(&mut [0u8; 4]).bytes() {
                out.push_str(&if upper { format!("%{b:02X}") } else { format!("%{b:02x}") });
            }
        };
        for (i, c) in path.chars().enumerate() {
            let pick = choices.get(i).copied().unwrap_or(0) % 4;
            match pick {
                _ if c == '/' => out.push('/'),
                1 if c.is_ascii_alphabetic() => {
                    out.push(if c.is_ascii_lowercase() { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
                }
                2 | 3 => escape(&mut out, c, pick == 2),
                _ if c.is_ascii() => out.push(c),
                _ => escape(&mut out, c, true),
            }
        }
        out
    }

    proptest::proptest! {
        /// Every spelling the front door accepts of a target that reaches the same app with the
        /// same forwarded path (up to letter case and a trailing slash) meets the same rule.
        #[test]
        fn every_spelling_of_a_request_meets_the_same_rule(
            segs in proptest::collection::vec("[a-zA-Z0-9_\\-\u{131}\u{17f}\u{212a}é]{1,6}", 1..5),
            // The rule is written from the path itself: its first `take` segments, each
            // in its own letter case or (in globs) a `*`, so that it often matches.
            take in 1usize..6,
            rule_case in proptest::collection::vec(proptest::num::u8::ANY, 40),
            stars in proptest::collection::vec(proptest::bool::weighted(0.2), 6),
            kind in 0u8..3,
            a in proptest::collection::vec(proptest::num::u8::ANY, 40),
            b in proptest::collection::vec(proptest::num::u8::ANY, 40),
            slash_a in proptest::bool::ANY,
            slash_b in proptest::bool::ANY,
        ) {
            use crate::config::{App, Route, Upstream};
            let apps = vec![App {
                name: "up".into(),
                title: "up".into(),
                description: String::new(),
                upstream: Upstream::Whoami,
                route: Route::Path { prefix: "/up/".into(), strip: true },
                access: crate::policy::Access::Authenticated,
                mfa: false,
                forward_headers: Vec::new(),
                websocket_origins: Vec::new(),
                preserve_host: false,
            rewrite_paths: false,
            }];
            let routes = crate::route::Routes::new("gate", &apps);
            let key = match kind {
                0 => "path_exact",
                1 => "path_prefix",
                _ => "path_glob",
            };
            let all: Vec<&str> = std::iter::once("up").chain(segs.iter().map(String::as_str)).collect();
            let mut pattern = String::new();
            for (i, seg) in all.iter().take(take).enumerate() {
                pattern.push('/');
                if kind == 2 && stars[i] {
                    pattern.push('*');
                } else {
                    let cased: String = seg
                        .chars()
                        .zip(rule_case.iter().skip(i * 6))
                        .map(|(c, r)| if r % 2 == 0 { c.to_ascii_uppercase() } else { c })
                        .collect();
                    pattern.push_str(&cased);
                }
            }
            if kind == 2 && take < all.len() {
                pattern.push_str("/**");
            }
            let text = format!("[[rule]]\nid = \"r\"\naction = \"deny\"\n{key} = {pattern:?}\n");
            let rules = compile(&text).expect("a pattern made of path segments compiles");
            let base = format!("/up/{}", segs.join("/"));
            let h = http::HeaderMap::new();
            let verdict = |spelled: &str| -> Option<(crate::route::Found, String, bool)> {
                let t = crate::request::Target::parse(spelled).ok()?;
                let found = routes.find("gate", t.path());
                let forwarded = match found {
                    crate::route::Found::App(_) => crate::request::fold_case(&t.path()[4..]).into_owned(),
                    _ => return None,
                };
                let f = Facts::of("GET", &t, spelled, &h, "192.0.2.1".parse().unwrap(), Some("up"));
                Some((found, forwarded.trim_end_matches('/').to_string(), rules.check(&f).is_some()))
            };
            let one = format!("{}{}", spell(&base, &a), if slash_a { "/" } else { "" });
            let two = format!("{}{}", spell(&base, &b), if slash_b { "/" } else { "" });
            if let (Some((app1, fwd1, hit1)), Some((app2, fwd2, hit2))) = (verdict(&one), verdict(&two))
                && app1 == app2 && fwd1 == fwd2 {
                    proptest::prop_assert_eq!(hit1, hit2, "{} and {} against {} = {}", one, two, key, pattern);
                }
        }
    }
}
