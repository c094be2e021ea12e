//! `rewrite_paths`: an app that believes it lives at `http://its-host/` writes that into
//! redirects and cookie paths. For each answer, its own URLs in `Location` and the `Path` of
//! each `Set-Cookie` are turned into the ones the user sees: poort's origin, the app's prefix
//! (when poort strips it), without the upstream's base path. Anything else (other hosts,
//! relative references, cookies without a path) passes as it is.

use http::HeaderMap;
use http::header::{self, HeaderValue};

/// One app's mapping from its own URLs to the user's.
pub struct Rewrite<'a> {
    /// The Host poort sent the app: absolute URLs with it (either scheme) are the app's own.
    pub sent_host: &'a str,
    /// The upstream's base path ("" or `/base`).
    pub base: &'a str,
    /// `https://host[:port]` as the user reached poort.
    pub public_origin: &'a str,
    /// The prefix poort took off (`/wiki`), or "".
    pub prefix: &'a str,
}

impl Rewrite<'_> {
    /// Rewrites the answer's `Location` and `Set-Cookie` headers in place.
    pub fn apply(&self, headers: &mut HeaderMap) {
        if let Some(v) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok())
            && let Some(new) = self.location(v).and_then(|s| HeaderValue::from_str(&s).ok())
        {
            headers.insert(header::LOCATION, new);
        }
        if self.prefix.is_empty() && self.base.is_empty() {
            return;
        }
        if !headers.contains_key(header::SET_COOKIE) {
            return;
        }
        let cookies: Vec<HeaderValue> = headers.get_all(header::SET_COOKIE).iter().cloned().collect();
        headers.remove(header::SET_COOKIE);
        for v in cookies {
            let new = v.to_str().ok().and_then(|s| self.cookie(s)).and_then(|s| HeaderValue::from_str(&s).ok());
            headers.append(header::SET_COOKIE, new.unwrap_or(v));
        }
    }

    /// The user's URL for a `Location` value, or None to leave it.
    fn location(&self, v: &str) -> Option<String> {
        for scheme in ["http://", "https://"] {
            let Some(rest) = strip_prefix_ignore_case(v, scheme) else { continue };
            let Some(rest) = strip_prefix_ignore_case(rest, self.sent_host) else { continue };
            if !(rest.is_empty() || rest.starts_with(['/', '?', '#'])) {
                // Another host that merely starts with the same letters.
                return None;
            }
            let path = if rest.starts_with('/') { rest.to_string() } else { format!("/{rest}") };
            return Some(format!("{}{}", self.public_origin, self.path(&path)));
        }
        // A path on the same origin; `//host` is another origin.
        if v.starts_with('/') && !v.starts_with("//") && !v.starts_with("/\\") {
            let mapped = self.path(v);
            return (mapped != v).then_some(mapped);
        }
        None
    }

    /// `path` (with any query) as the user sees it: outside the base path it is not the app's
    /// and stays as it is.
    fn path(&self, path: &str) -> String {
        let rest = if self.base.is_empty() {
            path
        } else {
            match path.strip_prefix(self.base) {
                Some("") => "/",
                Some(r) if r.starts_with(['/', '?', '#']) => r,
                _ => return path.to_string(),
            }
        };
        let rest = if rest.starts_with(['?', '#']) { format!("/{rest}") } else { rest.to_string() };
        format!("{}{rest}", self.prefix)
    }

    /// A `Set-Cookie` value with its `Path` mapped, or None to leave it.
    fn cookie(&self, v: &str) -> Option<String> {
        let mut parts: Vec<String> = v.split(';').map(String::from).collect();
        let mut changed = false;
        for part in parts.iter_mut().skip(1) {
            let Some((name, value)) = part.split_once('=') else { continue };
            if !name.trim().eq_ignore_ascii_case("path") {
                continue;
            }
            let value = value.trim();
            if value.starts_with('/') {
                let leading = &part[..part.len() - part.trim_start().len()];
                *part = format!("{leading}{}={}", name.trim(), self.path(value));
                changed = true;
            }
        }
        changed.then(|| parts.join(";"))
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    const WIKI: Rewrite =
        Rewrite { sent_host: "10.0.0.5:8080", base: "", public_origin: "https://gate.example.com", prefix: "/wiki" };

    #[test]
    fn the_apps_own_urls_become_the_users() {
        for (from, to) in [
            ("/login?next=/", Some("/wiki/login?next=/")),
            ("http://10.0.0.5:8080/x/y", Some("https://gate.example.com/wiki/x/y")),
            ("HTTPS://10.0.0.5:8080", Some("https://gate.example.com/wiki/")),
            ("http://10.0.0.5:8080?a=1", Some("https://gate.example.com/wiki/?a=1")),
            // Not the app's: left alone.
            ("http://10.0.0.5:80801/x", None),
            ("https://idp.example.com/auth", None),
            ("//evil.example/x", None),
            ("/\\evil.example/x", None),
            ("relative/page", None),
        ] {
            assert_eq!(WIKI.location(from).as_deref(), to, "{from}");
        }
    }

    #[test]
    fn a_base_path_is_taken_off_and_the_prefix_put_on() {
        let r = Rewrite { base: "/app", ..WIKI };
        assert_eq!(r.location("/app/x").as_deref(), Some("/wiki/x"));
        assert_eq!(r.location("/app").as_deref(), Some("/wiki/"));
        assert_eq!(r.location("/application").as_deref(), None, "outside the base path");
        assert_eq!(r.location("/other").as_deref(), None);
        let host = Rewrite { prefix: "", base: "", sent_host: "wiki.internal", ..WIKI };
        assert_eq!(host.location("http://wiki.internal/p").as_deref(), Some("https://gate.example.com/p"));
        assert_eq!(host.location("/p").as_deref(), None, "nothing to change");
    }

    #[test]
    fn cookie_paths_follow() {
        assert_eq!(WIKI.cookie("sid=1; Path=/; HttpOnly").as_deref(), Some("sid=1; Path=/wiki/; HttpOnly"));
        assert_eq!(WIKI.cookie("a=b;path=/admin;Secure").as_deref(), Some("a=b;path=/wiki/admin;Secure"));
        assert_eq!(WIKI.cookie("a=b; Secure"), None);
        // A cookie whose value looks like an attribute is not touched.
        assert_eq!(WIKI.cookie("path=/x; Secure"), None);
        let mut h = HeaderMap::new();
        h.append(header::SET_COOKIE, HeaderValue::from_static("sid=1; Path=/"));
        h.append(header::SET_COOKIE, HeaderValue::from_static("theme=dark"));
        h.insert(header::LOCATION, HeaderValue::from_static("/home"));
        WIKI.apply(&mut h);
        let cookies: Vec<_> = h.get_all(header::SET_COOKIE).iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(cookies, ["sid=1; Path=/wiki/", "theme=dark"]);
        assert_eq!(h.get(header::LOCATION).unwrap(), "/wiki/home");
    }
}
