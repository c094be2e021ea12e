//! Long connections after the front door: an app's WebSocket opens only from the app's own
//! origin (no cross-site WebSocket hijacking), and every WebSocket and response stream ends
//! within a second of the end of its session: logout, revocation, a disabled user, a lockdown
//! or expiry.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Gate, ORIGIN, streamer};

#[tokio::test]
async fn an_apps_websocket_opens_only_from_its_own_origin() {
    let tables = "\n[[app]]\nname = \"tools\"\nupstream = \"http://{ws}\"\npath = \"/tools/\"\naccess = \"authenticated\"\nwebsocket_origins = [\"https://tools.example\"]\n";
    let ws = crate::harness::ws_echo().await;
    let gate = Gate::start_config("", &tables.replace("{ws}", &ws.to_string())).await;
    let s = gate.login("alice").await;
    let cookie = format!("__Host-poort={s}");
    for evil in ["https://evil.example", "null", "https://git.localhost:8443", "http://localhost:8443"] {
        let r = gate.websocket("localhost", "/ws/", &[("Cookie", &cookie), ("Origin", evil)]).await;
        assert_eq!(r.err(), Some(403), "{evil}");
    }
    let denied = gate.audit("access_denied");
    assert!(denied.iter().any(|e| e["app"] == "ws" && e["reason"].as_str().unwrap().contains("another origin")));
    for fine in [Some(ORIGIN), None] {
        let mut h = vec![("Cookie", cookie.as_str())];
        if let Some(o) = fine {
            h.push(("Origin", o));
        }
        let mut ws = gate.websocket("localhost", "/ws/", &h).await.expect("the app's own page (or no browser) gets in");
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    }
    // An app may name other origins it trusts.
    let r = gate.websocket("localhost", "/tools/", &[("Cookie", &cookie), ("Origin", "https://tools.example")]).await;
    assert!(r.is_ok());
    let r = gate.websocket("localhost", "/tools/", &[("Cookie", &cookie), ("Origin", "https://evil.example")]).await;
    assert_eq!(r.err(), Some(403));
}

/// What ends a session in the test below.
#[derive(Debug, Clone, Copy)]
enum End {
    Logout,
    Revoke,
    Disable,
    Lockdown,
    Expiry,
}

/// A stream response read until it ends; returns when it ended. With `upgrade`, the request
/// asks for a WebSocket the app does not grant (it answers with the stream instead).
async fn read_stream(gate: &Gate, cookie: &str, upgrade: bool) -> tokio::task::JoinHandle<Instant> {
    let mut tls = gate.connect(&[b"http/1.1"]).await;
    let ws = if upgrade {
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    } else {
        ""
    };
    let req = format!("GET /stream/feed HTTP/1.1\r\nHost: localhost\r\nCookie: {cookie}\r\n{ws}\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut first = [0u8; 64];
    let n = tls.read(&mut first).await.unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&first[..n]));
    tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(30), tls.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return Instant::now(),
            }
        }
    })
}

#[tokio::test]
async fn websockets_and_streams_end_within_a_second_of_their_session() {
    let stream = streamer().await;
    let tables = format!(
        "\n[[app]]\nname = \"stream\"\nupstream = \"http://{stream}\"\npath = \"/stream/\"\naccess = \"authenticated\"\n"
    );
    let gate = Gate::start_config("", &tables).await;
    for end in [End::Logout, End::Revoke, End::Disable, End::Lockdown, End::Expiry] {
        let s = gate.login("bob").await;
        let cookie = format!("__Host-poort={s}");
        let mut ws = gate.websocket("localhost", "/ws/", &[("Cookie", &cookie)]).await.unwrap();
        ws.send(Message::text("before")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));
        let feed = read_stream(&gate, &cookie, false).await;
        let refused_upgrade = read_stream(&gate, &cookie, true).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(!feed.is_finished() && !refused_upgrade.is_finished(), "{end:?}: a stream ended early");

        let ended = Instant::now();
        match end {
            End::Logout => assert_eq!(gate.post("/.poort/logout", &s, &[]).await.status, 303),
            End::Revoke => {
                let id = gate.store().list_sessions(Some("bob")).unwrap()[0].id.clone();
                assert!(gate.cli(&["session", "revoke", &id]).status.success());
            }
            End::Disable => assert!(gate.cli(&["user", "disable", "bob"]).status.success()),
            End::Lockdown => assert!(gate.cli(&["lockdown", "on"]).status.success()),
            End::Expiry => gate.clock.advance(12 * 3600),
        }
        // The WebSocket closes (a message sent before the gateway learned of the end may
        // still be answered).
        let closed = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = ws.send(Message::text("after")).await;
            while let Some(Ok(_)) = ws.next().await {}
            Instant::now()
        })
        .await
        .unwrap_or_else(|_| panic!("{end:?}: the WebSocket outlived its session"));
        assert!(closed - ended < Duration::from_secs(1), "{end:?}: the WebSocket closed after {:?}", closed - ended);
        for (what, feed) in [("the stream", feed), ("the stream answering an upgrade", refused_upgrade)] {
            let stream_end =
                tokio::time::timeout(Duration::from_secs(2), feed).await.expect("the stream ended").unwrap();
            assert!(stream_end > ended, "{end:?}: {what} ended before the session did");
            assert!(
                stream_end - ended < Duration::from_secs(1),
                "{end:?}: {what} ended after {:?}",
                stream_end - ended
            );
        }
        assert!(ended.elapsed() < Duration::from_secs(2));

        // Set things back for the next round.
        match end {
            End::Disable => assert!(gate.cli(&["user", "enable", "bob"]).status.success()),
            End::Lockdown => {
                assert!(gate.cli(&["lockdown", "off"]).status.success());
                crate::harness::eventually("the lockdown to lift", Duration::from_secs(2), async || {
                    gate.get("/.poort/login", None).await.status == 200
                        && gate.try_login("bob", crate::harness::PASSWORD, "").await.status == 303
                })
                .await;
            }
            _ => {}
        }
    }
}

/// Taking a user out of the administrators takes effect on their open connections too: a
/// lockdown right after cuts them, although the user made no request since.
#[tokio::test]
async fn a_lockdown_cuts_a_former_administrators_websocket() {
    let gate = Gate::start_config("", "\n[mitigate]\nadmin_group = \"staff\"\n").await;
    let s = gate.login("alice").await; // in staff: an administrator here
    let cookie = format!("__Host-poort={s}");
    let mut ws = gate.websocket("localhost", "/ws/", &[("Cookie", &cookie)]).await.unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
    assert!(gate.cli(&["user", "groups", "alice", "--remove", "staff"]).status.success());
    tokio::time::sleep(Duration::from_millis(300)).await; // the change reaches the gateway
    assert!(gate.cli(&["lockdown", "on"]).status.success());
    let closed =
        tokio::time::timeout(Duration::from_secs(2), async { while let Some(Ok(_)) = ws.next().await {} }).await;
    assert!(closed.is_ok(), "the former administrator's WebSocket outlived the lockdown");
}
