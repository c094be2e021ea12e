//! Directory sign-in against a real OpenLDAP `slapd` on loopback (LDAPS with a test CA),
//! loaded with tests/ldap/directory.ldif.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Gate, Reaped, TempDir, closed_port, wait_for_port};

const SUFFIX: &str = "dc=example,dc=org";

/// A running slapd: LDAPS for poort, plain LDAP (loopback) only to load the test data.
pub struct Slapd {
    dir: TempDir,
    ldaps: u16,
    process: Option<Reaped>,
}

fn wait_for(port: u16) {
    wait_for_port(port, "slapd", Duration::from_secs(10));
}

impl Slapd {
    pub fn start() -> Slapd {
        let dir = TempDir::new();
        let d = dir.0.clone();
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        std::fs::write(d.join("cert.pem"), ck.cert.pem()).unwrap();
        std::fs::write(d.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
        std::fs::write(d.join("bind-password"), "service-account-secret\n").unwrap();
        std::fs::create_dir_all(d.join("db")).unwrap();
        let template = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ldap/slapd.conf");
        let conf = std::fs::read_to_string(template).unwrap().replace("@DIR@", &d.display().to_string());
        std::fs::write(d.join("slapd.conf"), conf).unwrap();
        let (ldaps, ldap) = (closed_port(), closed_port());
        let mut slapd = Slapd { dir, ldaps, process: None };
        slapd.run(ldap);
        let out = Command::new("ldapadd")
            .args(["-x", "-H", &format!("ldap://127.0.0.1:{ldap}"), "-D", &format!("cn=admin,{SUFFIX}")])
            .args(["-w", "admin-secret", "-f"])
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ldap/directory.ldif"))
            .output()
            .expect("ldapadd is installed (scripts/test installs ldap-utils)");
        assert!(out.status.success(), "loading the directory failed: {}", String::from_utf8_lossy(&out.stderr));
        slapd
    }

    fn run(&mut self, ldap: u16) {
        let d = &self.dir.0;
        let urls = format!("ldaps://127.0.0.1:{}/ ldap://127.0.0.1:{ldap}/", self.ldaps);
        let child = Command::new("/usr/sbin/slapd")
            .args(["-d", "0", "-h", &urls, "-f"])
            .arg(d.join("slapd.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("OpenLDAP slapd is installed (scripts/test installs it)");
        self.process = Some(Reaped(child));
        wait_for(self.ldaps);
        wait_for(ldap);
    }

    fn stop(&mut self) {
        self.process = None;
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.ldaps)).is_ok() {
            assert!(start.elapsed() < Duration::from_secs(10), "slapd did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// poort's `[auth.ldap]` for this directory, plus `extra` lines.
    pub fn config(&self, extra: &str) -> String {
        let d = self.dir.0.display();
        format!(
            r#"
[auth.ldap]
url = "ldaps://127.0.0.1:{port}"
ca_file = "{d}/cert.pem"
bind_dn = "cn=poort,ou=services,{SUFFIX}"
bind_password_file = "{d}/bind-password"
base_dn = "ou=people,{SUFFIX}"
user_filter = "(uid={{user}})"
disabled_filter = "(employeeType=disabled)"
timeout = "2s"
{extra}
"#,
            port = self.ldaps
        )
    }
}

const MAPPED: &str = r#"group_map = { "engineering" = "staff", "Remote Staff" = "remote" }
allowed_groups = ["remote", "staff"]"#;

#[tokio::test]
async fn directory_users_sign_in_with_their_groups_and_nobody_else_does() {
    let slapd = Slapd::start();
    let gate = Gate::start_config("", &slapd.config(MAPPED)).await;

    // carol: right password; engineering maps to staff, so the staff-only app opens.
    let r = gate.try_login("carol", "carol-directory-password", "").await;
    assert_eq!(r.status, 303, "{}", r.text());
    let carol = r.cookie("__Host-poort").unwrap();
    assert_eq!(gate.get("/staff/", Some(&carol)).await.status, 200);
    let seen = gate.upstream.last();
    assert_eq!(seen.header("x-poort-user"), Some("carol"));
    assert_eq!(seen.header("x-poort-email"), Some("carol@example.org"));
    assert_eq!(seen.header("x-poort-groups"), Some("remote,staff"));

    // dave is in Remote Staff only: signed in, but the staff app stays closed.
    let r = gate.try_login("dave", "dave-directory-password", "").await;
    assert_eq!(r.status, 303);
    let dave = r.cookie("__Host-poort").unwrap();
    assert_eq!(gate.get("/staff/", Some(&dave)).await.status, 403);
    assert_eq!(gate.get("/app/", Some(&dave)).await.status, 200);

    // Wrong and empty passwords, a disabled account, a user in no allowed group.
    for (user, pw) in [
        ("carol", "carol-wrong-password"),
        ("carol", ""),
        ("erin", "erin-directory-password"),
        ("frank", "frank-directory-password"),
        ("nobody", "carol-directory-password"),
    ] {
        let r = gate.try_login(user, pw, "").await;
        assert_eq!(r.status, 401, "{user} with {pw:?}");
        assert!(r.cookie("__Host-poort").is_none());
    }

    // The users poort has seen are listed with their source; the refused ones are not there.
    let out = gate.cli(&["user", "list"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    let line = listing.lines().find(|l| l.starts_with("carol")).expect("carol is listed");
    assert!(line.contains("ldap") && line.contains("staff"), "{listing}");
    assert!(!listing.lines().any(|l| l.starts_with("erin") || l.starts_with("frank")), "{listing}");
}

#[tokio::test]
async fn ldap_injection_in_the_username_matches_nobody() {
    let slapd = Slapd::start();
    // No allow-list here: a filter that matched anyone would sign them in.
    let gate = Gate::start_config("", &slapd.config("")).await;
    for user in ["*", "carol)(|(uid=*", "*)(uid=*))(|(uid=*", "carol\\00", "c*", "carol)(uid=dave", "\u{0}"] {
        for pw in ["carol-directory-password", "dave-directory-password", "x"] {
            let r = gate.try_login(user, pw, "").await;
            assert_ne!(r.status, 303, "{user:?} signed in");
            assert!(r.cookie("__Host-poort").is_none(), "{user:?}");
        }
    }
    // The real name still works after all that (no lock on carol from the odd names).
    assert_eq!(gate.try_login("carol", "carol-directory-password", "").await.status, 303);
}

#[tokio::test]
async fn groups_can_come_from_a_group_search() {
    let slapd = Slapd::start();
    let extra = format!(
        "groups = \"search\"\ngroup_base_dn = \"ou=groups,{SUFFIX}\"\ngroup_filter = \"(&(objectClass=groupOfNames)(member={{dn}}))\"\ngroup_map = {{ \"engineering\" = \"staff\" }}"
    );
    let gate = Gate::start_config("", &slapd.config(&extra)).await;
    let r = gate.try_login("carol", "carol-directory-password", "").await;
    assert_eq!(r.status, 303);
    let carol = r.cookie("__Host-poort").unwrap();
    assert_eq!(gate.get("/staff/", Some(&carol)).await.status, 200);
    // "Remote Staff" has a space, so without a mapping it is not a poort group.
    assert_eq!(gate.upstream.last().header("x-poort-groups"), Some("staff"));
}

#[tokio::test]
async fn with_the_directory_down_sign_in_fails_clearly_and_sessions_go_on() {
    let mut slapd = Slapd::start();
    let gate = Gate::start_config("", &slapd.config(MAPPED)).await;
    let r = gate.try_login("carol", "carol-directory-password", "").await;
    assert_eq!(r.status, 303);
    let carol = r.cookie("__Host-poort").unwrap();
    let live = gate.cli(&["check", "--live"]);
    assert!(live.status.success(), "{}", String::from_utf8_lossy(&live.stdout));
    assert!(String::from_utf8_lossy(&live.stdout).contains("answered a service bind"));

    slapd.stop();
    let live = gate.cli(&["check", "--live"]);
    assert_eq!(live.status.code(), Some(1), "{}", String::from_utf8_lossy(&live.stdout));
    let r = gate.try_login("dave", "dave-directory-password", "").await;
    assert_eq!(r.status, 503);
    assert!(r.text().contains("directory cannot be reached"), "{}", r.text());
    assert!(r.cookie("__Host-poort").is_none());
    // carol's session does not depend on the directory.
    assert_eq!(gate.get("/staff/", Some(&carol)).await.status, 200);
    // Local accounts still sign in.
    assert_eq!(gate.try_login("alice", crate::harness::PASSWORD, "").await.status, 303);
}

/// The login form already refuses names with filter characters; the directory client escapes
/// them too, so a caller that skips the form cannot change the filter either.
#[tokio::test]
async fn the_directory_client_escapes_what_it_is_given() {
    use poort::identity::ldap::{Directory, Refusal};
    let slapd = Slapd::start();
    let cfg = poort::config::parse(&slapd.config(""), std::path::Path::new("/")).unwrap();
    let dir = Directory::new(cfg.auth.ldap.unwrap()).unwrap();
    assert_eq!(dir.authenticate("carol", "carol-directory-password").await.map(|u| u.name), Ok("carol".into()));
    for user in ["c*", "*", "carol)(uid=dave", "*)(uid=*))(|(uid=*", "carol\0", "ca\\72ol"] {
        for pw in ["carol-directory-password", "dave-directory-password"] {
            assert_eq!(dir.authenticate(user, pw).await, Err(Refusal::Wrong), "{user:?} with {pw}");
        }
    }
}

/// A lock counts on the account, however its name is typed: after carol is locked, `Carol`,
/// `CAROL` and `cArOl` are the same locked account, and the right password under any of them
/// does not sign in.
#[tokio::test]
async fn a_directory_lock_holds_for_every_spelling_of_the_name() {
    let slapd = Slapd::start();
    let gate = Gate::start_config("", &slapd.config("")).await;
    for typed in ["carol", "Carol", "CAROL", "cArOl", "carol"] {
        let r = gate.try_login(typed, "carol-wrong-password", "").await;
        assert_eq!(r.status, 401);
    }
    let locks = gate.audit("account_locked");
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!(locks[0]["user"], "carol");
    for typed in ["Carol", "CAROL", "cArOl", "carol"] {
        let r = gate.try_login(typed, "carol-directory-password", "").await;
        assert_eq!((typed, r.status), (typed, 401), "the lock was walked past");
        assert!(r.cookie("__Host-poort").is_none());
    }
    assert!(gate.cli(&["user", "unlock", "carol"]).status.success());
    let r = gate.try_login("CAROL", "carol-directory-password", "").await;
    assert_eq!(r.status, 303);
    // The session is carol's, as the directory names her.
    let s = r.cookie("__Host-poort").unwrap();
    assert_eq!(gate.get("/app/", Some(&s)).await.status, 200);
    assert_eq!(gate.upstream.last().header("x-poort-user"), Some("carol"));
}
