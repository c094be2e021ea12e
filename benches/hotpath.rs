//! Micro-benchmarks of the pure per-request stages (bench/README.md). `cargo bench --bench
//! hotpath` measures; `cargo test --benches` (as CI does) runs each once, checking that it
//! still works, without timing anything.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Method, Uri, Version, header};

use poort::body::{Body, RequestBody};
use poort::clock::{Clock, SystemClock};
use poort::config::{self, Config, SessionTimeouts};
use poort::identity::Identity;
use poort::listen::{Conn, Handler};
use poort::policy::{self, Decision, Subject};
use poort::request::{self, Target};
use poort::route::{Found, Routes};
use poort::session::{self, Sessions};
use poort::store::Store;

/// A config with `n` path apps, each with a group rule and a deny rule.
fn config(n: usize) -> Config {
    let mut text = String::from(
        "[server]\nlisten = \"127.0.0.1:8443\"\nexternal_url = \"https://gate.example.org\"\n[store]\ndata_dir = \".\"\n",
    );
    for i in 0..n {
        text.push_str(&format!(
            "[[app]]\nname = \"app{i}\"\nupstream = \"http://10.0.{}.{}:8080\"\npath = \"/team{}/app{i}/\"\n\
             access = {{ rules = [ {{ effect = \"allow\", groups = [\"staff\", \"team{}\"] }}, \
             {{ effect = \"deny\", users = [\"mallory\"] }} ] }}\n",
            i / 250,
            i % 250,
            i % 7,
            i % 7
        ));
    }
    config::parse(&text, Path::new("/tmp")).expect("the benchmark config is valid")
}

const TARGET: &str = "/team3/app423/api/v2/projects/42/issues?state=open&sort=updated";

fn stages(c: &mut Criterion) {
    c.bench_function("normalise a target", |b| b.iter(|| Target::parse(black_box(TARGET)).is_ok()));

    let uri: Uri = TARGET.parse().expect("valid uri");
    let mut headers = HeaderMap::new();
    headers.insert(header::HOST, HeaderValue::from_static("gate.example.org"));
    headers.insert(header::USER_AGENT, HeaderValue::from_static("Mozilla/5.0 (X11; Linux x86_64)"));
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(header::COOKIE, HeaderValue::from_static("theme=dark; __Host-poort=abc"));
    c.bench_function("check a request head", |b| {
        b.iter(|| request::check(&Method::GET, black_box(&uri), Version::HTTP_11, black_box(&headers)).is_ok())
    });

    let cfg = config(500);
    let routes = Routes::new(&cfg.server.portal_host, &cfg.apps);
    let path = Target::parse(TARGET).expect("valid target");
    assert_eq!(routes.find_target("gate.example.org", &path), Found::App(423));
    c.bench_function("route among 500 apps", |b| {
        b.iter(|| routes.find_target(black_box("gate.example.org"), black_box(&path)))
    });

    let alice = Identity {
        user: "alice".into(),
        email: Some("alice@example.org".into()),
        groups: vec!["staff".into(), "team3".into(), "vpn".into()],
    };
    let app = &cfg.apps[423];
    assert!(matches!(
        policy::evaluate(
            policy::Resource::App(&app.name),
            &app.access,
            app.mfa,
            Some(Subject { identity: &alice, mfa: false })
        ),
        Decision::Allow(_)
    ));
    c.bench_function("evaluate policy", |b| {
        b.iter(|| {
            let who = Subject { identity: black_box(&alice), mfa: false };
            matches!(
                policy::evaluate(policy::Resource::App(&app.name), &app.access, app.mfa, Some(who)),
                Decision::Allow(_)
            )
        })
    });

    let token = session::new_token();
    let cookie_header = format!("theme=dark; lang=nl; __Host-poort={}; _ga=GA1.2.3", token.cookie_value);
    c.bench_function("decode the session cookie", |b| {
        b.iter(|| {
            let v =
                session::cookie::find(std::iter::once(black_box(cookie_header.as_bytes())), session::SESSION_COOKIE);
            v.and_then(session::cookie::decode_token).map(|raw| session::hash_token(&raw))
        })
    });

    // Sixteen keep-alive GETs with browser-sized heads (about 400 bytes each) that arrive in
    // one read, as a busy HTTP/1.1 connection delivers them: the front door's framing check
    // of every byte before hyper sees it.
    let head = "GET /team3/app423/api/v2/projects/42/issues?state=open HTTP/1.1\r\nHost: gate.example.org\r\n\
                User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0\r\n\
                Accept: application/json\r\nAccept-Language: nl,en;q=0.5\r\nAccept-Encoding: gzip, br\r\n\
                Cookie: theme=dark; __Host-poort=jI0osRfLVhS0nutuoiFQ95H7r42KcdZzugQ5eoa93ys\r\n\
                Connection: keep-alive\r\n\r\n";
    let burst = head.repeat(16).into_bytes();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let peer: std::net::SocketAddr = "127.0.0.1:1".parse().expect("an address");
    let timeout = std::time::Duration::from_secs(10);
    // The whole HTTP/1.1 server side of 16 requests: reading, checking and parsing each head,
    // calling the handler, writing each answer (a 100-byte body), side by side with the HTTP
    // library's server on the same bytes (which served HTTP/1 before, behind a separate check
    // of every head).
    c.bench_function("HTTP/1.1 server, 16 pipelined requests: poort", |b| {
        b.iter(|| {
            let io = Memory::new(black_box(&burst));
            let out = io.out.clone();
            rt.block_on(poort::listen::serve_http1(Arc::new(Hundred), peer, io, timeout));
            assert_eq!(out.lock().matches("HTTP/1.1 200").count(), 16, "every request answered");
        })
    });
    c.bench_function("HTTP/1.1 server, 16 pipelined requests: hyper", |b| {
        b.iter(|| {
            let io = Memory::new(black_box(&burst));
            let out = io.out.clone();
            let service = hyper::service::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Body::from_static(HUNDRED)))
            });
            // Half-close: the client's end of the stream after its last request is not a
            // reason to drop that request's answer.
            let conn = hyper::server::conn::http1::Builder::new()
                .half_close(true)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service);
            let _ = rt.block_on(conn);
            assert_eq!(out.lock().matches("HTTP/1.1 200").count(), 16, "every request answered");
        })
    });

    let (sessions, value) = signed_in();
    c.bench_function("session cache hit", |b| {
        b.iter(|| {
            let found = sessions.lookup(black_box(&value)).now_or_never();
            assert!(matches!(found, Some(Ok(_))), "a cache hit completes without waiting");
        })
    });
}

/// A session store with one signed-in user whose session is already in the cache.
fn signed_in() -> (Sessions, String) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let dir = std::env::temp_dir().join(format!("poort-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let store = Store::open(dir.join("poort.db")).expect("store");
    store.add_user("alice", None, "x", &["staff".into()], 0).expect("user");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let timeouts = SessionTimeouts {
        idle: std::time::Duration::from_secs(1800),
        absolute: std::time::Duration::from_secs(43200),
        outage_grace: std::time::Duration::from_secs(60),
    };
    let sessions = Sessions::new(store, clock, timeouts).expect("sessions");
    let value = rt.block_on(async {
        let opening = poort::session::Opening {
            user: "alice",
            host: "gate.example.org",
            client_addr: "127.0.0.1".into(),
            user_agent: "bench".into(),
            factors: poort::session::Factors::of(&[poort::session::Factor::Pwd]),
            kind: poort::session::Kind::Browser,
            approved_by: None,
        };
        let (_, token) = sessions.open(opening).await?;
        sessions.lookup(&token.cookie_value).await.map_err(|_| anyhow::anyhow!("fresh session not found"))?;
        anyhow::Ok(token.cookie_value)
    });
    let _ = std::fs::remove_dir_all(&dir);
    (sessions, value.expect("sign in"))
}

criterion_group!(benches, stages);
criterion_main!(benches);

const HUNDRED: &str =
    "0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789";

/// Answers every request with 100 bytes.
struct Hundred;

impl Handler for Hundred {
    fn marker(&self) -> &'static str {
        "/.poort/refused/MARK"
    }

    async fn handle(
        self: Arc<Self>,
        _: std::net::SocketAddr,
        _: &Conn,
        _: http::Request<RequestBody>,
    ) -> http::Response<Body> {
        http::Response::new(Body::from_static(HUNDRED))
    }
}

/// A connection whose client sent `input` and then ended; what is written to it is kept.
struct Memory {
    input: Vec<u8>,
    at: usize,
    out: Arc<parking_lot::Mutex<String>>,
}

impl Memory {
    fn new(input: &[u8]) -> Memory {
        Memory { input: input.to_vec(), at: 0, out: Arc::default() }
    }
}

impl tokio::io::AsyncRead for Memory {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = (self.input.len() - self.at).min(buf.remaining());
        let at = self.at;
        buf.put_slice(&self.input[at..at + n]);
        self.at += n;
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Memory {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.out.lock().push_str(&String::from_utf8_lossy(data));
        std::task::Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
