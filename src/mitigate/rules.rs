//! Mitigation rules: the file format, its checking, and matching. Pure: `compile` turns file
//! text into `Rules` or every problem with its place; `Rules::check` decides for one request.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default, rename = "rule")]
    rules: Vec<FileRule>,
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

#[derive(Debug, Clone)]
enum HeaderTest {
    Present(bool),
    Equals(String),
    Contains(String),
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
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub method: &'a str,
    /// The canonical path.
    pub path: &'a str,
    /// The target as sent (path and query).
    pub raw_target: &'a str,
    pub headers: &'a http::HeaderMap,
    pub client: IpAddr,
    /// The app the request routes to, if any.
    pub app: Option<&'a str>,
}

/// A checked rule set, in file order.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub rules: Vec<Rule>,
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

impl Rule {
    fn matches(&self, f: &Facts<'_>) -> bool {
        let path_ok = match &self.path {
            None => true,
            Some(PathTest::Exact(p)) => f.path == p,
            Some(PathTest::Prefix(p)) => f.path.starts_with(p.as_str()) || f.path == p.trim_end_matches('/'),
            Some(PathTest::Glob(g)) => {
                let segs: Vec<&str> = f.path.trim_start_matches('/').split('/').collect();
                glob(g, &segs)
            }
        };
        path_ok
            && self.raw.iter().all(|r| r.present(f.raw_target))
            && (self.methods.is_empty() || self.methods.iter().any(|m| m == f.method))
            && self.headers.iter().all(|(name, t)| {
                let mut values = f.headers.get_all(name.as_str()).iter().filter_map(|v| v.to_str().ok());
                match t {
                    HeaderTest::Present(want) => f.headers.contains_key(name.as_str()) == *want,
                    HeaderTest::Equals(v) => values.any(|x| x.eq_ignore_ascii_case(v)),
                    HeaderTest::Contains(v) => values.any(|x| x.to_ascii_lowercase().contains(v.as_str())),
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
    for (i, r) in file.rules.into_iter().enumerate() {
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
        let path = if let Some(p) = r.path_exact {
            if !p.starts_with('/') {
                bad("path_exact", format!("{p:?} does not start with /"));
            }
            Some(PathTest::Exact(p))
        } else if let Some(p) = r.path_prefix {
            if !p.starts_with('/') {
                bad("path_prefix", format!("{p:?} does not start with /"));
            }
            // A segment prefix: "/vpns" matches /vpns and /vpns/x, never /vpnsx.
            let p = if p.ends_with('/') { p } else { format!("{p}/") };
            Some(PathTest::Prefix(p))
        } else if let Some(g) = r.path_glob {
            if !g.starts_with('/') {
                bad("path_glob", format!("{g:?} does not start with /"));
            }
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
                (None, Some(v), None) => HeaderTest::Equals(v),
                (None, None, Some(v)) => HeaderTest::Contains(v.to_ascii_lowercase()),
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
    if problems.is_empty() { Ok(Rules { rules }) } else { Err(problems) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(method: &'a str, path: &'a str, raw: &'a str, headers: &'a http::HeaderMap) -> Facts<'a> {
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
}
