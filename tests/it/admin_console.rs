//! The admin console (`/.poort/admin`), tried by everyone who should not get in: a user
//! outside the admin group, an administrator with only a password, a script or a frame on the
//! portal's origin, an administrator whose proof went stale or who was just taken out of the
//! group; and by the administrator, whose every change lands and is audited.

use poort::clock::Clock;
use poort::identity::totp;

use crate::harness::{Gate, ORIGIN, PASSWORD, Resp, enrol};

const PAGES: [&str; 9] = [
    "/.poort/admin",
    "/.poort/admin/users",
    "/.poort/admin/user?name=bob",
    "/.poort/admin/sessions",
    "/.poort/admin/audit",
    "/.poort/admin/audit/export",
    "/.poort/admin/mitigation",
    "/.poort/admin/access?user=bob",
    "/.poort/admin/report",
];

/// A page opened the way a person opens it: a click on a portal page.
pub(crate) async fn open(gate: &Gate, path: &str, session: &str) -> Resp {
    let referer = format!("{ORIGIN}/.poort/admin");
    let cookie = format!("__Host-poort={session}");
    let nav = [
        ("Cookie", cookie.as_str()),
        ("Sec-Fetch-Site", "same-origin"),
        ("Sec-Fetch-Mode", "navigate"),
        ("Sec-Fetch-Dest", "document"),
        ("Sec-Fetch-User", "?1"),
        ("Referer", referer.as_str()),
    ];
    gate.request("GET", path, &nav, b"").await
}

/// The console's token on the page at `path`, as a person's browser holds it.
async fn token(gate: &Gate, session: &str, path: &str) -> String {
    let page = open(gate, path, session).await.text();
    page.split("name=\"admin\" value=\"")
        .nth(1)
        .expect("a console page carries its token")
        .split('"')
        .next()
        .unwrap()
        .to_string()
}

/// Posts a console form as the administrator's browser does: from the page, with its token.
async fn act(gate: &Gate, session: &str, path: &str, fields: &[(&str, &str)]) -> Resp {
    let t = token(gate, session, path).await;
    let mut all = vec![("admin", t.as_str())];
    all.extend_from_slice(fields);
    gate.post(path, session, &all).await
}

/// Puts alice in the admin group with an authenticator; returns a session she opened with her
/// password and then that factor (what the console takes), and her authenticator's secret.
pub(crate) async fn admin(gate: &Gate) -> (String, Vec<u8>) {
    let now = gate.clock.now();
    gate.store().change_groups("alice", &["admins".into()], &[], now).unwrap();
    let first = gate.login("alice").await;
    let (secret, _, _) = enrol(gate, &first).await;
    // The next code: the enrolment used this one.
    gate.clock.advance(30);
    let s = gate.login("alice").await;
    let code = totp::code_at_step(&secret, totp::step_at(gate.clock.now()));
    let r = gate.post("/.poort/mfa", &s, &[("code", &code), ("next", "/.poort/admin")]).await;
    assert_eq!(r.status, 303, "{}", r.text());
    (r.cookie("__Host-poort").expect("the step-up renews the session"), secret)
}

fn disabled(gate: &Gate, user: &str) -> bool {
    gate.store().list_users().unwrap().into_iter().find(|u| u.name == user).unwrap().disabled
}

#[tokio::test]
async fn a_user_outside_the_admin_group_gets_no_page_and_no_action() {
    let gate = Gate::start().await;
    let bob = gate.login("bob").await;
    for path in PAGES {
        assert_eq!(open(&gate, path, &bob).await.status, 403, "{path}");
    }
    for (path, fields) in [
        ("/.poort/admin/users", vec![("op", "disable"), ("name", "alice")]),
        ("/.poort/admin/users", vec![("op", "groups"), ("name", "bob"), ("add", "admins")]),
        ("/.poort/admin/sessions", vec![("op", "end-all"), ("confirm", "yes")]),
        ("/.poort/admin/mitigation", vec![("lockdown", "on"), ("confirm", "yes")]),
    ] {
        assert_eq!(gate.post(path, &bob, &fields).await.status, 403, "{path} {fields:?}");
    }
    assert!(!disabled(&gate, "alice"));
    let bob_groups = gate.store().list_users().unwrap().into_iter().find(|u| u.name == "bob").unwrap().groups;
    assert!(bob_groups.is_empty(), "bob did not make himself an admin");
    assert_eq!(gate.status("/app/", Some(&gate.login("alice").await)).await, 200, "no session was ended");
    assert!(gate.audit("admin").is_empty(), "nothing was done");
    // Signed out, the console sends the browser to sign in.
    let r = gate.request("GET", "/.poort/admin", &[], b"").await;
    assert_eq!(r.status, 302);
    assert!(r.header("location").unwrap().starts_with(&format!("{ORIGIN}/.poort/login")));
}

#[tokio::test]
async fn an_admin_with_only_a_password_is_sent_to_prove_a_second_factor() {
    let gate = Gate::start().await;
    let (_, _) = admin(&gate).await;
    let password_only = gate.login("alice").await;
    let r = open(&gate, "/.poort/admin/users", &password_only).await;
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some(format!("{ORIGIN}/.poort/mfa?next=%2F.poort%2Fadmin").as_str()));
    let r = gate.post("/.poort/admin/users", &password_only, &[("op", "disable"), ("name", "bob")]).await;
    assert_eq!(r.status, 303);
    assert!(!disabled(&gate, "bob"), "a password alone changes nothing");

    // An admin who has no factor at all is sent to set one up first.
    let now = gate.clock.now();
    gate.store().change_groups("bob", &["admins".into()], &[], now).unwrap();
    let bob = gate.login("bob").await;
    let r = open(&gate, "/.poort/admin", &bob).await;
    assert_eq!(r.status, 303);
    let to = gate.get(r.header("location").unwrap().strip_prefix(ORIGIN).unwrap(), Some(&bob)).await;
    assert!(to.header("location").unwrap().starts_with(&format!("{ORIGIN}/.poort/security?next=")), "set one up");
}

#[tokio::test]
async fn admin_pages_open_to_the_person_and_not_to_a_script_or_a_frame() {
    let gate = Gate::start().await;
    let (s, _) = admin(&gate).await;
    for path in PAGES {
        assert_eq!(open(&gate, path, &s).await.status, 200, "{path}");
    }
    let page = open(&gate, "/.poort/admin/users", &s).await;
    assert_eq!(page.header("cache-control"), Some("no-store"));
    assert!(page.text().contains("bob"));

    let cookie = format!("__Host-poort={s}");
    let app_page = format!("{ORIGIN}/app/index.html");
    let portal_page = format!("{ORIGIN}/.poort/admin");
    let (app_page, portal_page) = (app_page.as_str(), portal_page.as_str());
    // What an app's script on the portal's origin can send (apps routed by path share it).
    let tries: [(&str, [(&str, &str); 5]); 6] = [
        (
            "fetch()",
            [
                ("Sec-Fetch-Site", "same-origin"),
                ("Sec-Fetch-Mode", "cors"),
                ("Sec-Fetch-Dest", "empty"),
                ("Referer", app_page),
                ("X-Nothing", ""),
            ],
        ),
        (
            "an iframe",
            [
                ("Sec-Fetch-Site", "same-origin"),
                ("Sec-Fetch-Mode", "navigate"),
                ("Sec-Fetch-Dest", "iframe"),
                ("Sec-Fetch-User", "?1"),
                ("Referer", portal_page),
            ],
        ),
        (
            "a window the app's page opened",
            [
                ("Sec-Fetch-Site", "same-origin"),
                ("Sec-Fetch-Mode", "navigate"),
                ("Sec-Fetch-Dest", "document"),
                ("Sec-Fetch-User", "?1"),
                ("Referer", app_page),
            ],
        ),
        (
            "a navigation no person started",
            [
                ("Sec-Fetch-Site", "same-origin"),
                ("Sec-Fetch-Mode", "navigate"),
                ("Sec-Fetch-Dest", "document"),
                ("Referer", portal_page),
                ("X-Nothing", ""),
            ],
        ),
        (
            "a link on another site",
            [
                ("Sec-Fetch-Site", "cross-site"),
                ("Sec-Fetch-Mode", "navigate"),
                ("Sec-Fetch-Dest", "document"),
                ("Sec-Fetch-User", "?1"),
                ("Referer", "https://evil.example/"),
            ],
        ),
        (
            "a client without fetch metadata",
            [("Accept", "text/html"), ("X-Nothing", ""), ("X-Nothing-2", ""), ("X-Nothing-3", ""), ("X-Nothing-4", "")],
        ),
    ];
    for (who, headers) in tries {
        let mut all = vec![("Cookie", cookie.as_str())];
        all.extend(headers);
        let r = gate.request("GET", "/.poort/admin/users", &all, b"").await;
        assert_eq!(r.status, 403, "{who}");
        assert!(!r.text().contains("bob"), "{who} reads nothing");
        assert!(r.text().contains("Admin pages open only from the portal"), "{who}: the administrator learns why");
    }
    // The address bar works.
    let typed = [
        ("Cookie", cookie.as_str()),
        ("Sec-Fetch-Site", "none"),
        ("Sec-Fetch-Mode", "navigate"),
        ("Sec-Fetch-Dest", "document"),
        ("Sec-Fetch-User", "?1"),
    ];
    assert_eq!(gate.request("GET", "/.poort/admin/users", &typed, b"").await.status, 200);

    // A form posted by a script, not by the person, changes nothing.
    let (csrf, field) = gate.login_form().await;
    let scripted = [("Sec-Fetch-Site", "same-origin"), ("Sec-Fetch-Mode", "cors"), ("Referer", app_page)];
    let r = gate
        .post_form_from(
            "/.poort/admin/users",
            &csrf,
            Some(&s),
            &[("csrf", &field), ("op", "disable"), ("name", "bob")],
            &scripted,
        )
        .await;
    assert_eq!(r.status, 403);
    assert!(!disabled(&gate, "bob"));
}

#[tokio::test]
async fn an_admin_action_lands_is_audited_and_needs_a_fresh_factor() {
    let gate = Gate::start().await;
    let (s, secret) = admin(&gate).await;
    let bob = gate.login("bob").await;
    let r = act(&gate, &s, "/.poort/admin/users", &[("op", "disable"), ("name", "bob")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("Disabled bob."));
    assert!(disabled(&gate, "bob"));
    crate::harness::eventually("bob's session ends", std::time::Duration::from_secs(3), async || {
        gate.status("/app/", Some(&bob)).await == 401
    })
    .await;
    let rec = gate.audit("admin");
    let last = rec.last().expect("the action is recorded");
    assert_eq!(last["command"], "console: user disable");
    assert_eq!(last["target"], "bob");
    assert_eq!(last["by"], "alice");
    assert_eq!(last["client"], "127.0.0.1");

    // Six minutes on, the proof is stale: the action waits for a new one.
    gate.clock.advance(6 * 60);
    let r = act(&gate, &s, "/.poort/admin/users", &[("op", "enable"), ("name", "bob")]).await;
    assert_eq!(r.status, 303);
    let back = format!("{ORIGIN}/.poort/confirm?next=%2F.poort%2Fadmin%2Fusers");
    assert_eq!(r.header("location"), Some(back.as_str()), "confirm, then back to the page of the form");
    assert!(disabled(&gate, "bob"), "nothing changed on a stale proof");
    let confirm = gate.get("/.poort/confirm?next=%2F.poort%2Fadmin%2Fusers", Some(&s)).await.text();
    assert!(confirm.contains("To make changes in the admin console"), "{confirm}");
    assert_eq!(open(&gate, "/.poort/admin/users", &s).await.status, 200, "reading needs no new proof");
    let code = totp::code_at_step(&secret, totp::step_at(gate.clock.now()));
    let s = gate.confirm(&s, &[("code", &code)]).await;
    let r = act(&gate, &s, "/.poort/admin/users", &[("op", "enable"), ("name", "bob")]).await;
    assert_eq!(r.status, 200);
    assert!(!disabled(&gate, "bob"));

    // A new user, with a password shown once, that works.
    let r = act(&gate, &s, "/.poort/admin/users", &[("op", "add"), ("name", "carol"), ("groups", "staff, ops")]).await;
    let text = r.text();
    let pw = text.split("shown only this once: <code>").nth(1).unwrap().split('<').next().unwrap().to_string();
    assert!(pw.len() >= 16);
    assert_eq!(gate.try_login("carol", &pw, "").await.status, 303);
    let carol = gate.store().list_users().unwrap().into_iter().find(|u| u.name == "carol").unwrap();
    assert_eq!(carol.groups, ["ops", "staff"]);

    // An administrator cannot lock themselves out from here.
    let r = act(&gate, &s, "/.poort/admin/users", &[("op", "groups"), ("name", "alice"), ("remove", "admins")]).await;
    assert!(r.text().contains("You cannot take yourself out of admins"));
    assert!(!disabled(&gate, "alice"));
}

#[tokio::test]
async fn taken_out_of_the_admin_group_the_console_closes_at_once() {
    let gate = Gate::start().await;
    let (s, _) = admin(&gate).await;
    assert_eq!(open(&gate, "/.poort/admin", &s).await.status, 200);
    let held = token(&gate, &s, "/.poort/admin/sessions").await;
    let now = gate.clock.now();
    gate.store().change_groups("alice", &[], &["admins".into()], now).unwrap();
    assert_eq!(open(&gate, "/.poort/admin", &s).await.status, 403);
    let r = gate.post("/.poort/admin/sessions", &s, &[("admin", &held), ("op", "end-all"), ("confirm", "yes")]).await;
    assert_eq!(r.status, 403, "a page loaded before is no way back in");
}

#[tokio::test]
async fn ending_sessions_and_lockdown_from_the_console_take_effect() {
    let gate = Gate::start().await;
    let (s, _) = admin(&gate).await;
    let bob = gate.login("bob").await;
    assert_eq!(gate.status("/app/", Some(&bob)).await, 200);
    let page = open(&gate, "/.poort/admin/sessions", &s).await.text();
    let row = page.split("<tr>").find(|r| r.contains(">bob</a>")).expect("bob's session is listed");
    assert!(row.contains("<td>app</td>"), "with the app it opened: {row}");
    // bob's command line holds a tunnel open: its session shows it until it closes.
    let cli = gate.cli_session("bob").await;
    let cookie = format!("__Host-poort={cli}");
    let ws =
        gate.websocket("localhost", "/.poort/tunnel/sink", &[("X-Poort-Client", "cli"), ("Cookie", &cookie)]).await;
    let ws = ws.expect("the tunnel opens");
    crate::harness::eventually("the open tunnel is listed", std::time::Duration::from_secs(3), async || {
        let page = open(&gate, "/.poort/admin/sessions", &s).await.text();
        page.split("<tr>").any(|r| r.contains("<td>cli</td>") && r.contains("<td>sink</td>"))
    })
    .await;
    drop(ws);
    crate::harness::eventually("the closed tunnel is not", std::time::Duration::from_secs(3), async || {
        let page = open(&gate, "/.poort/admin/sessions", &s).await.text();
        !page.contains("<td>sink</td>")
    })
    .await;
    // The browser that approved the command line was renewed; its first session ended.
    let bob = gate.login("bob").await;

    // Unconfirmed, nothing ends.
    let r = act(&gate, &s, "/.poort/admin/sessions", &[("op", "end-all")]).await;
    assert!(r.text().contains("Tick the box"));
    assert_eq!(gate.status("/app/", Some(&bob)).await, 200);
    let r = act(&gate, &s, "/.poort/admin/sessions", &[("op", "end-all"), ("confirm", "yes")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    crate::harness::eventually("bob's session ends", std::time::Duration::from_secs(3), async || {
        gate.status("/app/", Some(&bob)).await == 401
    })
    .await;
    assert_eq!(open(&gate, "/.poort/admin", &s).await.status, 200, "the administrator's own session stays");

    let r = act(&gate, &s, "/.poort/admin/mitigation", &[("lockdown", "on"), ("confirm", "yes")]).await;
    assert!(r.text().contains("Lockdown is on"), "{}", r.text());
    assert!(r.text().contains("Switch lockdown off"), "the page shows the state just set");
    crate::harness::eventually("lockdown holds bob out", std::time::Duration::from_secs(4), async || {
        gate.try_login("bob", PASSWORD, "").await.status != 303
    })
    .await;
    assert_eq!(open(&gate, "/.poort/admin", &s).await.status, 200, "administrators work on");
    let r = act(&gate, &s, "/.poort/admin/mitigation", &[("lockdown", "off"), ("confirm", "yes")]).await;
    assert!(r.text().contains("Lockdown is off"));
    let kinds: Vec<String> = gate.audit("admin").iter().map(|e| e["command"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds, ["console: session end-all", "console: lockdown", "console: lockdown"]);
}

#[tokio::test]
async fn the_access_page_says_why_a_user_cannot_open_an_app() {
    let gate = Gate::start().await;
    let (s, _) = admin(&gate).await;
    let page = open(&gate, "/.poort/admin/access?user=bob", &s).await.text();
    assert!(page.contains("bob is in: no groups"), "{page}");
    assert!(page.contains("denied: no allow rule matches"), "{page}");
    let page = open(&gate, "/.poort/admin/access?user=nobody", &s).await.text();
    assert!(page.contains("nobody is not a user here"));
    // The audit page filters by user, and its export is the same records.
    let page = open(&gate, "/.poort/admin/audit?user=bob&kind=login_succeeded", &s).await.text();
    assert!(!page.contains("\"user\":\"alice\""));
    let export = open(&gate, "/.poort/admin/audit/export?kind=login_succeeded&user=alice", &s).await;
    let lines: Vec<serde_json::Value> = export.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.len() >= 2, "alice signed in more than once");
    assert!(lines.iter().all(|l| l["event"]["user"] == "alice" && l["event"]["kind"] == "login_succeeded"));
    let verified = open(&gate, "/.poort/admin/audit?verify=1", &s).await.text();
    assert!(verified.contains("Hash chain intact"), "{verified}");
}

/// A script on an app routed by path shares the portal's origin: it can read the portal's
/// CSRF token and fake its page's address, and a click of the administrator's can make its
/// form post look like theirs. It cannot read a console page, so it has no console token.
#[tokio::test]
async fn a_console_form_needs_the_token_of_a_console_page_of_this_session() {
    let gate = Gate::start().await;
    let (s, secret) = admin(&gate).await;
    let disable = [("op", "disable"), ("name", "bob")];
    // Every header and the CSRF pair right, the console token missing or wrong.
    assert_eq!(gate.post("/.poort/admin/users", &s, &disable).await.status, 403);
    let wrong = [("admin", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"), ("op", "disable"), ("name", "bob")];
    assert_eq!(gate.post("/.poort/admin/users", &s, &wrong).await.status, 403);
    // The token of another session (the same administrator in another browser) is not this one's.
    gate.clock.advance(30);
    let other = gate.login("alice").await;
    let code = totp::code_at_step(&secret, totp::step_at(gate.clock.now()));
    let other = gate.post("/.poort/mfa", &other, &[("code", &code)]).await.cookie("__Host-poort").unwrap();
    let theirs = token(&gate, &other, "/.poort/admin/users").await;
    let r = gate.post("/.poort/admin/users", &s, &[("admin", &theirs), ("op", "disable"), ("name", "bob")]).await;
    assert_eq!(r.status, 403);
    assert!(!disabled(&gate, "bob"));
    let refused = gate.audit("access_denied");
    assert!(refused.iter().any(|e| e["app"] == "admin console" && e["user"] == "alice"), "{refused:?}");

    // A form posted into a frame, with everything else right, changes nothing either.
    let t = token(&gate, &s, "/.poort/admin/users").await;
    let (csrf, field) = gate.login_form().await;
    let referer = format!("{ORIGIN}/.poort/admin/users");
    let framed = [
        ("Sec-Fetch-Site", "same-origin"),
        ("Sec-Fetch-Mode", "navigate"),
        ("Sec-Fetch-Dest", "iframe"),
        ("Sec-Fetch-User", "?1"),
        ("Referer", referer.as_str()),
    ];
    let fields = [("csrf", field.as_str()), ("admin", t.as_str()), ("op", "disable"), ("name", "bob")];
    let r = gate.post_form_from("/.poort/admin/users", &csrf, Some(&s), &fields, &framed).await;
    assert_eq!(r.status, 403);
    assert!(!disabled(&gate, "bob"));
    // The same post as the page's own: it lands.
    assert_eq!(act(&gate, &s, "/.poort/admin/users", &disable).await.status, 200);
    assert!(disabled(&gate, "bob"));
}

#[tokio::test]
async fn what_the_console_takes_in_is_checked() {
    let gate = Gate::start().await;
    let (s, _) = admin(&gate).await;
    let users = "/.poort/admin/users";
    for email in ["a\"><img src=x onerror=alert(1)>@x.y", "n@x.y\n{\"kind\":\"admin\"}", "no-at-sign"] {
        let r = act(&gate, &s, users, &[("op", "add"), ("name", "mallory"), ("email", email)]).await;
        assert!(r.text().contains("not an email address poort accepts"), "{email:?}");
    }
    let r = act(&gate, &s, users, &[("op", "add"), ("name", "Alice")]).await;
    assert!(r.text().contains("The name Alice is taken"), "a name that differs only in case");
    let names: Vec<String> = gate.store().list_users().unwrap().into_iter().map(|u| u.name).collect();
    assert!(!names.iter().any(|n| n == "mallory" || n == "Alice"), "{names:?}");

    // An administrator's factors stay: without them the account is a password from here.
    let now = gate.clock.now();
    gate.store().change_groups("bob", &["admins".into()], &[], now).unwrap();
    let r = act(&gate, &s, users, &[("op", "mfa-reset"), ("name", "bob")]).await;
    assert!(r.text().contains("bob is an administrator"), "{}", r.text());

    // A date that is no date filters nothing in, rather than everything.
    let r = open(&gate, "/.poort/admin/audit?since=2026-12-32", &s).await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("is not a date"));
    assert!(!r.text().contains("login_succeeded</td>"));
    assert_eq!(open(&gate, "/.poort/admin/audit/export?until=bogus", &s).await.status, 400);

    assert_eq!(open(&gate, "/.poort/admin/audit?kind=bogus", &s).await.status, 400);

    // What is recorded is what changed: nothing for a user who does not exist, or a change
    // that changes nothing.
    let before = gate.audit("admin").len();
    let r = act(&gate, &s, users, &[("op", "disable"), ("name", "nobody")]).await;
    assert!(r.text().contains("No user nobody."));
    let r = act(&gate, &s, users, &[("op", "groups"), ("name", "bob"), ("remove", "Admins")]).await;
    assert!(r.text().contains("Nothing to change"), "bob is in admins, not Admins");
    assert_eq!(gate.audit("admin").len(), before);

    // Filtering by a user finds what was done by them and to them.
    let r = act(&gate, &s, users, &[("op", "unlock"), ("name", "bob")]).await;
    assert_eq!(r.status, 200);
    let export = open(&gate, "/.poort/admin/audit/export?kind=admin&user=bob", &s).await.text();
    assert!(export.contains("\"target\":\"bob\""), "{export}");
    let export = open(&gate, "/.poort/admin/audit/export?kind=admin&user=alice", &s).await.text();
    assert!(export.contains("\"by\":\"alice\""), "{export}");
}

#[tokio::test]
async fn the_mitigation_page_lists_every_rule_in_force_with_its_hits() {
    let dir = crate::harness::TempDir::new();
    let file = dir.0.join("rules.toml");
    let rules = r#"
[[rule]]
id = "vpns-path"
reason = "CVE-2019-19781 target directory"
action = "deny"
path_prefix = "/vpns"

[[rule]]
id = "watch-admin"
reason = "who looks for an admin page"
action = "log"
path_prefix = "/wp-admin"
"#;
    std::fs::write(&file, rules).unwrap();
    let gate = Gate::start_config("", &format!("\n[mitigate]\nrules_file = \"{}\"\n", file.display())).await;
    let (s, _) = admin(&gate).await;
    for _ in 0..2 {
        assert_eq!(gate.get("/vpns/portal/scripts/newbm.pl", None).await.status, 403);
    }
    let page = open(&gate, "/.poort/admin/mitigation", &s).await.text();
    let row =
        |id: &str| page.split("<tr>").find(|r| r.contains(&format!("<td>{id}</td>"))).unwrap_or_default().to_string();
    let vpns = row("vpns-path");
    assert!(vpns.contains("<td>deny</td>") && vpns.contains("CVE-2019-19781") && vpns.contains("<td>2</td>"), "{vpns}");
    let watch = row("watch-admin");
    assert!(watch.contains("<td>log</td>") && watch.contains("<td>0</td>"), "a rule not yet hit is listed too: {page}");

    // The report page counts the probes by rule and CVE, and draws them on the timeline.
    gate.refusals("mitigation_matched").await;
    let day = poort::clock::format_utc(gate.clock.now())[..10].to_string();
    let report = open(&gate, &format!("/.poort/admin/report?since={day}&until={day}"), &s).await.text();
    let probes = report.split("<tr>").find(|r| r.contains("<td>vpns-path</td>")).unwrap_or_default();
    assert!(probes.contains("<td>CVE-2019-19781</td><td>2</td>"), "{report}");
    assert!(report.contains("<rect ") && report.contains("fill=\"#b3261e\""), "a red bar for the refused requests");
    assert_eq!(open(&gate, "/.poort/admin/report?since=yesterday", &s).await.status, 400);
}

/// Three nodes on one PostgreSQL, requests alternating between them: a console page from one
/// node and its form posted to the next works (the token is keyed with the shared secret), and
/// taking the administrator out of the group, or revoking the session, closes the console on
/// every node.
#[tokio::test]
async fn the_console_holds_across_nodes() {
    let pg = crate::cluster::Postgres::start();
    let mut gate = Gate::start_on(&pg.database("console")).await;
    gate.add_node().await;
    gate.add_node().await;
    let (s, _) = admin(&gate).await;
    for _ in 0..3 {
        // `act` reads the page on one node and posts on the next.
        let r = act(&gate, &s, "/.poort/admin/users", &[("op", "unlock"), ("name", "bob")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(gate.audit("admin").len(), 3);

    // Every node, three requests in a row, answers `status` for the console.
    let every_node = async |status: u16| {
        let mut all = true;
        for _ in 0..3 {
            all &= open(&gate, "/.poort/admin", &s).await.status == status;
        }
        all
    };
    let limit = std::time::Duration::from_secs(4);
    let store = gate.store();
    store.change_groups("alice", &[], &["admins".into()], gate.clock.now()).unwrap();
    crate::harness::eventually("every node refuses a former administrator", limit, async || every_node(403).await)
        .await;
    store.change_groups("alice", &["admins".into()], &[], gate.clock.now()).unwrap();
    crate::harness::eventually("and lets her in again", limit, async || every_node(200).await).await;
    store.revoke_user_sessions("alice", gate.clock.now()).unwrap();
    crate::harness::eventually("every node sends a revoked session to sign in", limit, async || every_node(302).await)
        .await;
}

/// A person's SSH keys show on their page in the console, and the reset offered there names
/// them.
#[tokio::test]
async fn the_user_page_lists_ssh_keys() {
    use base64::Engine;
    let gate = Gate::start().await;
    let (s, _) = admin(&gate).await;
    let mut blob = Vec::new();
    for part in [&b"ssh-ed25519"[..], &[7u8; 32][..]] {
        blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
        blob.extend_from_slice(part);
    }
    let line = format!("ssh-ed25519 {}", base64::engine::general_purpose::STANDARD.encode(&blob));
    let key = poort::ssh::parse_public_key(&line).unwrap();
    let now = gate.clock.now();
    gate.store().with(|c| poort::ssh::add_key(c, "bob", "build box", &key, now)).unwrap().unwrap();
    let page = open(&gate, "/.poort/admin/user?name=bob", &s).await.text();
    assert!(page.contains(&key.fingerprint) && page.contains("build box") && page.contains("SSH keys: 1"), "{page}");
    assert!(page.contains("Remove second factors and SSH keys"));
}
