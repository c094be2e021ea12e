//! The connection layer: TLS versions and suites as a scanner sees them (the openssl client),
//! and slow clients that must not hold the gateway.

use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::Gate;

/// Runs `openssl s_client` against the gateway; returns (handshake succeeded, output).
fn s_client(gate: &Gate, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &gate.addr.to_string(), "-servername", "localhost"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl is installed (scripts/test installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && !text.contains("Cipher is (NONE)"), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn only_modern_tls_is_spoken() {
    let gate = Gate::start().await;
    let gate_ref = &gate;
    let check = |args: Vec<&'static str>| {
        let gate = gate_ref;
        async move { tokio::task::block_in_place(|| s_client(gate, &args)) }
    };
    // SECLEVEL=0 makes the client offer what the server must refuse.
    for old in [vec!["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"], vec!["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]] {
        let (ok, text) = check(old.clone()).await;
        assert!(!ok, "{old:?} was accepted:\n{text}");
    }
    for weak in
        ["AES128-SHA", "AES256-GCM-SHA384", "ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA", "DHE-RSA-AES128-GCM-SHA256"]
    {
        let (ok, text) = check(vec!["-tls1_2", "-cipher", weak]).await;
        assert!(!ok, "TLS 1.2 suite {weak} was accepted:\n{text}");
    }
    let (ok, text) = check(vec!["-tls1_2"]).await;
    assert!(ok && text.contains("TLSv1.2, Cipher is ECDHE-"), "TLS 1.2 with forward secrecy works:\n{text}");
    let (ok, text) = check(vec!["-tls1_3", "-alpn", "h2,http/1.1"]).await;
    assert!(ok && text.contains("TLSv1.3"), "{text}");
    assert!(text.contains("ALPN protocol: h2"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_are_cut_off_and_others_are_served() {
    let gate = Gate::start_with("header_timeout = \"1s\"\nhandshake_timeout = \"1s\"").await;
    // A client that never finishes its request head (slowloris).
    let mut slow = gate.connect(&[b"http/1.1"]).await;
    slow.write_all(b"GET /app/ HTTP/1.1\r\nHost: localhost\r\nX-A: ").await.unwrap();
    // A client that never starts the TLS handshake.
    let mut silent = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(gate.get("/.poort/health", None).await.status, 200, "others are served meanwhile");
    for _ in 0..3 {
        slow.write_all(b"a").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "the slow request head was not cut off");
    assert!(started.elapsed() < Duration::from_secs(4));
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut b)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "the silent connection was not closed: {r:?}");
    assert_eq!(gate.upstream.hits(), 0);
}

#[tokio::test]
async fn one_client_address_cannot_take_every_connection() {
    let gate = Gate::start_with("max_connections_per_client = 3").await;
    let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| gate.connect(&[b"http/1.1"]))).await;
    // The fourth connection from the same address is closed before the handshake.
    assert!(gate.try_connect(&[b"http/1.1"]).await.is_err(), "a fourth connection was served");
    drop(held);
    // A TLS handshake completes only on a connection the gateway took.
    crate::harness::eventually("a slot to free up", Duration::from_secs(3), async || {
        gate.try_connect(&[b"http/1.1"]).await.is_ok()
    })
    .await;
}

/// A connection naming `sni`, whatever certificate the gateway serves for it.
async fn connect_any(gate: &Gate, sni: &str) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let cfg = poort::tls_client::config(&poort::tls_client::Trust::Anything, None, &[b"http/1.1"]).unwrap();
    let tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let name = poort::tls_client::server_name(sni).unwrap();
    tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.unwrap()
}

/// The certificate the gateway serves to a client naming `sni`.
async fn served(gate: &Gate, sni: &str) -> Vec<u8> {
    connect_any(gate, sni).await.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// The status of a GET for `host` on a connection naming `sni`.
async fn status_via(gate: &Gate, sni: &str, host: &str) -> u16 {
    let mut tls = connect_any(gate, sni).await;
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    crate::harness::parse_response(&out).status
}

#[tokio::test]
async fn each_host_gets_its_certificate_and_a_renewed_one_is_served_without_a_restart() {
    let dir = crate::harness::TempDir::new();
    let (cert, key) = (dir.0.join("apps.pem"), dir.0.join("apps.key"));
    let issue = |names: &[&str]| {
        let ck = rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        ck.cert.der().to_vec()
    };
    let apps = issue(&["*.apps.localhost"]);
    let tables = format!(
        "\n[[tls.cert]]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n[[app]]\nname = \"wiki\"\nhost = \"wiki.apps.localhost\"\nupstream = \"http://{{up}}\"\naccess = \"public\"\n",
        cert.display(),
        key.display()
    );
    let gate = Gate::start_config("", &tables).await;
    assert_eq!(served(&gate, "wiki.apps.localhost").await, apps);
    assert_eq!(served(&gate, "localhost").await, gate.cert_der, "the portal keeps the default one");
    assert_eq!(served(&gate, "unknown.example").await, gate.cert_der);
    // The app's host is served with its certificate, and only a request naming the same host
    // as the handshake is answered.
    assert_eq!(status_via(&gate, "wiki.apps.localhost", "wiki.apps.localhost").await, 200);
    assert_eq!(status_via(&gate, "wiki.apps.localhost", "localhost").await, 421);

    // Renewed on disk: new connections get the new one.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let renewed = issue(&["*.apps.localhost", "apps.localhost"]);
    crate::harness::eventually("the renewed certificate is served", Duration::from_secs(5), async || {
        served(&gate, "wiki.apps.localhost").await == renewed
    })
    .await;
    // A renewal that does not load changes nothing.
    std::fs::write(&key, "garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(served(&gate, "wiki.apps.localhost").await, renewed);
}
