//! Routing on the canonical host and path: `/.poort/*` to the portal, otherwise the app whose
//! host or path prefix matches. Pure, built once from the config. Path prefixes match whole
//! segments and ignore ASCII case, so a case-insensitive upstream cannot be reached through
//! another app's prefix by changing case.

use std::collections::HashMap;

use crate::config::{App, Route};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A poort page; `on_portal_host` is false on an app's own host.
    Portal {
        on_portal_host: bool,
    },
    App(usize),
    /// A path-prefix app's root without its slash: redirect to the prefix.
    AddSlash(usize),
    NotFound,
    UnknownHost,
}

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
                    r.prefixes.insert(prefix.to_ascii_lowercase(), i);
                }
            }
        }
        r
    }

    pub fn find(&self, host: &str, path: &str) -> Found {
        let reserved = path == "/.poort" || path.starts_with("/.poort/");
        if host != self.portal_host {
            return match self.hosts.get(host) {
                Some(_) if reserved => Found::Portal { on_portal_host: false },
                Some(&i) => Found::App(i),
                None => Found::UnknownHost,
            };
        }
        if reserved || path == "/" {
            return Found::Portal { on_portal_host: true };
        }
        if self.prefixes.is_empty() {
            return Found::NotFound;
        }
        let lower;
        let path = if path.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = path.to_ascii_lowercase();
            lower.as_str()
        } else {
            path
        };
        // Try each segment boundary from the longest candidate down.
        let ends: Vec<usize> =
            path.match_indices('/').map(|(i, _)| i + 1).skip(1).take(self.longest_prefix_segments).collect();
        for &end in ends.iter().rev() {
            if let Some(&i) = self.prefixes.get(&path[..end]) {
                return Found::App(i);
            }
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
