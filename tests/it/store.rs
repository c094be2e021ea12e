//! The store's operations, run alike on both engines: the embedded SQLite file and a real
//! PostgreSQL (started here, as in cluster.rs). What one engine accepts and the other refuses
//! (a type, a conflict clause, a quoted name) shows up here before it shows up in a gateway.

use poort::config::LockPolicy;
use poort::db::Conn;
use poort::identity::{mfa, totp};
use poort::store::{Database, Store, Synced, flows};

use crate::cluster::Postgres;
use crate::harness::TempDir;

fn suite(db: Database) {
    let store = Store::open(db.clone()).unwrap();
    let with = |f: &dyn Fn(&mut Conn) -> poort::db::Result<()>| store.with(|c| f(c)).unwrap();

    let last = store.last_revocation().unwrap();
    // Users and groups.
    store.add_user("alice", Some("alice@example.com"), "hash-a", &["staff".into(), "ops".into()], 10).unwrap();
    store.add_user("bob", None, "hash-b", &[], 10).unwrap();
    assert!(store.add_user("alice", None, "x", &[], 11).is_err(), "a name is taken once");
    let users = store.list_users().unwrap();
    assert_eq!(users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(), ["alice", "bob"]);
    assert_eq!(users[0].groups, ["ops", "staff"]);
    assert!(!users[0].disabled);
    store.change_groups("bob", &["staff".into()], &[], 12).unwrap();
    assert!(store.set_disabled("bob", true, 13).unwrap());
    with(&|c| {
        assert_eq!(Store::password_hash(c, "alice")?.as_deref(), Some("hash-a"));
        assert_eq!(Store::password_hash(c, "bob")?, None, "a disabled user has no password");
        assert_eq!(Store::user_source(c, "bob")?, Some(("local".into(), true)));
        Ok(())
    });
    assert!(store.set_disabled("bob", false, 14).unwrap());

    // Outside sources cannot take names, and follow their subject.
    let sync = |name: &str, sub: Option<&str>, source: &str| {
        store.with(|c| Store::sync_external(c, name, sub, None, source, &["x".into()], 15)).unwrap()
    };
    assert_eq!(sync("alice", None, "ldap"), Synced::OtherSource);
    assert_eq!(sync("carol", Some("s1"), "oidc:a"), Synced::Yes("carol".into()));
    assert_eq!(sync("carol", Some("s2"), "oidc:a"), Synced::OtherSubject);
    assert_eq!(sync("carol-new", Some("s1"), "oidc:a"), Synced::Yes("carol".into()));
    with(&|c| {
        assert_eq!(Store::user_by_subject(c, "oidc:a", "s1")?.as_deref(), Some("carol"));
        assert_eq!(Store::identity(c, "carol")?.unwrap().groups, ["x"]);
        Ok(())
    });

    // Sessions, tokens, revocations in order.
    let row = |id: &str, user: &str| poort::store::SessionRow {
        id: id.into(),
        user: user.into(),
        created_at: 100,
        last_seen: 100,
        expires_at: 10_000,
        client_addr: "127.0.0.1".into(),
        user_agent: "test".into(),
        factors: "pwd".into(),
        auth_at: 100,
        factor_at: None,
        kind: "browser".into(),
        parent: None,
        chain: id.into(),
    };
    store.with(|c| Store::insert_session(c, &row("s1", "alice"), &[1; 32], "localhost", None)).unwrap();
    store.with(|c| Store::insert_session(c, &row("s2", "bob"), &[2; 32], "localhost", None)).unwrap();
    with(&|c| {
        assert!(Store::add_token(c, "s1", &[3; 32], "git.localhost")?);
        assert!(!Store::add_token(c, "gone", &[4; 32], "git.localhost")?);
        let (s, host, id) = Store::load_session(c, &[3; 32])?.unwrap();
        assert_eq!(
            (s.id.as_str(), host.as_str(), id.email.as_deref()),
            ("s1", "git.localhost", Some("alice@example.com"))
        );
        Store::set_logout_url(c, "s1", "https://idp/logout")?;
        assert_eq!(Store::logout_url(c, "s1")?.as_deref(), Some("https://idp/logout"));
        Ok(())
    });
    store.touch_sessions(&[("s1".into(), 500), ("s1".into(), 400)]).unwrap();
    assert_eq!(store.list_sessions(Some("alice")).unwrap()[0].last_seen, 500, "last seen never goes back");
    assert_eq!(store.revoke_user_sessions("bob", 600).unwrap(), ["s2"]);
    assert!(store.revoke_session("s1", 601).unwrap());
    assert!(store.list_sessions(None).unwrap().is_empty());
    let revs = store.with(|c| Store::revocations_since(c, last)).unwrap();
    let seqs: Vec<i64> = revs.iter().map(|r| r.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    let ended: Vec<&str> = revs.iter().filter_map(|r| r.session_id.as_deref()).collect();
    // (Disabling bob ended no session: he had none then.)
    assert_eq!(ended, ["s2", "s1"]);
    assert!(revs.iter().any(|r| r.user.as_deref() == Some("bob")), "user changes are revocations too");
    assert_eq!(store.purge_expired(20_000, 60, 3600).unwrap(), 0);

    // Second factors: TOTP replay, recovery codes, lockouts, passkey handles.
    let sealer_dir = TempDir::new();
    let sealer = poort::identity::seal::Sealer::load_or_create(&sealer_dir.0.join("secrets.key")).unwrap();
    let secret = store.with(|c| mfa::totp_begin(c, &sealer, "alice", 1000)).unwrap().unwrap();
    let code = totp::code_at_step(&secret, totp::step_at(1000));
    assert!(store.with(|c| mfa::totp_check(c, &sealer, "alice", &code, 1000, true)).unwrap());
    assert!(!store.with(|c| mfa::totp_check(c, &sealer, "alice", &code, 1000, false)).unwrap(), "a replay");
    let later = totp::code_at_step(&secret, totp::step_at(1030));
    assert!(store.with(|c| mfa::totp_check(c, &sealer, "alice", &later, 1030, false)).unwrap());
    let codes = store.with(|c| mfa::recovery_new(c, "alice")).unwrap();
    assert!(store.with(|c| mfa::recovery_use(c, "alice", &codes[0].to_uppercase(), 1040)).unwrap());
    assert!(!store.with(|c| mfa::recovery_use(c, "alice", &codes[0], 1041)).unwrap(), "a code works once");
    let f = store.with(|c| mfa::factors(c, "alice")).unwrap();
    assert!(f.totp && f.recovery_left == 9 && f.passkeys == 0);
    let policy = LockPolicy { after: 3, base_secs: 60, max_secs: 3600 };
    let fail = |now| store.with(|c| mfa::record_failure(c, policy, "alice", mfa::Lock::Factor, now)).unwrap();
    assert_eq!((fail(2000), fail(2001)), (None, None));
    assert_eq!(fail(2002), Some((3, 2062)));
    assert_eq!(fail(2003), Some((4, 2123)));
    with(&|c| {
        assert!(mfa::locked(c, "alice", mfa::Lock::Factor, 2100)?);
        assert!(
            !mfa::succeeded(c, "alice", mfa::Lock::Factor, 2100)?,
            "a right code checked while locked does not stand"
        );
        assert!(mfa::locked(c, "alice", mfa::Lock::Factor, 2100)?, "...nor lifts the lock");
        assert!(!mfa::locked(c, "alice", mfa::Lock::Password, 2100)?, "the locks count apart");
        assert!(mfa::unlock(c, "alice", mfa::Lock::Factor)?);
        let handle = poort::identity::passkey::handle(c, "alice")?;
        assert_eq!(poort::identity::passkey::handle(c, "alice")?, handle, "made once");
        assert_eq!(poort::identity::passkey::user_by_handle(c, &handle)?.as_deref(), Some("alice"));
        Ok(())
    });
    store.with(|c| mfa::reset(c, "alice")).unwrap();
    assert!(!store.with(|c| mfa::factors(c, "alice")).unwrap().any());

    // Flows: once, until their expiry, changed only as read.
    with(&|c| {
        assert!(flows::put(c, flows::HANDOFF, "code-1", &"v1", 3000)?);
        assert!(!flows::put(c, flows::HANDOFF, "code-1", &"other", 3000)?, "an id is taken once");
        assert_eq!(flows::count(c, flows::HANDOFF, 2999)?, 1);
        let (v, text) = flows::get::<String>(c, flows::HANDOFF, "code-1", 2999)?.unwrap();
        assert_eq!(v, "v1");
        assert!(flows::replace(c, flows::HANDOFF, "code-1", &text, &"v2")?);
        assert!(!flows::replace(c, flows::HANDOFF, "code-1", &text, &"v3")?, "changed since it was read");
        assert_eq!(flows::take::<String>(c, flows::HANDOFF, "code-1", 2999)?.as_deref(), Some("v2"));
        assert_eq!(flows::take::<String>(c, flows::HANDOFF, "code-1", 2999)?, None, "taken once");
        flows::put(c, flows::HANDOFF, "code-2", &"v", 3000)?;
        assert_eq!(flows::take::<String>(c, flows::HANDOFF, "code-2", 3000)?, None, "expired");
        let raw: i64 =
            c.query_row("SELECT count(*) FROM flows WHERE id = 'code-1' OR id = 'code-2'", (), |r| r.get(0))?;
        assert_eq!(raw, 0, "ids are stored hashed");
        assert_eq!((flows::attempt(c, "10.0.0.1", 60)?, flows::attempt(c, "10.0.0.1", 119)?), (1, 2));
        assert_eq!(flows::attempt(c, "10.0.0.1", 120)?, 1, "a new minute counts from one");
        Ok(())
    });
    store.with(|c| flows::put(c, flows::SSO, "st", &"v", 10)).unwrap();
    assert!(store.sweep_flows(5000).unwrap() >= 2);

    // Settings and the audit chain.
    store.set_setting("lockdown", "on").unwrap();
    store.set_setting("lockdown", "off").unwrap();
    assert_eq!(store.with(|c| Store::setting(c, "lockdown")).unwrap().as_deref(), Some("off"));
    let mut conn = poort::store::open_connection(db).unwrap();
    let ev = |u: &str| poort::audit::Event::LoginFailed { user: u.into(), client: [127, 0, 0, 1].into() };
    poort::audit::append(&mut conn, 100, &[ev("a"), ev("b")]).unwrap();
    poort::audit::append(&mut conn, 101, &[ev("c")]).unwrap();
    assert!(matches!(poort::audit::verify(&conn).unwrap(), poort::audit::Verdict::Intact { records: 3, .. }));
    assert_eq!(poort::audit::tail(&conn, 2).unwrap().iter().map(|r| r.seq).collect::<Vec<_>>(), [2, 3]);
}

#[test]
fn the_store_behaves_alike_on_sqlite() {
    let dir = TempDir::new();
    suite(Database::Sqlite(dir.0.join("poort.db")));
}

#[test]
fn the_store_behaves_alike_on_postgresql() {
    let pg = Postgres::start();
    suite(Database::Postgres { url: pg.database("suite"), tls: None });
}
