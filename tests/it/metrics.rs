//! The admin listener as Prometheus and a load balancer use it: metrics that move with
//! traffic, liveness and readiness, and none of it on the public port.

use crate::harness::{Gate, TempDir};

use crate::harness::admin;

/// The value of the sample `name{labels}` (labels as written, in order), or 0.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.split_whitespace().next().unwrap().parse().unwrap())
}

#[tokio::test]
async fn metrics_move_with_traffic_and_health_is_told_on_the_admin_listener_only() {
    let gate = Gate::start().await;
    let before = admin(gate.admin_addr, "GET", "/metrics").await;
    assert_eq!(before.status, 200);
    assert!(before.header("content-type").unwrap().starts_with("application/openmetrics-text"));
    let before = before.text();
    assert!(before.contains("poort_build_info{version=\""), "{before}");

    let s = gate.login("alice").await;
    for _ in 0..3 {
        assert_eq!(gate.get("/app/x", Some(&s)).await.status, 200);
    }
    assert_eq!(gate.get("/app/x", None).await.status, 401);
    assert_eq!(gate.request("GET", "/app/x", &[("Accept", "text/html")], b"").await.status, 302, "to sign in");
    assert_eq!(gate.try_login("alice", "wrong-password-here", "/").await.status, 401, "a wrong password");
    let after = admin(gate.admin_addr, "GET", "/metrics").await.text();

    let moved = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(moved(r#"poort_requests_total{app="app",status="2xx",refused="-"}"#), 3.0, "{after}");
    assert_eq!(moved(r#"poort_requests_total{app="app",status="4xx",refused="unauthenticated"}"#), 1.0, "{after}");
    assert_eq!(moved(r#"poort_requests_total{app="app",status="3xx",refused="unauthenticated"}"#), 1.0, "{after}");
    assert_eq!(moved(r#"poort_sign_ins_total{result="ok",factor="first"}"#), 1.0, "{after}");
    assert_eq!(moved(r#"poort_sign_ins_total{result="failed",factor="first"}"#), 1.0, "{after}");
    assert!(moved(r#"poort_tls_handshakes_total{result="ok"}"#) >= 6.0, "{after}");
    assert!(moved("poort_request_duration_seconds_count") >= 6.0, "{after}");
    assert!(sample(&after, r#"poort_upstream_duration_seconds_count{app="app"}"#) >= 3.0, "{after}");
    assert!(after.contains("poort_audit_queue ") && after.contains("poort_open_connections "), "{after}");

    assert_eq!(admin(gate.admin_addr, "GET", "/healthz").await.status, 200);
    let ready = admin(gate.admin_addr, "GET", "/readyz").await;
    assert_eq!((ready.status, ready.text()), (200, "ready\n".to_string()));
    assert_eq!(admin(gate.admin_addr, "POST", "/metrics").await.status, 405);
    // The public port knows nothing of them.
    for path in ["/metrics", "/healthz", "/readyz"] {
        let r = gate.get(path, Some(&s)).await;
        assert!(!r.text().contains("poort_requests_total") && r.status != 200, "{path}: {}", r.status);
    }
}

#[test]
fn the_admin_listener_is_never_a_public_one() {
    let dir = TempDir::new();
    let path = dir.0.join("poort.toml");
    let write = |admin: &str| {
        std::fs::write(
            &path,
            format!("[server]\nlisten = \"0.0.0.0:8443\"\nexternal_url = \"https://gate.example.com:8443\"\n[admin]\n{admin}\n"),
        )
        .unwrap();
        poort::config::load(&path)
    };
    let problems = write("listen = \"0.0.0.0:8443\"").unwrap_err().to_string();
    assert!(problems.contains("admin.listen: is the address of a public listener"), "{problems}");
    let warnings = write("listen = \"0.0.0.0:9464\"").unwrap().warnings().join("\n");
    assert!(warnings.contains("admin.listen: 0.0.0.0:9464 is not a loopback address"), "{warnings}");
    assert_eq!(write("listen = \"off\"").unwrap().admin_listen, None);
    assert_eq!(write("").unwrap().admin_listen, Some("127.0.0.1:9464".parse().unwrap()));
}
