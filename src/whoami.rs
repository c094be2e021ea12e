//! The demo app: a small HTTP upstream that answers every request with what it received,
//! identity headers included, so a new operator can see what poort sends to an app. It runs
//! on a loopback port and is reached through the proxy like any other app.

use std::convert::Infallible;
use std::fmt::Write;
use std::net::SocketAddr;

use http::{Request, Response, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::body::Body;

/// Binds a loopback port and serves the demo app there until the process ends.
pub async fn start() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = conn.serve_connection(TokioIo::new(stream), service_fn(answer)).await;
            });
        }
    });
    Ok(addr)
}

async fn answer(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let mut out = String::from("poort demo app \"whoami\": this is the request poort forwarded.\n");
    // Who the user is first: the assertion's claims, decoded. The token itself is long, and
    // folded below.
    if let Some(jwt) = req.headers().get("x-poort-assertion").and_then(|v| v.to_str().ok())
        && let Some(claims) = jwt.split('.').nth(1).and_then(|p| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).ok()
        })
    {
        let _ = writeln!(
            out,
            "\nWho you are, from the X-Poort-Assertion (verify its signature with /.poort/jwks.json):\n{}",
            String::from_utf8_lossy(&claims)
        );
    }
    let _ = writeln!(out, "\n{} {} {:?}", req.method(), req.uri(), req.version());
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes());
        if name == "x-poort-assertion" && value.len() > 40 {
            let head: String = value.chars().take(32).collect();
            let _ = writeln!(out, "{name}: {head}… ({} characters)", value.len());
        } else {
            let _ = writeln!(out, "{name}: {value}");
        }
    }
    let resp = Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from(out))
        .expect("invariant: static response parts are valid");
    Ok(resp)
}
