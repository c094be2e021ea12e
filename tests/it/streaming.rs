//! What apps rely on besides request and answer: events that arrive as the app sends them,
//! byte ranges and resumed downloads, uploads that wait for a slow app instead of piling up in
//! poort, and an app's early answer to a body it does not want.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::harness::{Gate, Nginx, TempDir, closed_port, parse_response};

fn app_table(name: &str, addr: &str) -> String {
    format!(
        "\n[[app]]\nname = \"{name}\"\nupstream = \"http://{addr}\"\npath = \"/{name}/\"\naccess = \"authenticated\"\n"
    )
}

/// Reads from `stream` into `buf` until `want` appears in it; false if the stream ends or
/// `limit` passes first.
async fn read_until(stream: &mut (impl AsyncReadExt + Unpin), buf: &mut Vec<u8>, want: &[u8], limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut chunk = [0u8; 16384];
    while !buf.windows(want.len()).any(|w| w == want) {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return false,
        }
    }
    true
}

#[tokio::test]
async fn events_reach_the_user_while_the_app_is_still_sending() {
    // The app sends one event, then waits until the user has it before it sends the next: a
    // gateway that buffers the answer delivers neither.
    let delivered = Arc::new(Notify::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let signal = delivered.clone();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = vec![0u8; 8192];
        let _ = s.read(&mut head).await;
        let start = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
        s.write_all(start).await.unwrap();
        s.write_all(b"c\r\ndata: first\n\r\n").await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(5), signal.notified()).await;
        s.write_all(b"d\r\ndata: second\n\r\n0\r\n\r\n").await.unwrap();
    });
    let gate = Gate::start_config("", &app_table("events", &addr.to_string())).await;
    let s = gate.login("alice").await;
    let mut tls = gate.connect(&[b"http/1.1"]).await;
    let req = format!(
        "GET /events/feed HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\nCookie: __Host-poort={s}\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    assert!(
        read_until(&mut tls, &mut got, b"data: first", Duration::from_secs(3)).await,
        "the first event arrives on its own: {}",
        String::from_utf8_lossy(&got)
    );
    assert!(!got.windows(6).any(|w| w == b"second"), "the app has not sent the second yet");
    delivered.notify_one();
    assert!(read_until(&mut tls, &mut got, b"data: second", Duration::from_secs(3)).await);
}

/// nginx serving a 1 MiB file, which answers ranges itself.
fn file_server() -> (Nginx, u16, Vec<u8>) {
    let dir = TempDir::new();
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::create_dir_all(dir.0.join("www")).unwrap();
    std::fs::write(dir.0.join("www/file.bin"), &data).unwrap();
    let port = closed_port();
    let nginx = Nginx::start_in(dir, &format!("  server {{ listen 127.0.0.1:{port}; root {{dir}}/www; }}\n"), port);
    (nginx, port, data)
}

#[tokio::test]
async fn ranges_and_resumed_downloads_pass_through() {
    let (_nginx, port, data) = file_server();
    let gate =
        Gate::start_config("", &(app_table("files", &format!("127.0.0.1:{port}")) + "strip_prefix = true\n")).await;
    let s = gate.login("alice").await;
    let cookie = format!("__Host-poort={s}");
    let whole = gate.request("GET", "/files/file.bin", &[("Cookie", &cookie)], b"").await;
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body, data);
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    let etag = whole.header("etag").unwrap().to_string();

    let part = gate.request("GET", "/files/file.bin", &[("Cookie", &cookie), ("Range", "bytes=1000-1999")], b"").await;
    assert_eq!(part.status, 206);
    assert_eq!(part.header("content-range"), Some("bytes 1000-1999/1048576"));
    assert_eq!(part.body, data[1000..2000]);

    // A download cut at half, resumed while the file is unchanged (If-Range with its ETag).
    let half = data.len() / 2;
    let range = format!("bytes={half}-");
    let rest = gate
        .request("GET", "/files/file.bin", &[("Cookie", &cookie), ("Range", &range), ("If-Range", &etag)], b"")
        .await;
    assert_eq!(rest.status, 206);
    assert_eq!([&data[..half], &rest.body[..]].concat(), data);
    // With another ETag the file has changed: the whole file comes again.
    let changed = gate
        .request("GET", "/files/file.bin", &[("Cookie", &cookie), ("Range", &range), ("If-Range", "\"other\"")], b"")
        .await;
    assert_eq!(changed.status, 200);
    assert_eq!(changed.body.len(), data.len());
}

#[tokio::test]
async fn a_large_upload_waits_for_a_slow_app() {
    const SIZE: usize = 96 << 20;
    // The app takes the head, then reads nothing until told to; then it reads everything.
    let go = Arc::new(Notify::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<(usize, [u8; 32])>();
    let start = go.clone();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        hasher.update(&got[end..]);
        let mut total = got.len() - end;
        start.notified().await;
        while total < SIZE {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the body ended early");
            hasher.update(&buf[..n]);
            total += n;
        }
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
        let mut digest = [0u8; 32];
        digest.copy_from_slice(hasher.finish().as_ref());
        let _ = tx.send((total, digest));
    });
    let gate = Gate::start_full("", "max_body_bytes = 200000000", &app_table("upload", &addr.to_string())).await;
    let s = gate.login("alice").await;
    let body: Arc<Vec<u8>> = Arc::new((0..SIZE).map(|i| (i % 253) as u8).collect());
    let sent = Arc::new(AtomicUsize::new(0));
    let mut tls = gate.connect(&[b"http/1.1"]).await;
    let head = format!(
        "POST /upload/file HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nContent-Type: application/octet-stream\r\nContent-Length: {SIZE}\r\n\r\n"
    );
    let (counter, data) = (sent.clone(), body.clone());
    let writer = tokio::spawn(async move {
        tls.write_all(head.as_bytes()).await.unwrap();
        for chunk in data.chunks(64 << 10) {
            tls.write_all(chunk).await.unwrap();
            counter.fetch_add(chunk.len(), Ordering::SeqCst);
        }
        tls.flush().await.unwrap();
        let mut answer = Vec::new();
        let _ = read_until(&mut tls, &mut answer, b"ok", Duration::from_secs(30)).await;
        answer
    });
    // Wait until the client can send no more (what it sent stops growing).
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = sent.load(Ordering::SeqCst);
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    assert!(last < 48 << 20, "poort took {} MiB of a body the app was not reading", last >> 20);
    go.notify_one();
    let answer = tokio::time::timeout(Duration::from_secs(60), writer).await.unwrap().unwrap();
    assert_eq!(parse_response(&answer).status, 200);
    let (total, digest) = rx.await.unwrap();
    assert_eq!(total, SIZE);
    assert_eq!(digest[..], ring::digest::digest(&ring::digest::SHA256, &body).as_ref()[..]);
}

#[tokio::test]
async fn an_app_that_answers_before_reading_a_large_body_gets_its_answer_to_the_user() {
    // Two apps refuse a large upload at once: one closes the connection right after its
    // answer, the other keeps reading (and discarding) for a while, as nginx does.
    let app = |linger: bool| async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 1 << 16];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!",
                        )
                        .await;
                    if linger {
                        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                            if n == 0 {
                                break;
                            }
                        }
                    }
                });
            }
        });
        addr.to_string()
    };
    let tables = app_table("abrupt", &app(false).await) + &app_table("lingering", &app(true).await);
    let gate = Gate::start_config("", &tables).await;
    let s = gate.login("alice").await;
    let cookie = format!("__Host-poort={s}");
    for name in ["lingering", "abrupt"] {
        // The client keeps sending while it reads, as browsers and curl do.
        let tls = gate.connect(&[b"http/1.1"]).await;
        let (mut rd, mut wr) = tokio::io::split(tls);
        let head = format!(
            "POST /{name}/upload HTTP/1.1\r\nHost: localhost\r\nCookie: {cookie}\r\nContent-Length: {}\r\n\r\n",
            8 << 20
        );
        tokio::spawn(async move {
            let _ = wr.write_all(head.as_bytes()).await;
            let _ = wr.write_all(&vec![b'x'; 8 << 20]).await;
        });
        let mut out = Vec::new();
        let _ = read_until(&mut rd, &mut out, b"too big!", Duration::from_secs(10)).await;
        let r = parse_response(&out);
        assert_eq!(r.status, 413, "{name}: {}", r.text());
        assert_eq!(r.text(), "too big!");
    }
}
