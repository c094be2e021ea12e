//! Single sign-on against a real OpenID Provider: npm `oidc-provider` run with Node.js from
//! tests/oidc/provider.mjs (scripts/test installs it). The test plays the browser: it follows
//! the redirects between poort and the provider with each side's cookies.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Gate, ORIGIN, Reaped, Resp, TempDir, closed_port, parse_response, wait_for_port};

/// The provider process and the browser's cookies for it.
struct Op {
    port: u16,
    _process: Reaped,
    jar: std::sync::Mutex<Vec<(String, String)>>,
    _secret: TempDir,
    secret_file: PathBuf,
}

impl Op {
    fn start() -> Op {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oidc");
        assert!(
            dir.join("node_modules/oidc-provider").exists(),
            "run `npm ci` in tests/oidc first (scripts/test does)"
        );
        let port = closed_port();
        let child = Command::new("node")
            .arg(dir.join("provider.mjs"))
            .arg(port.to_string())
            .arg(format!("{ORIGIN}/.poort/oidc/test/callback"))
            .arg(format!("{ORIGIN}/.poort/login"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("Node.js is installed");
        let process = Reaped(child);
        wait_for_port(port, "the OpenID Provider", Duration::from_secs(20));
        let secret = TempDir::new();
        let secret_file = secret.0.join("client-secret");
        std::fs::write(&secret_file, "poort-client-secret\n").unwrap();
        Op { port, _process: process, jar: Default::default(), _secret: secret, secret_file }
    }

    fn config(&self, extra: &str) -> String {
        format!(
            r#"
[auth.oidc.test]
title = "Example ID"
issuer = "http://127.0.0.1:{port}"
client_id = "poort"
client_secret_file = "{secret}"
scopes = ["openid", "email", "profile", "groups"]
group_map = {{ "engineering" = "staff", "Remote Staff" = "remote" }}
{extra}
"#,
            port = self.port,
            secret = self.secret_file.display()
        )
    }

    /// One plain HTTP request to the provider, with and into the cookie jar.
    async fn send(&self, method: &str, path: &str, body: &str) -> Resp {
        let cookies: Vec<String> = self.jar.lock().unwrap().iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n", self.port);
        if !cookies.is_empty() {
            req.push_str(&format!("Cookie: {}\r\n", cookies.join("; ")));
        }
        if !body.is_empty() {
            req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        req.push_str(body);
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        let resp = parse_response(&raw);
        let mut jar = self.jar.lock().unwrap();
        for (k, v) in resp.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie")) {
            let _ = k;
            if let Some((name, value)) = v.split(';').next().and_then(|c| c.split_once('=')) {
                jar.retain(|(n, _)| n != name);
                if !value.is_empty() {
                    jar.push((name.to_string(), value.to_string()));
                }
            }
        }
        resp
    }

    /// How the provider behaves for the next sign-in, which starts in a fresh browser (no
    /// provider session left from the last one).
    async fn control(&self, json: &str) {
        assert_eq!(self.send("POST", "/test/control", json).await.status, 204);
        self.jar.lock().unwrap().clear();
    }

    /// Follows the provider's redirects from an authorize URL until it sends the browser back
    /// to poort; returns that poort path.
    async fn authorize(&self, url: &str) -> String {
        let mut next =
            url.strip_prefix(&format!("http://127.0.0.1:{}", self.port)).expect("the provider's URL").to_string();
        for _ in 0..10 {
            let r = self.send("GET", &next, "").await;
            let location = r.header("location").unwrap_or_else(|| panic!("no redirect: {} {}", r.status, r.text()));
            if let Some(back) = location.strip_prefix(ORIGIN) {
                return back.to_string();
            }
            next = location.strip_prefix(&format!("http://127.0.0.1:{}", self.port)).unwrap_or(location).to_string();
        }
        panic!("the provider never sent the browser back");
    }
}

/// Starts a sign-in at poort: the provider URL and the browser cookie.
async fn begin(gate: &Gate, next: &str) -> (String, String) {
    let q = form_urlencoded::Serializer::new(String::new()).append_pair("next", next).finish();
    let r = gate.get(&format!("/.poort/oidc/test/start?{q}"), None).await;
    assert_eq!(r.status, 302, "{}", r.text());
    let url = r.header("location").unwrap().to_string();
    for part in ["code_challenge_method=S256", "code_challenge=", "state=", "nonce=", "response_type=code"] {
        assert!(url.contains(part), "{part} missing from {url}");
    }
    (url, r.cookie("__Host-poort-sso").expect("the browser cookie"))
}

async fn back_at_poort(gate: &Gate, path: &str, browser: &str) -> Resp {
    gate.request("GET", path, &[("Cookie", &format!("__Host-poort-sso={browser}"))], b"").await
}

/// The whole flow; returns poort's answer to the callback.
async fn sign_in(gate: &Gate, op: &Op, next: &str) -> Resp {
    let (url, browser) = begin(gate, next).await;
    let back = op.authorize(&url).await;
    back_at_poort(gate, &back, &browser).await
}

#[tokio::test]
async fn the_code_flow_with_pkce_signs_in_with_mapped_groups() {
    let op = Op::start();
    let gate = Gate::start_config("", &op.config("")).await;
    // The login page offers the provider.
    let page = gate.get("/.poort/login", None).await.text();
    assert!(page.contains("/.poort/oidc/test/start") && page.contains("Sign in with Example ID"), "{page}");
    let live = gate.cli(&["check", "--live"]);
    let said = String::from_utf8_lossy(&live.stdout);
    assert!(live.status.success() && said.contains("auth.oidc.test: discovery and signing keys fetched"), "{said}");

    let r = sign_in(&gate, &op, "/staff/").await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert!(r.header("location").unwrap().ends_with("/staff/"));
    let session = r.cookie("__Host-poort").expect("a session");
    assert_eq!(gate.get("/staff/", Some(&session)).await.status, 200);
    let seen = gate.upstream.last();
    assert_eq!(seen.header("x-poort-user"), Some("grace"));
    assert_eq!(seen.header("x-poort-email"), Some("grace@example.org"));
    assert_eq!(seen.header("x-poort-groups"), Some("remote,staff"));
    // A password-equivalent sign-in: the MFA app asks for a second factor.
    assert_eq!(gate.get("/vault/", Some(&session)).await.status, 401);

    let out = gate.cli(&["user", "list"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.lines().any(|l| l.starts_with("grace") && l.contains("oidc:test")), "{listing}");
}

#[tokio::test]
async fn a_replayed_state_or_another_browser_is_refused() {
    let op = Op::start();
    let gate = Gate::start_config("", &op.config("")).await;
    let (url, browser) = begin(&gate, "/").await;
    let back = op.authorize(&url).await;
    // Someone else's browser (no cookie, or another one) cannot complete it...
    assert_eq!(back_at_poort(&gate, &back, "not-the-cookie").await.status, 400);
    // ...and it was used up by that attempt: the right browser cannot replay it either.
    let r = back_at_poort(&gate, &back, &browser).await;
    assert_eq!(r.status, 400);
    assert!(r.cookie("__Host-poort").is_none());

    // A completed sign-in's callback replayed: refused.
    let (url, browser) = begin(&gate, "/").await;
    let back = op.authorize(&url).await;
    assert_eq!(back_at_poort(&gate, &back, &browser).await.status, 303);
    let again = back_at_poort(&gate, &back, &browser).await;
    assert_eq!(again.status, 400);
    assert!(again.cookie("__Host-poort").is_none());
}

#[tokio::test]
async fn bad_id_tokens_are_refused() {
    let op = Op::start();
    let gate = Gate::start_config("", &op.config("")).await;
    for tamper in ["signature", "nonce", "audience", "expired", "issuer"] {
        op.control(&format!(r#"{{"tamper": "{tamper}"}}"#)).await;
        let r = sign_in(&gate, &op, "/").await;
        assert_eq!(r.status, 400, "{tamper}: {}", r.text());
        assert!(r.cookie("__Host-poort").is_none(), "{tamper} gave a session");
    }
    // The same provider, behaving: fine.
    op.control("{}").await;
    assert_eq!(sign_in(&gate, &op, "/").await.status, 303);
}

#[tokio::test]
async fn allow_lists_and_trusted_mfa() {
    let op = Op::start();
    let extra = r#"allowed_groups = ["staff"]
allowed_email_domains = ["example.org"]
trust_mfa = true"#;
    let gate = Gate::start_config("", &op.config(extra)).await;
    // heidi: no allowed group, another domain.
    op.control(r#"{"account": "heidi"}"#).await;
    let r = sign_in(&gate, &op, "/").await;
    assert_eq!(r.status, 403);
    assert!(r.cookie("__Host-poort").is_none());
    // ivan: a contractor, but at an allowed domain.
    op.control(r#"{"account": "ivan"}"#).await;
    assert_eq!(sign_in(&gate, &op, "/").await.status, 303);
    // grace, with a second factor at the provider: the MFA app opens without asking.
    op.control(r#"{"account": "grace", "amr": ["pwd", "otp"]}"#).await;
    let session = sign_in(&gate, &op, "/").await.cookie("__Host-poort").unwrap();
    assert_eq!(gate.get("/vault/", Some(&session)).await.status, 200);
    // ...and without one it does not.
    op.control(r#"{"account": "grace", "amr": ["pwd"]}"#).await;
    let session = sign_in(&gate, &op, "/").await.cookie("__Host-poort").unwrap();
    assert_eq!(gate.get("/vault/", Some(&session)).await.status, 401);
}

#[tokio::test]
async fn logout_ends_the_provider_session_too() {
    let op = Op::start();
    let gate = Gate::start_config("", &op.config("")).await;
    let session = sign_in(&gate, &op, "/").await.cookie("__Host-poort").unwrap();
    let r = gate.post("/.poort/logout", &session, &[]).await;
    assert_eq!(r.status, 303);
    let to = r.header("location").unwrap();
    let end_session = format!("http://127.0.0.1:{}/session/end?", op.port);
    assert!(to.starts_with(&end_session), "{to}");
    assert!(to.contains("id_token_hint=") && to.contains("post_logout_redirect_uri="), "{to}");
    assert_eq!(gate.get("/app/", Some(&session)).await.status, 401);
}

/// A single sign-on user has no password to re-enter before changing factors: a fresh
/// sign-in stands in for it, for five minutes; later they sign in at the provider again.
#[tokio::test]
async fn single_sign_on_users_can_set_up_a_factor_right_after_signing_in() {
    let op = Op::start();
    let gate = Gate::start_config("", &op.config("")).await;
    let session = sign_in(&gate, &op, "/").await.cookie("__Host-poort").unwrap();
    let page = gate.get("/.poort/security", Some(&session)).await.text();
    assert!(page.contains("in the last five minutes") && !page.contains("name=\"password\""), "{page}");
    let r = gate.post("/.poort/security/totp", &session, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("/.poort/security/totp/confirm"), "no enrolment page: {}", r.text());

    gate.clock.advance(301);
    let r = gate.post("/.poort/security/totp", &session, &[]).await;
    assert_eq!(r.status, 303);
    assert!(r.header("location").unwrap().contains("/.poort/confirm"));
    let confirm = gate.get("/.poort/confirm?next=%2F.poort%2Fsecurity", Some(&session)).await.text();
    assert!(confirm.contains("/.poort/oidc/test/start?next="), "{confirm}");
    assert!(!confirm.contains("name=\"password\""), "no password to give: {confirm}");
}

/// A provider account is bound to its subject: another account that picks the same name in
/// other letters (`GRACE`) is not grace, and a name with a letter that only a Unicode fold
/// makes ASCII (U+212A) is refused.
#[tokio::test]
async fn a_provider_name_does_not_make_the_account() {
    let op = Op::start();
    let gate = Gate::start_config("", &op.config("")).await;
    let grace = sign_in(&gate, &op, "/").await;
    assert_eq!(grace.status, 303);
    for account in ["impostor", "kelvin"] {
        op.control(&format!(r#"{{"account": "{account}"}}"#)).await;
        let r = sign_in(&gate, &op, "/").await;
        assert!(r.status == 403 || r.status == 400, "{account}: {} {}", r.status, r.text());
        assert!(r.cookie("__Host-poort").is_none(), "{account} signed in");
    }
    let listing = String::from_utf8_lossy(&gate.cli(&["user", "list"]).stdout).into_owned();
    assert!(!listing.contains("jake") && !listing.contains("mallory"), "{listing}");
    // grace herself still signs in as grace.
    op.control(r#"{"account": "grace"}"#).await;
    let s = sign_in(&gate, &op, "/").await.cookie("__Host-poort").unwrap();
    assert_eq!(gate.get("/app/", Some(&s)).await.status, 200);
    assert_eq!(gate.upstream.last().header("x-poort-user"), Some("grace"));
}

/// A provider account cannot take the name of a directory user who has not signed in yet:
/// the directory's dave would otherwise be refused his own name for good.
#[tokio::test]
async fn a_provider_account_cannot_claim_a_directory_users_name() {
    let slapd = crate::ldap::Slapd::start();
    let op = Op::start();
    let gate = Gate::start_config("", &format!("{}\n{}", slapd.config(""), op.config(""))).await;
    op.control(r#"{"account": "dave"}"#).await;
    let r = sign_in(&gate, &op, "/").await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.cookie("__Host-poort").is_none());
    let r = gate.try_login("dave", "dave-directory-password", "").await;
    assert_eq!(r.status, 303, "the directory's dave keeps his name");
}

/// A provider that rotates its signing key: the first ID token under the new key makes poort
/// fetch the keys again once, and the sign-in goes through.
#[tokio::test]
async fn a_new_provider_key_is_fetched_when_a_token_names_it() {
    let op = Op::start();
    let gate = Gate::start_config("", &op.config("")).await;
    assert_eq!(sign_in(&gate, &op, "/").await.status, 303, "keys fetched and cached");
    op.control(r#"{"account": "grace", "rotate": true, "tamper": "rotated"}"#).await;
    let r = sign_in(&gate, &op, "/").await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert!(r.cookie("__Host-poort").is_some());
}

/// Starting single sign-on is rate-limited per address, and one address can hold only a few
/// sign-ins in flight: nobody can push everyone else's pending sign-ins out.
#[tokio::test]
async fn one_address_cannot_fill_the_sign_ins_in_flight() {
    let op = Op::start();
    let gate = Gate::start_config("", &format!("[login]\nper_address_per_minute = 1000\n{}", op.config(""))).await;
    // Someone's sign-in is in flight.
    let (theirs, browser) = begin(&gate, "/").await;
    let mut refused = 0;
    for _ in 0..40 {
        let r = gate.get("/.poort/oidc/test/start?next=%2F", None).await;
        if r.status == 429 {
            refused += 1;
        } else {
            assert_eq!(r.status, 302);
        }
    }
    assert!(refused >= 40 - 16, "{refused} refused");
    // Theirs still completes.
    let back = op.authorize(&theirs).await;
    assert_eq!(back_at_poort(&gate, &back, &browser).await.status, 303);
    // And the per-address rate limit holds too.
    let strict = Gate::start_config("", &format!("[login]\nper_address_per_minute = 5\n{}", op.config(""))).await;
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(strict.get("/.poort/oidc/test/start?next=%2F", None).await.status);
        }
        v
    };
    assert!(statuses.contains(&429), "{statuses:?}");
}

#[tokio::test]
async fn a_sign_in_started_on_one_node_finishes_on_another_once() {
    let op = Op::start();
    let pg = crate::cluster::Postgres::start();
    let mut gate = Gate::start_on_with(&pg.database("sso"), &op.config("")).await;
    gate.add_node().await;
    // Each connection goes to the next node: the start on one, the callback on the other.
    let (url, browser) = begin(&gate, "/staff/").await;
    let back = op.authorize(&url).await;
    let r = back_at_poort(&gate, &back, &browser).await;
    assert_eq!(r.status, 303, "{}", r.text());
    let session = r.cookie("__Host-poort").expect("a session");
    for _ in 0..2 {
        assert_eq!(gate.get("/staff/", Some(&session)).await.status, 200);
    }
    // The callback replayed, now on the first node: refused.
    let again = back_at_poort(&gate, &back, &browser).await;
    assert_eq!(again.status, 400);
    assert!(again.cookie("__Host-poort").is_none());
}
