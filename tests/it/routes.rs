//! The route table, walked row by row over a real socket: every route the gateway answers
//! itself, called by each person who should not get through (nobody signed in, a page of
//! another origin, a script without the CSRF token, the command line's session in a browser
//! route, a browser's session on a command-line route, a session too old to change factors,
//! anyone during a lockdown), and the answer each must get. A row added to the table is walked
//! here without a new line of test.

use std::time::Duration;

use poort::portal::routes::{Guard, Input, On, ROUTES, Route, Verb};

use crate::harness::{Gate, ORIGIN, Resp, eventually};

const EVIL: &str = "https://evil.example";

/// Where and how to call a row: (host, method, target).
fn calls(r: &Route) -> Vec<(&'static str, &'static str, String)> {
    let target = if r.prefix { format!("{}sink", r.path) } else { r.path.to_string() };
    let method = if r.verb == Verb::Get { "GET" } else { "POST" };
    let hosts: &[&str] = match r.on {
        On::Portal => &["localhost"],
        On::AppHost => &["git.localhost"],
        On::Any => &["localhost", "git.localhost"],
    };
    hosts.iter().map(|h| (*h, method, target.clone())).collect()
}

fn body_for(r: &Route) -> (&'static str, &'static [u8]) {
    match r.input {
        Input::Form => ("application/x-www-form-urlencoded", b"csrf=forged&next=%2F"),
        Input::Json | Input::CliJson => ("application/json", b"{}"),
        Input::None => ("text/plain", b""),
    }
}

async fn call(gate: &Gate, r: &Route, host: &str, method: &str, target: &str, extra: &[(&str, &str)]) -> Resp {
    let (content_type, body) = body_for(r);
    let mut headers: Vec<(&str, &str)> = vec![("Host", host)];
    if method == "POST" {
        headers.push(("Content-Type", content_type));
    }
    headers.extend_from_slice(extra);
    gate.request(method, target, &headers, if method == "POST" { body } else { b"" }).await
}

/// What a route that needs a signed-in browser answers someone who is not: the sign-in page,
/// or 401 to a script.
fn sent_to_sign_in(r: &Route, resp: &Resp) -> bool {
    let to_login = resp.header("location").is_some_and(|l| l.starts_with(&format!("{ORIGIN}/.poort/login")));
    match (r.input, r.verb) {
        (Input::Json, _) => resp.status == 401,
        (_, Verb::Get) => resp.status == 302 && to_login,
        _ => resp.status == 303 && to_login,
    }
}

fn json_error(resp: &Resp) -> String {
    serde_json::from_str::<serde_json::Value>(&resp.text())
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[tokio::test]
async fn every_route_refuses_every_caller_its_row_does_not_admit() {
    let gate = Gate::start().await;
    let browser = gate.login("bob").await;
    let cli = gate.cli_session("alice").await;
    let browser_cookie = format!("__Host-poort={browser}");
    let cli_cookie = format!("__Host-poort={cli}");
    let (csrf_cookie, _) = gate.login_form().await;
    // A browser session and a CSRF cookie, but a token that does not match it.
    let with_csrf = format!("{browser_cookie}; __Host-poort-csrf={csrf_cookie}");
    let cross_site = [("Origin", EVIL), ("Sec-Fetch-Site", "cross-site")];

    let mut walked = 0;
    for r in ROUTES {
        for (host, method, target) in calls(r) {
            let what = format!("{method} {host}{target} ({:?})", r.page);
            walked += 1;
            match r.guard {
                Guard::Session | Guard::Fresh | Guard::Admin => {
                    // Nobody signed in, from the portal or from anywhere.
                    for extra in [&[][..], &cross_site[..]] {
                        let resp = call(&gate, r, host, method, &target, extra).await;
                        assert!(sent_to_sign_in(r, &resp), "{what}, anonymous: {}", resp.status);
                    }
                    // The command line's session does not open a browser route.
                    let resp = call(&gate, r, host, method, &target, &[("Cookie", &cli_cookie)]).await;
                    assert!(sent_to_sign_in(r, &resp), "{what}, with a command-line session: {}", resp.status);
                    if r.guard == Guard::Admin {
                        // A signed-in user outside the admin group (tests/it/admin_console.rs
                        // tries the rest).
                        let resp = call(&gate, r, host, method, &target, &[("Cookie", &browser_cookie)]).await;
                        assert_eq!(resp.status, 403, "{what}, signed in, not an admin");
                    }
                }
                Guard::Cli | Guard::CliSession => {
                    // A browser (it always sends Origin or fetch metadata) is refused, marked
                    // or not, signed in or not.
                    for extra in [
                        &[("Cookie", browser_cookie.as_str())][..],
                        &[("X-Poort-Client", "cli"), ("Origin", ORIGIN), ("Cookie", &cli_cookie)][..],
                        &[("X-Poort-Client", "cli"), ("Sec-Fetch-Site", "same-origin"), ("Cookie", &cli_cookie)][..],
                    ] {
                        let resp = call(&gate, r, host, method, &target, extra).await;
                        assert_eq!(
                            (resp.status, json_error(&resp)),
                            (400, "invalid_request".into()),
                            "{what}: {extra:?}"
                        );
                    }
                    if r.guard == Guard::CliSession {
                        // A browser's session is not the command line's, even with the marker.
                        for cookie in [None, Some(browser_cookie.as_str())] {
                            let mut extra = vec![("X-Poort-Client", "cli")];
                            extra.extend(cookie.map(|c| ("Cookie", c)));
                            let resp = call(&gate, r, host, method, &target, &extra).await;
                            assert_eq!(resp.status, 401, "{what}: {cookie:?}");
                        }
                    }
                }
                Guard::Anyone => {
                    let resp = call(&gate, r, host, method, &target, &cross_site).await;
                    assert!(resp.status < 500, "{what}: {}", resp.status);
                }
            }
            // A post from a page of another origin, or without the page's token, with a
            // signed-in browser's cookies: refused before any handler.
            if r.verb == Verb::Post && matches!(r.input, Input::Form | Input::Json) {
                let person = [
                    ("Sec-Fetch-Site", "same-origin"),
                    ("Sec-Fetch-Mode", "navigate"),
                    ("Sec-Fetch-User", "?1"),
                    ("Referer", "https://localhost:8443/.poort/security"),
                ];
                for (origin, label) in [(EVIL, "another origin"), (ORIGIN, "no matching token")] {
                    let mut extra =
                        vec![("Cookie", with_csrf.as_str()), ("Origin", origin), ("X-Poort-CSRF", "forged")];
                    extra.extend_from_slice(&person);
                    let resp = call(&gate, r, host, method, &target, &extra).await;
                    assert_eq!(resp.status, 403, "{what} from {label}");
                    if r.input == Input::Json {
                        assert_eq!(json_error(&resp), "the request did not come from a poort page", "{what}");
                    }
                }
            }
            // Methods the table does not list for this address.
            let resp = call(&gate, r, host, "PUT", &target, &[]).await;
            assert_eq!(resp.status, 405, "PUT {host}{target}");
        }
    }
    assert!(walked >= ROUTES.len());
}

/// Factor changes need a fresh proof: a session whose sign-in is older than five minutes is
/// sent to confirm first, on every row whose guard says so.
#[tokio::test]
async fn fresh_rows_send_an_older_session_to_confirm() {
    let gate = Gate::start().await;
    let browser = gate.login("bob").await;
    gate.clock.advance(301);
    let mut fresh_rows = 0;
    for r in ROUTES.iter().filter(|r| r.guard == Guard::Fresh) {
        for (host, method, target) in calls(r) {
            let resp = gate.post(&target, &browser, &[]).await;
            assert_eq!((host, method), ("localhost", "POST"));
            assert_eq!(resp.status, 303, "{target}");
            let to = resp.header("location").unwrap_or_default();
            assert!(to.starts_with(&format!("{ORIGIN}/.poort/confirm")), "{target}: {to}");
            fresh_rows += 1;
        }
    }
    assert!(fresh_rows >= 5, "the factor changes are Fresh rows");
}

/// During a lockdown the table's open rows answer everyone; every other route answers a
/// non-administrator with the maintenance page.
#[tokio::test]
async fn a_lockdown_leaves_only_the_rows_the_table_keeps_open() {
    let gate = Gate::start().await;
    let bob = gate.login("bob").await;
    assert!(gate.cli(&["lockdown", "on"]).status.success());
    eventually("the lockdown to apply", Duration::from_secs(5), async || gate.get("/", Some(&bob)).await.status == 503)
        .await;
    let cookie = format!("__Host-poort={bob}");
    for r in ROUTES {
        for (host, method, target) in calls(r) {
            let resp = call(&gate, r, host, method, &target, &[("Cookie", &cookie)]).await;
            if r.lockdown {
                assert_ne!(resp.status, 503, "{method} {host}{target} stays open");
            } else {
                assert_eq!(resp.status, 503, "{method} {host}{target} is closed");
                assert!(resp.text().contains("Under maintenance"));
            }
        }
    }
}
