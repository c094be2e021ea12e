//! Reloading the config while serving: each kind of change under a bounded load loop with no
//! failed request; open WebSockets and tunnels that lose their access are cut within a second
//! while the others go on; a bad config or one that needs a restart changes nothing; SIGHUP, a
//! change to the file and `poort reload` each trigger it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Gate, eventually};

/// Requests as alice from four clients (two on fresh connections, two on one kept-alive HTTP/2
/// connection each) until `stop`; returns (answered 200, anything else) with samples.
fn load(gate: &Arc<Gate>, session: &str, stop: &Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    let (gate, session, stop) = (gate.clone(), session.to_string(), stop.clone());
    tokio::spawn(async move {
        let ok = Arc::new(AtomicU64::new(0));
        let bad = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..4 {
            let (gate, session, stop, ok, bad) = (gate.clone(), session.clone(), stop.clone(), ok.clone(), bad.clone());
            tasks.push(tokio::spawn(async move {
                let mut h2 = if i >= 2 { Some(gate.h2().await) } else { None };
                // Bounded: stops by itself even if the test does not.
                for n in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let status = match &mut h2 {
                        None => gate.get("/app/load", Some(&session)).await.status,
                        Some(h2) => {
                            let req = http::Request::get(format!("https://localhost:8443/app/h2-{n}"))
                                .header("cookie", format!("__Host-poort={session}"))
                                .body(http_body_util::Empty::new())
                                .unwrap();
                            match h2.send_request(req).await {
                                Ok(r) => r.status().as_u16(),
                                Err(e) => {
                                    bad.lock().push(format!("h2: {e}"));
                                    continue;
                                }
                            }
                        }
                    };
                    if status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        bad.lock().push(format!("client {i}: {status}"));
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let bad = bad.lock().clone();
        (ok.load(Ordering::Relaxed), bad)
    })
}

/// A second certificate for the same names and key: the test client trusts it too.
fn second_certificate(gate: &Gate) -> Vec<u8> {
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(gate.dir.0.join("key.pem")).unwrap()).unwrap();
    let names = ["localhost", "git.localhost", "fwd.localhost", "jupyter.localhost", "django.localhost"];
    let mut params = rcgen::CertificateParams::new(names.map(String::from).to_vec()).unwrap();
    params.serial_number = Some(rcgen::SerialNumber::from(vec![7, 7, 7]));
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(gate.dir.0.join("cert2.pem"), cert.pem()).unwrap();
    cert.der().to_vec()
}

/// The certificate a new connection gets (a fresh client, trusting anything: no resumed
/// session, and no check that would hide which certificate came).
async fn served_certificate(gate: &Gate) -> Vec<u8> {
    let cfg = poort::tls_client::config(&poort::tls_client::Trust::Anything, None, &[]).unwrap();
    let tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_reload_under_load_fails_no_request() {
    let gate = Arc::new(Gate::start().await);
    let alice = gate.login("alice").await;
    let bob = gate.login("bob").await;
    assert_eq!(gate.get("/app/first", Some(&alice)).await.status, 200);
    let stop = Arc::new(AtomicBool::new(false));
    let loop_ = load(&gate, &alice, &stop);
    let pause = || tokio::time::sleep(Duration::from_millis(300));
    pause().await;

    // A new app.
    assert_eq!(gate.get("/extra/", Some(&alice)).await.status, 404);
    gate.edit_config(|t| {
        format!("{t}\n[[app]]\nname = \"extra\"\nupstream = \"http://{}\"\npath = \"/extra/\"\naccess = \"authenticated\"\n", gate.upstream.addr)
    });
    let r = gate.reload().await.unwrap();
    assert_eq!(r.changed, ["app"]);
    assert_eq!(gate.get("/extra/", Some(&alice)).await.status, 200);
    pause().await;

    // A narrowed access rule.
    assert_eq!(gate.get("/vault/", Some(&bob)).await.status, 401, "signed in, asked for a second factor");
    gate.edit_config(|t| {
        t.replacen(
            "path = \"/vault/\"\naccess = \"authenticated\"",
            "path = \"/vault/\"\naccess = { rules = [{ effect = \"allow\", groups = [\"staff\"] }] }",
            1,
        )
    });
    assert_eq!(gate.reload().await.unwrap().changed, ["app"]);
    assert_eq!(gate.get("/vault/", Some(&bob)).await.status, 403);
    pause().await;

    // Second-factor settings, session timeouts and sign-in limits.
    gate.edit_config(|t| format!("{t}\n[mfa]\nissuer = \"Reloaded\"\n[session]\nidle_timeout = \"45m\"\n[login]\nper_address_per_minute = 50\n"));
    let r = gate.reload().await.unwrap();
    assert_eq!(r.changed, ["session", "mfa", "login"]);
    assert_eq!(gate.running.as_ref().unwrap().gateway().state.sessions.timeouts().idle, Duration::from_secs(2700));
    pause().await;

    // A tunnel, a single sign-on provider and the access log.
    std::fs::write(gate.dir.0.join("oidc-secret"), "s3cret").unwrap();
    gate.edit_config(|t| {
        format!(
            "{t}\n[[tunnel]]\nname = \"more\"\ntarget = \"{}\"\naccess = \"authenticated\"\n\
             [auth.oidc.corp]\ntitle = \"Corp ID\"\nissuer = \"http://127.0.0.1:1\"\nclient_id = \"poort\"\nclient_secret_file = \"oidc-secret\"\n\
             [log]\naccess = false\n",
            gate.sink.addr
        )
    });
    assert_eq!(gate.reload().await.unwrap().changed, ["tunnel", "auth", "log"]);
    let login = gate.get("/.poort/login", None).await.text();
    assert!(login.contains("Corp ID"), "the new provider is offered: {login}");
    pause().await;

    // The certificate: new connections get the new one, open ones go on.
    let der = second_certificate(&gate);
    assert_ne!(served_certificate(&gate).await, der);
    gate.edit_config(|t| t.replacen("cert_file = \"cert.pem\"", "cert_file = \"cert2.pem\"", 1));
    assert_eq!(gate.reload().await.unwrap().changed, ["tls"]);
    assert_eq!(served_certificate(&gate).await, der);
    pause().await;

    // Connection settings of the listener.
    gate.edit_config(|t| t.replacen("[store]", "idle_timeout = \"61s\"\nmax_connections = 5000\n[store]", 1));
    assert_eq!(gate.reload().await.unwrap().changed, ["server"]);
    pause().await;

    // A config with a mistake, and one that needs a restart: nothing changes.
    let good = std::fs::read_to_string(&gate.config_path).unwrap();
    gate.edit_config(|t| t.replacen("path = \"/extra/\"", "path = \"extra\"", 1));
    let why = gate.reload().await.unwrap_err();
    assert!(why.contains("app[extra].path"), "{why}");
    assert_eq!(gate.get("/extra/", Some(&alice)).await.status, 200);
    gate.edit_config(|_| good.replacen("access = false", "access = false\nformat = \"json\"", 1));
    let why = gate.reload().await.unwrap_err();
    assert!(why.contains("log.format changed"), "{why}");
    gate.edit_config(|_| good.replacen("[store]", "workers = 7\n[store]", 1));
    let why = gate.reload().await.unwrap_err();
    assert!(why.contains("server.workers changed") && why.contains("restart"), "{why}");
    assert_eq!(gate.running.as_ref().unwrap().gateway().state.cfg.server.workers, 2);
    pause().await;

    stop.store(true, Ordering::Relaxed);
    let (ok, bad) = loop_.await.unwrap();
    assert!(
        bad.is_empty(),
        "{} of {} requests failed: {:?}",
        bad.len(),
        ok + bad.len() as u64,
        &bad[..bad.len().min(8)]
    );
    assert!(ok > 100, "the load loop ran ({ok} requests)");

    // The session's state for an app that stayed: its first access was audited once.
    let opened = gate.audit("access_allowed");
    let app = opened.iter().filter(|e| e["app"] == "app" && e["user"] == "alice").count();
    assert_eq!(app, 1, "{opened:?}");
    // Every reload and refusal is audited and counted.
    assert_eq!(gate.audit("config_reloaded").len(), 6);
    let refused = gate.audit("config_refused");
    assert_eq!(refused.len(), 3);
    assert_eq!(refused[0]["trigger"], "poort reload");
    let metrics = gate.scrape().await;
    assert!(metrics.contains("poort_config_reloads_total{result=\"loaded\"} 6"), "{metrics}");
    assert!(metrics.contains("poort_config_reloads_total{result=\"refused\"} 3"), "{metrics}");
}

/// Opens a WebSocket to the echo app as `session` and checks it echoes.
async fn echo(
    gate: &Gate,
    session: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let cookie = format!("__Host-poort={session}");
    let mut ws = gate.websocket("localhost", "/ws/", &[("Cookie", &cookie)]).await.unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
    ws
}

/// Whether the WebSocket was closed by the gateway (as opposed to still echoing).
async fn closed_within(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    limit: Duration,
) -> bool {
    let start = Instant::now();
    match tokio::time::timeout(limit, ws.next()).await {
        Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => start.elapsed() < limit,
        Ok(Some(Ok(m))) => panic!("unexpected message {m:?}"),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_narrowed_rule_or_a_removed_app_ends_open_websockets_within_a_second() {
    let gate = Gate::start().await;
    let alice = gate.login("alice").await;
    let bob = gate.login("bob").await;
    let mut a = echo(&gate, &alice).await;
    let mut b = echo(&gate, &bob).await;

    // A change to another app leaves both open.
    gate.edit_config(|t| t.replacen("path = \"/pub/\"", "path = \"/public/\"", 1));
    assert_eq!(gate.reload().await.unwrap().cut, 0);
    for ws in [&mut a, &mut b] {
        ws.send(Message::text("still")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("still"));
    }

    // Narrowed to staff: bob's ends, alice's goes on.
    gate.edit_config(|t| {
        t.replacen(
            "path = \"/ws/\"\naccess = \"authenticated\"",
            "path = \"/ws/\"\naccess = { rules = [{ effect = \"allow\", groups = [\"staff\"] }] }",
            1,
        )
    });
    let r = gate.reload().await.unwrap();
    assert_eq!(r.cut, 1);
    assert!(closed_within(&mut b, Duration::from_secs(1)).await, "bob's WebSocket stayed open");
    a.send(Message::text("mine")).await.unwrap();
    assert_eq!(a.next().await.unwrap().unwrap(), Message::text("mine"));
    assert_eq!(
        gate.websocket("localhost", "/ws/", &[("Cookie", &format!("__Host-poort={bob}"))]).await.err(),
        Some(403)
    );

    // The app removed: alice's ends too.
    gate.edit_config(|t| t.replacen("name = \"ws\"", "name = \"ws-gone\"", 1));
    assert_eq!(gate.reload().await.unwrap().cut, 1);
    assert!(closed_within(&mut a, Duration::from_secs(1)).await, "alice's WebSocket stayed open");
    let reloaded = gate.audit("config_reloaded");
    assert_eq!(reloaded.last().unwrap()["cut"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn listeners_move_and_open_connections_stay() {
    let mut gate = Gate::start().await;
    let alice = gate.login("alice").await;
    let old = gate.addr;
    let mut kept = gate.h2().await;
    let port = crate::harness::closed_port();
    let admin = crate::harness::closed_port();
    gate.edit_config(|t| {
        t.replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""), 1).replacen(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"127.0.0.1:{admin}\""),
            1,
        )
    });
    let r = gate.reload().await.unwrap();
    assert_eq!(r.changed, ["server", "admin"]);
    let (listen, _, admin_now) = gate.running.as_ref().unwrap().bound();
    assert_eq!(listen.port(), port);
    assert_eq!(admin_now.unwrap().port(), admin);
    // The old address takes no new connection; a connection made before goes on.
    eventually("the old listener to close", Duration::from_secs(3), async || {
        tokio::net::TcpStream::connect(old).await.is_err()
    })
    .await;
    let req = http::Request::get("https://localhost:8443/app/kept")
        .header("cookie", format!("__Host-poort={alice}"))
        .body(http_body_util::Empty::new())
        .unwrap();
    assert_eq!(kept.send_request(req).await.unwrap().status(), 200);
    gate.addr = listen;
    assert_eq!(gate.get("/app/moved", Some(&alice)).await.status, 200);
    gate.admin_addr = admin_now.unwrap();
    assert!(gate.scrape().await.contains("poort_config_reloads_total"));

    // An address in use is refused and nothing moves.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    gate.edit_config(|t| t.replacen(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{taken_port}"), 1));
    let why = gate.reload().await.unwrap_err();
    assert!(why.starts_with("server.listen"), "{why}");
    assert_eq!(gate.get("/app/stayed", Some(&alice)).await.status, 200);
}

/// The process reloads on a change to its file, on SIGHUP, and on `poort reload`.
#[tokio::test(flavor = "multi_thread")]
async fn the_file_sighup_and_the_command_each_reload() {
    let mut gate = Gate::start().await;
    let (_process, pid) = gate.as_process("").await;
    let alice = gate.login("alice").await;
    let app = |name: &str| {
        format!(
            "\n[[app]]\nname = \"{name}\"\nupstream = \"http://{}\"\npath = \"/{name}/\"\naccess = \"authenticated\"\n",
            gate.upstream.addr
        )
    };

    // A change to the file, once it has settled.
    gate.edit_config(|t| t + &app("byfile"));
    eventually("the changed file to apply", Duration::from_secs(5), async || {
        gate.get("/byfile/", Some(&alice)).await.status == 200
    })
    .await;

    // SIGHUP, sent at once (before the file watcher would see the change).
    gate.edit_config(|t| t + &app("bysignal"));
    assert!(std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success());
    eventually("SIGHUP to apply", Duration::from_secs(5), async || {
        gate.get("/bysignal/", Some(&alice)).await.status == 200
    })
    .await;

    // poort reload: says what changed, or why not.
    gate.edit_config(|t| t + &app("bycommand"));
    let out = gate.cli(&["reload"]);
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("Reloaded"), "{said}");
    assert_eq!(gate.get("/bycommand/", Some(&alice)).await.status, 200);
    gate.edit_config(|t| t + "\n[server]\nworkers = 9\n");
    let out = gate.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(64), "a duplicate [server] table is caught before the gateway is asked");
    gate.edit_config(|t| t.replacen("\n[server]\nworkers = 9\n", "", 1).replacen("[store]", "workers = 9\n[store]", 1));
    let out = gate.cli(&["reload"]);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("server.workers changed"), "{said}");

    // A file other than the one the gateway serves is not what it reads: it says so.
    let other = gate.dir.0.join("other.toml");
    std::fs::copy(&gate.config_path, &other).unwrap();
    let out = reload_command(&other);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("this gateway serves") && said.contains("other.toml"), "{said}");

    // The audit log stays readable while a refused file is in place: it says why.
    let out = gate.cli(&["audit", "tail"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("config_refused"));

    let triggers: Vec<String> =
        gate.audit("config_reloaded").iter().map(|e| e["trigger"].as_str().unwrap().to_string()).collect();
    assert_eq!(triggers, ["file changed", "SIGHUP", "poort reload"]);
    let log = gate.process_log();
    assert!(log.contains("Config not reloaded; the running config stays"), "{log}");
}

/// The file watcher refuses a bad file once, however often it is saved unchanged; `poort
/// reload` for a data folder no gateway has run on says so and creates nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_file_is_refused_once_and_reload_needs_a_gateway() {
    let gate = Gate::start().await;
    gate.edit_config(|t| t.replacen("path = \"/pub/\"", "path = \"pub\"", 1));
    eventually("the watcher to refuse the file", Duration::from_secs(5), async || {
        !gate.audit("config_refused").is_empty()
    })
    .await;
    for _ in 0..2 {
        let text = std::fs::read_to_string(&gate.config_path).unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        std::fs::write(&gate.config_path, text).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refused = gate.audit("config_refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["trigger"], "file changed");

    let elsewhere = crate::harness::TempDir::new();
    let config = elsewhere.0.join("poort.toml");
    std::fs::write(&config, "[store]\ndata_dir = \"data\"\n").unwrap();
    let out = reload_command(&config);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("No store at"));
    assert!(!elsewhere.0.join("data").exists(), "nothing was created");
}

/// SIGHUP and `poort reload` read every file the config names again: a certificate that no
/// longer loads refuses the reload. A shorter absolute timeout reaches sessions already open.
#[tokio::test(flavor = "multi_thread")]
async fn an_explicit_reload_checks_the_files_and_shorter_timeouts_reach_open_sessions() {
    let gate = Gate::start().await;
    let alice = gate.login("alice").await;
    let cert = gate.dir.0.join("cert.pem");
    let good = std::fs::read(&cert).unwrap();
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
        .unwrap();
    let why = gate.reload().await.unwrap_err();
    assert!(why.starts_with("tls:"), "{why}");
    std::fs::write(&cert, good).unwrap();
    assert!(gate.reload().await.is_ok());

    assert_eq!(gate.get("/app/", Some(&alice)).await.status, 200);
    gate.edit_config(|t| format!("{t}\n[session]\nabsolute_timeout = \"2m\"\nidle_timeout = \"90s\"\n"));
    assert_eq!(gate.reload().await.unwrap().changed, ["session"]);
    gate.clock.advance(60);
    assert_eq!(gate.get("/app/", Some(&alice)).await.status, 200);
    gate.clock.advance(61);
    // Ended when the timeout passes, not at the next request: a longer timeout put back
    // afterwards does not bring the session back.
    eventually("the session to be deleted", Duration::from_secs(3), async || {
        gate.store().list_sessions(Some("alice")).unwrap().is_empty()
    })
    .await;
    gate.edit_config(|t| t.replacen("absolute_timeout = \"2m\"", "absolute_timeout = \"12h\"", 1));
    assert!(gate.reload().await.is_ok());
    assert_eq!(gate.get("/app/", Some(&alice)).await.status, 401, "past the absolute timeout that was in force");
}

/// A name given to another upstream by a reload is not the resource an open WebSocket was
/// allowed: the WebSocket to the old upstream ends, even though the name is still allowed.
#[tokio::test(flavor = "multi_thread")]
async fn a_name_given_to_another_upstream_ends_the_websockets_to_the_old_one() {
    let gate = Gate::start().await;
    let alice = gate.login("alice").await;
    let mut ws = echo(&gate, &alice).await;
    let other = crate::harness::ws_echo().await;
    gate.edit_config(|t| {
        t.replacen("name = \"ws\"", "name = \"ws-old\"", 1).replacen("path = \"/ws/\"", "path = \"/ws-old/\"", 1)
            + &format!(
                "\n[[app]]\nname = \"ws\"\nupstream = \"http://{other}\"\npath = \"/ws/\"\naccess = \"authenticated\"\n"
            )
    });
    assert_eq!(gate.reload().await.unwrap().cut, 1);
    assert!(closed_within(&mut ws, Duration::from_secs(1)).await, "the WebSocket to the old upstream stayed open");
}

/// A lockdown ends anonymous WebSockets to public apps too (they hold no session to cut).
#[tokio::test(flavor = "multi_thread")]
async fn a_lockdown_ends_anonymous_websockets() {
    let echo_addr = crate::harness::ws_echo().await;
    let tables = format!(
        "[[app]]\nname = \"openws\"\nupstream = \"http://{echo_addr}\"\npath = \"/openws/\"\naccess = \"public\"\n"
    );
    let gate = Gate::start_config("", &tables).await;
    let mut ws = gate.websocket("localhost", "/openws/", &[]).await.unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
    assert!(gate.cli(&["lockdown", "on"]).status.success());
    assert!(closed_within(&mut ws, Duration::from_secs(2)).await, "an anonymous WebSocket outlived the lockdown");
}

/// `poort reload --config FILE`, for a file other than the gateway's own.
fn reload_command(config: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_poort"))
        .args(["reload", "--config"])
        .arg(config)
        .env("POORT_LOG", "warn")
        .output()
        .unwrap()
}
