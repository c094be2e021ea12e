//! Certificates by ACME against Let's Encrypt's test CA, pebble (Debian's package), on
//! loopback: pebble-challtestsrv answers its name lookups with 127.0.0.1, pebble checks each
//! name over HTTP-01 at poort's plain-HTTP listener, and poort serves what it obtained to new
//! connections, keeps it across a restart and renews it when due.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{Gate, Reaped, TempDir, TestCa, closed_port, eventually, wait_for_port};

/// pebble and its DNS, with the CA file that makes pebble's own HTTPS trusted.
struct Pebble {
    dir: TempDir,
    directory: String,
    _dns: Reaped,
    _pebble: Reaped,
}

impl Pebble {
    /// A pebble that checks HTTP-01 answers at `http_port` of whatever the names resolve to
    /// (127.0.0.1).
    fn start(http_port: u16) -> Pebble {
        let dir = TempDir::new();
        let ca = TestCa::new("Pebble API CA");
        let api = ca.issue(&["127.0.0.1", "localhost"], "pebble");
        std::fs::write(dir.0.join("api.pem"), &api.cert_pem).unwrap();
        std::fs::write(dir.0.join("api.key"), &api.key_pem).unwrap();
        std::fs::write(dir.0.join("ca.pem"), ca.pem()).unwrap();
        let (listen, manage, dns, dns_manage) = (closed_port(), closed_port(), closed_port(), closed_port());
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{listen}"),
                "managementListenAddress": format!("127.0.0.1:{manage}"),
                "certificate": dir.0.join("api.pem"),
                "privateKey": dir.0.join("api.key"),
                "httpPort": http_port,
                "tlsPort": closed_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        std::fs::write(dir.0.join("pebble.json"), config.to_string()).unwrap();
        let log = |name: &str| std::fs::File::create(dir.0.join(name)).unwrap();
        let dns_process = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", "", "-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns}"), "-management", &format!("127.0.0.1:{dns_manage}")])
            .stdout(Stdio::null())
            .stderr(log("dns.log"))
            .spawn()
            .expect("pebble-challtestsrv is installed (scripts/test installs pebble)");
        let dns_process = Reaped(dns_process);
        let pebble = Command::new("pebble")
            .args(["-config"])
            .arg(dir.0.join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            // No random pauses and no nonces refused at random: the test is about poort.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .expect("pebble is installed (scripts/test installs it)");
        let pebble = Reaped(pebble);
        wait_for_port(listen, "pebble", Duration::from_secs(20));
        Pebble { directory: format!("https://127.0.0.1:{listen}/dir"), dir, _dns: dns_process, _pebble: pebble }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("pebble.log")).unwrap_or_default()
    }
}

/// The certificate the gateway serves to a client naming `sni`, whoever issued it.
async fn served(gate: &Gate, sni: &str) -> Vec<u8> {
    let cfg = poort::tls_client::config(&poort::tls_client::Trust::Anything, None, &[b"http/1.1"]).unwrap();
    let tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let tls =
        tokio_rustls::TlsConnector::from(cfg).connect(poort::tls_client::server_name(sni).unwrap(), tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn issuer(der: &[u8]) -> String {
    use x509_cert::der::Decode;
    x509_cert::Certificate::from_der(der).unwrap().tbs_certificate().issuer().to_string()
}

/// Rewrites the gateway's config with `edit` and starts it again on the same data.
async fn restart(gate: &mut Gate, edit: impl FnOnce(String) -> String) {
    gate.stop().await;
    let text = std::fs::read_to_string(&gate.config_path).unwrap();
    std::fs::write(&gate.config_path, edit(text)).unwrap();
    gate.boot().await;
}

#[tokio::test]
async fn a_certificate_is_obtained_served_kept_and_renewed() {
    let http_port = closed_port();
    let pebble = Pebble::start(http_port);
    let app =
        "\n[[app]]\nname = \"wiki\"\nhost = \"wiki.example.com\"\nupstream = \"http://{up}\"\naccess = \"public\"\n";
    let mut gate = Gate::start_config("", app).await;
    let default = gate.cert_der.clone();
    let acme = format!(
        "acme = {{ directory = \"{}\", email = \"ops@example.com\", ca_file = \"{}\" }}\n",
        pebble.directory,
        pebble.dir.0.join("ca.pem").display()
    );
    restart(&mut gate, |text| {
        text.replacen("redirect_listen = \"127.0.0.1:0\"", &format!("redirect_listen = \"127.0.0.1:{http_port}\""), 1)
            .replacen("key_file = \"key.pem\"\n", &format!("key_file = \"key.pem\"\n{acme}"), 1)
    })
    .await;
    // The default certificate serves until pebble's arrives, then pebble's does.
    eventually("the certificate from the CA is served", Duration::from_secs(60), async || {
        served(&gate, "wiki.example.com").await != default
    })
    .await;
    let first = served(&gate, "wiki.example.com").await;
    assert!(issuer(&first).contains("Pebble"), "{}\n{}", issuer(&first), pebble.log());
    assert_eq!(served(&gate, "localhost").await, default, "the portal keeps its own: no CA certifies localhost");
    let stored = gate.dir.0.join("acme/wiki.example.com.pem");
    assert!(stored.exists());
    let account = std::fs::metadata(gate.dir.0.join("acme/account.json")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&account.permissions()) & 0o777, 0o600);

    // A restart serves the stored certificate at once, without a new order.
    let orders = pebble.log().matches("POST /order-plz").count();
    assert!(orders > 0, "pebble logs each order: {}", pebble.log());
    restart(&mut gate, |t| t).await;
    assert_eq!(served(&gate, "wiki.example.com").await, first);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pebble.log().matches("POST /order-plz").count(), orders, "nothing was ordered again");

    // One that is due is ordered again and replaces the stored files (here: its certificate is
    // gone, its key is still there).
    std::fs::remove_file(&stored).unwrap();
    restart(&mut gate, |t| t).await;
    eventually("a renewed certificate is served", Duration::from_secs(60), async || {
        let now = served(&gate, "wiki.example.com").await;
        now != first && issuer(&now).contains("Pebble")
    })
    .await;
    let renewed = served(&gate, "wiki.example.com").await;
    eventually("the renewal is stored", Duration::from_secs(5), async || stored.exists()).await;
    // And a restart serves it, not the old one, without ordering again.
    let orders = pebble.log().matches("POST /order-plz").count();
    restart(&mut gate, |t| t).await;
    assert_eq!(served(&gate, "wiki.example.com").await, renewed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pebble.log().matches("POST /order-plz").count(), orders);
}

#[test]
fn acme_needs_the_plain_http_listener() {
    let dir = TempDir::new();
    let path = dir.0.join("poort.toml");
    std::fs::write(
        &path,
        "[server]\nexternal_url = \"https://gate.example.com\"\n[tls]\nacme = { directory = \"https://acme.example/dir\" }\n",
    )
    .unwrap();
    let problems = poort::config::load(&path).unwrap_err().to_string();
    assert!(problems.contains("server.redirect_listen"), "{problems}");
}
