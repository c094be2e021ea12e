//! Routing on the canonical host and path: `/.poort/*` to the portal, otherwise the app whose
//! host or path prefix matches. Pure, built once from the config. Path prefixes match whole
//! segments on the case-folded path (`request::fold_case`, the form mitigation rules match on
//! too), so a case-insensitive upstream cannot be reached through another app's prefix by
//! changing case.

use std::collections::HashMap;

use crate::config::{App, Route};
use crate::request::fold_case;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A poort page; `on_portal_host` is false on an app's own host.
    Portal {
        on_portal_host: bool,
    },
    App(usize),
    /// `/.poort/tunnel/<name>` on the portal host: a command-line tunnel.
    Tunnel,
    /// An SSH target in the browser (`TERMINALS`).
    Terminal,
    /// A path-prefix app's root without its slash: redirect to the prefix.
    AddSlash(usize),
    /// `/.poort/auth` on any host poort serves: a proxy in front of an app asks whether a
    /// request may pass (forward-auth).
    ForwardAuth,
    NotFound,
    UnknownHost,
}

/// Where tunnels open, on the portal host.
pub const TUNNELS: &str = "/.poort/tunnel/";
/// SSH targets in the browser: `/.poort/ssh/NAME`.
pub const TERMINALS: &str = "/.poort/ssh/";

/// Where proxies in front of apps ask whether a request may pass, on any host poort serves.
pub const FORWARD_AUTH: &str = "/.poort/auth";

#[derive(Debug, Default)]
pub struct Routes {
    portal_host: String,
    hosts: HashMap<String, usize>,
    /// Lower-case prefix (with trailing slash) to app index.
    prefixes: HashMap<String, usize>,
    longest_prefix_segments: usize,
}

impl Routes {
    pub fn new(portal_host: &str, apps: &[App]) -> Routes {
        let mut r = Routes { portal_host: portal_host.to_string(), ..Routes::default() };
        for (i, app) in apps.iter().enumerate() {
            match &app.route {
                Route::Host(h) => {
                    r.hosts.insert(h.clone(), i);
                }
                Route::Path { prefix, .. } => {
                    r.longest_prefix_segments = r.longest_prefix_segments.max(prefix.matches('/').count() - 1);
                    r.prefixes.insert(fold_case(prefix).into_owned(), i);
                }
            }
        }
        r
    }

    /// Where a request for `path` on `host` goes.
    pub fn find(&self, host: &str, path: &str) -> Found {
        self.find_keyed(host, path, &fold_case(path))
    }

    /// `find` for a parsed target, whose case-folded form is already made.
    pub fn find_target(&self, host: &str, target: &crate::request::Target) -> Found {
        self.find_keyed(host, target.path(), target.match_key())
    }

    /// `key` is `fold_case(path)`.
    fn find_keyed(&self, host: &str, path: &str, key: &str) -> Found {
        let reserved = path == "/.poort" || path.starts_with("/.poort/");
        if host != self.portal_host {
            return match self.hosts.get(host) {
                Some(_) if path == FORWARD_AUTH => Found::ForwardAuth,
                Some(_) if reserved => Found::Portal { on_portal_host: false },
                Some(&i) => Found::App(i),
                None => Found::UnknownHost,
            };
        }
        if path.starts_with(TUNNELS) {
            return Found::Tunnel;
        }
        if path.starts_with(TERMINALS) {
            return Found::Terminal;
        }
        if path == FORWARD_AUTH {
            return Found::ForwardAuth;
        }
        if reserved || path == "/" {
            return Found::Portal { on_portal_host: true };
        }
        if self.prefixes.is_empty() {
            return Found::NotFound;
        }
        let path = key;
        // Try each segment boundary from the longest candidate down (no allocation: this runs
        // on every request). The longest candidate ends at the slash after the longest prefix's
        // last segment; the root slash is never a candidate.
        let limit = path.match_indices('/').nth(self.longest_prefix_segments).map_or(path.len(), |(i, _)| i + 1);
        let mut rest = &path[..limit];
        while let Some(end) = rest.rfind('/').filter(|&end| end > 0) {
            if let Some(&i) = self.prefixes.get(&path[..=end]) {
                return Found::App(i);
            }
            rest = &path[..end];
        }
        let mut with_slash = String::with_capacity(path.len() + 1);
        with_slash.push_str(path);
        with_slash.push('/');
        match self.prefixes.get(&with_slash) {
            Some(&i) => Found::AddSlash(i),
            None => Found::NotFound,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Upstream;
    use crate::policy::Access;

    fn app(route: Route) -> App {
        App {
            name: "a".into(),
            title: "a".into(),
            description: String::new(),
            upstream: Upstream::Whoami,
            route,
            access: Access::Authenticated,
            mfa: false,
            forward_headers: Vec::new(),
            websocket_origins: Vec::new(),
            preserve_host: false,
            rewrite_paths: false,
        }
    }

    #[test]
    fn table() {
        let apps = vec![
            app(Route::Path { prefix: "/wiki/".into(), strip: false }),
            app(Route::Path { prefix: "/wiki/admin/".into(), strip: false }),
            app(Route::Host("git.example".into())),
        ];
        let r = Routes::new("gate.example", &apps);
        let cases = [
            ("gate.example", "/", Found::Portal { on_portal_host: true }),
            ("gate.example", "/.poort/login", Found::Portal { on_portal_host: true }),
            ("gate.example", "/.poort/tunnel/db", Found::Tunnel),
            ("gate.example", "/.poort/auth", Found::ForwardAuth),
            ("git.example", "/.poort/auth", Found::ForwardAuth),
            ("other.example", "/.poort/auth", Found::UnknownHost),
            ("gate.example", "/.poort/tunnel", Found::Portal { on_portal_host: true }),
            ("git.example", "/.poort/tunnel/db", Found::Portal { on_portal_host: false }),
            ("gate.example", "/.poortx", Found::NotFound),
            ("gate.example", "/wiki/", Found::App(0)),
            ("gate.example", "/wiki/page", Found::App(0)),
            ("gate.example", "/WIKI/page", Found::App(0)),
            ("gate.example", "/wiki/admin/x", Found::App(1)),
            ("gate.example", "/Wiki/Admin/", Found::App(1)),
            ("gate.example", "/wiki", Found::AddSlash(0)),
            ("gate.example", "/wikipedia", Found::NotFound),
            ("gate.example", "/other/wiki/", Found::NotFound),
            ("git.example", "/anything", Found::App(2)),
            ("git.example", "/.poort/handoff", Found::Portal { on_portal_host: false }),
            ("evil.example", "/", Found::UnknownHost),
        ];
        for (host, path, want) in cases {
            assert_eq!(r.find(host, path), want, "{host} {path}");
        }
    }
}

/// The differential oracle (docs/threat-model.md): whatever target the front door accepts, an
/// upstream that reads paths in the worst way we know of must land on the same app, so the
/// app poort routed (and decided policy) for is the app that serves the request.
#[cfg(test)]
mod oracle {
    use proptest::prelude::*;

    use super::*;
    use crate::config::Upstream;
    use crate::policy::Access;
    use crate::request::Target;

    fn lenient_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%'
                && i + 2 < b.len()
                && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
            {
                out.push(v);
                i += 3;
                continue;
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// RFC 3986 §5.2.4 remove_dot_segments, on an absolute path.
    fn remove_dot_segments(path: &str) -> String {
        let mut out: Vec<&str> = Vec::new();
        for seg in path.split('/').skip(1) {
            match seg {
                "." => {}
                ".." => {
                    out.pop();
                }
                s => out.push(s),
            }
        }
        let mut p = format!("/{}", out.join("/"));
        if path.ends_with("/.") || path.ends_with("/..") {
            p.push('/');
        }
        p
    }

    /// Decode twice, `\` as `/`, drop `;` parameters, merge `//`, resolve dots, drop dots and
    /// spaces at the end of segments (Windows), lower-case.
    fn worst_case(raw_path: &str) -> String {
        let p = lenient_decode(&lenient_decode(raw_path)).replace('\\', "/");
        let p: Vec<String> = p.split('/').map(|seg| seg.split(';').next().unwrap_or("").to_string()).collect();
        let mut p = p.join("/");
        while p.contains("//") {
            p = p.replace("//", "/");
        }
        let p = remove_dot_segments(&p);
        let p: Vec<&str> = p
            .split('/')
            .map(|seg| if seg == "." || seg == ".." { seg } else { seg.trim_end_matches(['.', ' ']) })
            .collect();
        // Both ways a case-insensitive upstream may compare: lower case and upper case.
        p.join("/").to_uppercase().to_lowercase()
    }

    fn app(prefix: &str) -> App {
        App {
            name: "a".into(),
            title: "a".into(),
            description: String::new(),
            upstream: Upstream::Whoami,
            route: Route::Path { prefix: prefix.into(), strip: false },
            access: Access::Authenticated,
            mfa: false,
            forward_headers: Vec::new(),
            websocket_origins: Vec::new(),
            preserve_host: false,
            rewrite_paths: false,
        }
    }

    fn token() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "/",
            "//",
            "wiki",
            "WIKI",
            "admin",
            "public",
            "x",
            ".",
            "..",
            "%2e",
            "%2E",
            "%2f",
            "%2F",
            "%5c",
            "%25",
            "%252e",
            ";",
            ";x=1",
            "\\",
            "%00",
            "%41",
            "%c3%a9",
            "é",
            "%c0%ae",
            "~",
            "a.b",
            ".poort",
            "%3b",
            "?",
            "#",
            // U+0131 dotless i, U+212A Kelvin sign, U+017F long s: upper-case to ASCII letters.
            "w%c4%b1ki",
            "wi%e2%84%aai",
            "public",
            "publ%c4%b1c",
            "%c5%bf",
            "%c4%b0",
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        #[test]
        fn accepted_targets_land_on_the_same_app(tokens in prop::collection::vec(token(), 1..12)) {
            let raw = format!("/{}", tokens.concat());
            let routes = Routes::new("gate", &[app("/wiki/"), app("/wiki/admin/"), app("/public/")]);
            if let Ok(t) = Target::parse(&raw) {
                let raw_path = raw.split('?').next().unwrap_or("");
                let ours = routes.find("gate", t.path());
                let theirs = routes.find("gate", &worst_case(raw_path));
                if let Found::App(i) = ours {
                    prop_assert_eq!(theirs.clone(), Found::App(i), "raw {:?} canonical {:?} worst {:?}", raw, t.path(), worst_case(raw_path));
                }
                // Nor can a request that reached no app reach one upstream.
                if let Found::App(j) = theirs {
                    prop_assert_eq!(ours, Found::App(j), "raw {:?}", raw);
                }
            }
        }
    }

    #[test]
    fn the_oracle_itself_sees_the_classic_confusions() {
        assert_eq!(worst_case("/public/..;/wiki/admin/"), "/wiki/admin/");
        assert_eq!(worst_case("/public/%252e%252e/wiki/"), "/wiki/");
        assert_eq!(worst_case("/public\\..\\wiki/"), "/wiki/");
        assert_eq!(worst_case("//WIKI//admin/"), "/wiki/admin/");
    }
}
