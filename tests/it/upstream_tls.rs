//! Apps served over HTTPS: a real nginx with a certificate from a test CA, reached through
//! poort with each way of trusting it. A certificate poort should not trust gets a 502 and the
//! app never sees the request (its access log stays empty); one it should trust gets the
//! request, identity headers included, over HTTP/2 when nginx offers it, on a reused
//! connection.

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Gate, Nginx, TempDir, TestCa, closed_port, ws_echo};

/// nginx on two ports: `open` asks for a client certificate but takes requests without one;
/// `strict` refuses a connection without one. Both answer with what they saw.
struct App {
    nginx: Nginx,
    open: u16,
    strict: u16,
    ca: TestCa,
}

const SAW: &str = "proto=$server_protocol sni=$ssl_server_name verify=$ssl_client_verify client=$ssl_client_s_dn user=$http_x_poort_user host=$host conn=$connection";

impl App {
    async fn start() -> App {
        let ca = TestCa::new("Test Apps CA");
        let server = ca.issue(&["app.internal", "127.0.0.1"], "app.internal");
        let clients = TestCa::new("Test Clients CA");
        let dir = TempDir::new();
        std::fs::write(dir.0.join("app.pem"), &server.cert_pem).unwrap();
        std::fs::write(dir.0.join("app.key"), &server.key_pem).unwrap();
        std::fs::write(dir.0.join("clients.pem"), clients.pem()).unwrap();
        let client = clients.issue(&[], "poort-gateway");
        std::fs::write(dir.0.join("client.pem"), &client.cert_pem).unwrap();
        std::fs::write(dir.0.join("client.key"), &client.key_pem).unwrap();
        std::fs::write(dir.0.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.0.join("app.fingerprint"), server.fingerprint()).unwrap();
        let (open, strict) = (closed_port(), closed_port());
        let ws = ws_echo().await;
        let http = format!(
            r#"
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  ssl_certificate {{dir}}/app.pem;
  ssl_certificate_key {{dir}}/app.key;
  ssl_client_certificate {{dir}}/clients.pem;
  server {{
    listen 127.0.0.1:{open} ssl http2;
    ssl_verify_client optional;
    location / {{ default_type text/plain; return 200 "{SAW}\n"; }}
    location /ws/ {{
      proxy_pass http://{ws};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
    }}
  }}
  server {{
    listen 127.0.0.1:{strict} ssl;
    ssl_verify_client on;
    location / {{ default_type text/plain; return 200 "{SAW}\n"; }}
  }}
"#
        );
        let nginx = Nginx::start_in(dir, &http, open);
        crate::harness::wait_for_port(strict, "nginx", std::time::Duration::from_secs(5));
        App { nginx, open, strict, ca }
    }

    fn file(&self, name: &str) -> String {
        self.nginx.dir.0.join(name).display().to_string()
    }

    /// An `[[app]]` at `/{name}/` reaching `port` over https with `extra` settings.
    fn app(&self, name: &str, url: &str, extra: &str) -> String {
        format!(
            "\n[[app]]\nname = \"{name}\"\npath = \"/{name}/\"\nstrip_prefix = true\nupstream = \"{url}\"\naccess = \"authenticated\"\n{extra}\n"
        )
    }

    fn requests(&self) -> usize {
        self.nginx.access_log().len()
    }
}

#[tokio::test]
async fn an_https_app_is_reached_only_with_a_certificate_poort_trusts() {
    let app = App::start().await;
    let (open, strict) = (app.open, app.strict);
    let ca = app.file("ca.pem");
    let fp = std::fs::read_to_string(app.file("app.fingerprint")).unwrap();
    let (cert, key) = (app.file("client.pem"), app.file("client.key"));
    let other_ca = TempDir::new();
    std::fs::write(other_ca.0.join("ca.pem"), TestCa::new("Someone Else").pem()).unwrap();
    let other = other_ca.0.join("ca.pem").display().to_string();
    let tables = [
        app.app("byca", &format!("https://127.0.0.1:{open}"), &format!("upstream_ca_file = \"{ca}\"")),
        app.app(
            "byname",
            &format!("https://127.0.0.1:{open}"),
            &format!("upstream_ca_file = \"{ca}\"\nupstream_server_name = \"app.internal\""),
        ),
        app.app("pinned", &format!("https://127.0.0.1:{open}"), &format!("upstream_fingerprint = \"{fp}\"")),
        app.app("skip", &format!("https://127.0.0.1:{open}"), "insecure_skip_verify = true"),
        app.app(
            "mtls",
            &format!("https://127.0.0.1:{strict}"),
            &format!("upstream_ca_file = \"{ca}\"\nupstream_client_cert = \"{cert}\"\nupstream_client_key = \"{key}\""),
        ),
        // Refused: a CA that did not issue the app's certificate, the system's roots (which
        // know nothing of the test CA), a pin of another certificate, a name the certificate
        // does not hold; and no client certificate where the app demands one.
        app.app("otherca", &format!("https://127.0.0.1:{open}"), &format!("upstream_ca_file = \"{other}\"")),
        app.app("system", &format!("https://127.0.0.1:{open}"), ""),
        app.app(
            "badpin",
            &format!("https://127.0.0.1:{open}"),
            &format!("upstream_fingerprint = \"{}\"", "ab".repeat(32)),
        ),
        app.app(
            "badname",
            &format!("https://127.0.0.1:{open}"),
            &format!("upstream_ca_file = \"{ca}\"\nupstream_server_name = \"intruder.internal\""),
        ),
        app.app("nocert", &format!("https://127.0.0.1:{strict}"), &format!("upstream_ca_file = \"{ca}\"")),
    ]
    .concat();
    let gate = Gate::start_config("workers = 2", &tables).await;
    let s = gate.login("alice").await;

    for name in ["otherca", "system", "badpin", "badname"] {
        let r = gate.get(&format!("/{name}/"), Some(&s)).await;
        assert_eq!(r.status, 502, "{name}: {}", r.text());
    }
    assert_eq!(app.requests(), 0, "no request reached the app over a connection poort should not trust");
    // nginx answers a connection without the certificate it demands with a 400 of its own.
    let r = gate.get("/nocert/", Some(&s)).await;
    assert!(r.status == 400 && r.text().contains("No required SSL certificate"), "{}", r.text());

    // The Host the app gets: the URL's, or the name its certificate is checked for.
    for (name, sni, host) in [
        ("byca", "", "127.0.0.1"),
        ("byname", "app.internal", "app.internal"),
        ("pinned", "", "127.0.0.1"),
        ("skip", "", "127.0.0.1"),
    ] {
        let r = gate.get(&format!("/{name}/"), Some(&s)).await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let body = r.text();
        assert!(body.contains("proto=HTTP/2.0"), "{name}: nginx offers HTTP/2, so poort uses it: {body}");
        assert!(body.contains(&format!("sni={sni} ")), "{name}: {body}");
        assert!(body.contains("user=alice"), "{name}: identity headers arrive: {body}");
        assert!(body.contains(&format!("host={host} ")), "{name}: {body}");
        assert!(body.contains("verify=NONE"), "{name}: {body}");
    }
    let r = gate.get("/mtls/", Some(&s)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.text();
    assert!(body.contains("verify=SUCCESS") && body.contains("client=CN=poort-gateway"), "{body}");
    assert!(body.contains("proto=HTTP/1.1"), "that server offers no HTTP/2: {body}");

    // Requests to one app share one HTTP/2 connection.
    let conn = |body: String| body.split("conn=").nth(1).unwrap_or("").trim().to_string();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        seen.insert(conn(gate.get("/byca/b", Some(&s)).await.text()));
    }
    assert!(seen.len() <= 2, "each worker reuses its connection: {seen:?}");
    drop(app.ca);
}

#[tokio::test]
async fn websockets_and_bodies_reach_an_https_app() {
    let app = App::start().await;
    let ca = app.file("ca.pem");
    let tables = app.app("tls", &format!("https://127.0.0.1:{}", app.open), &format!("upstream_ca_file = \"{ca}\""));
    let gate = Gate::start_config("", &tables).await;
    let s = gate.login("alice").await;
    let cookie = format!("__Host-poort={s}");
    let mut ws =
        gate.websocket("localhost", "/tls/ws/echo", &[("cookie", &cookie)]).await.expect("the upgrade goes through");
    for msg in ["hello", &"y".repeat(70_000)] {
        ws.send(Message::text(msg)).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap().into_text().unwrap().as_str(), msg);
    }
    // A request with a body goes on an HTTP/1.1 connection of its own.
    let r = gate.request("POST", "/tls/form", &[("cookie", &cookie), ("content-type", "text/plain")], b"hello").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("proto=HTTP/1.1") && r.text().contains("user=alice"), "{}", r.text());
}

#[test]
fn tls_settings_are_checked_with_the_config() {
    let dir = TempDir::new();
    let write = |extra: &str| {
        let path = dir.0.join("poort.toml");
        std::fs::write(
            &path,
            format!(
                "[server]\nexternal_url = \"https://localhost:8443\"\n[store]\ndata_dir = \".\"\n[[app]]\nname = \"a\"\npath = \"/a/\"\naccess = \"authenticated\"\n{extra}\n"
            ),
        )
        .unwrap();
        match poort::config::load(&path) {
            Ok(cfg) => (String::new(), cfg.warnings().join("\n")),
            Err(p) => (p.to_string(), String::new()),
        }
    };
    let cases = [
        (
            "upstream = \"http://127.0.0.1:1\"\nupstream_ca_file = \"ca.pem\"",
            "app[a].upstream_ca_file: only applies to an https:// upstream",
        ),
        ("upstream = \"https://127.0.0.1:1\"\nupstream_ca_file = \"missing.pem\"", "app[a].upstream_ca_file"),
        ("upstream = \"https://127.0.0.1:1\"\nupstream_fingerprint = \"12:34\"", "app[a].upstream_fingerprint"),
        ("upstream = \"https://127.0.0.1:1\"\nupstream_client_cert = \"c.pem\"", "app[a].upstream_client_cert"),
        (
            "upstream = \"https://127.0.0.1:1\"\ninsecure_skip_verify = true\nupstream_fingerprint = \"ab\"",
            "choose one of them",
        ),
        ("upstream = \"ftp://127.0.0.1:1\"", "is not an http or https URL"),
    ];
    for (extra, want) in cases {
        let (problems, _) = write(extra);
        assert!(problems.contains(want), "{extra}: {problems}");
    }
    let (problems, warnings) = write("upstream = \"https://127.0.0.1:1\"\ninsecure_skip_verify = true");
    assert!(problems.is_empty(), "{problems}");
    assert!(warnings.contains("app[a]: insecure_skip_verify = true"), "{warnings}");
}
