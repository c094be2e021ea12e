//! The gateway's log as an operator reads it: one JSON object per line when asked, an
//! access-log line for every request (id, app, user, status, duration, refusal), and no
//! terminal colour codes in a log that goes to a file.

use crate::harness::{Gate, eventually};
use std::time::Duration;

/// The access-log lines of a JSON log.
fn access_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v| v["target"] == "poort::access")
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_json_log_has_a_line_per_request_with_who_what_and_why() {
    let mut gate = Gate::start().await;
    let (_poort, _) = gate.as_process("[log]\nformat = \"json\"\n").await;
    let s = gate.login("alice").await;
    assert_eq!(gate.get("/app/hello", Some(&s)).await.status, 200);
    assert_eq!(gate.get("/app/hello", None).await.status, 401);
    assert_eq!(gate.request("GET", "/app/../x", &[], b"").await.status, 400);
    let mut lines = Vec::new();
    eventually("the three requests are logged", Duration::from_secs(5), async || {
        lines = access_lines(&gate.process_log());
        lines
            .iter()
            .filter(|l| l["fields"]["path"] == "/app/hello" || l["fields"]["refused"] == "target_dot_segment")
            .count()
            >= 2
    })
    .await;
    let served = lines.iter().find(|l| l["fields"]["status"] == 200 && l["fields"]["path"] == "/app/hello").unwrap();
    let f = &served["fields"];
    assert_eq!((f["app"].as_str(), f["user"].as_str(), f["refused"].as_str()), (Some("app"), Some("alice"), Some("-")));
    assert!(f["request"].as_str().is_some_and(|id| !id.is_empty()) && f["micros"].as_u64().is_some(), "{served}");
    let refused = lines.iter().find(|l| l["fields"]["status"] == 401).unwrap();
    assert_eq!(refused["fields"]["refused"], "unauthenticated");
    assert_eq!(refused["fields"]["user"], "-");
    assert!(lines.iter().any(|l| l["fields"]["status"] == 400 && l["fields"]["refused"] != "-"), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_text_log_to_a_file_has_no_colour_codes_and_access_lines_can_be_turned_off() {
    let mut gate = Gate::start().await;
    let (_poort, _) = gate.as_process("[log]\naccess = false\n").await;
    let s = gate.login("alice").await;
    assert_eq!(gate.get("/app/hello", Some(&s)).await.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = gate.process_log();
    assert!(log.contains("poort is serving"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log}");
    assert!(!log.contains("poort::access"), "{log}");
}
