//! The admin listener (`[admin] listen`, loopback by default, never a public listener's
//! address): Prometheus metrics at `/metrics`, liveness at `/healthz`, readiness at `/readyz`
//! (the config is loaded, the store answers, the audit log is being written). Plain HTTP,
//! GET only, nothing else.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::body::Body;
use crate::gateway::{Gateway, Live};
use crate::respond::page;

/// Serves the admin endpoints on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, live: Arc<Live>, shutdown: impl Future<Output = ()>) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10)).max_buf_size(16 * 1024);
    let builder = Arc::new(builder);
    crate::listen::accept_until(listener, shutdown, move |stream| {
        let (live, builder) = (live.clone(), builder.clone());
        async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let gw = live.get();
                async move { Ok::<_, Infallible>(answer(&gw, &req).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        }
    })
    .await;
}

async fn answer(gw: &Gateway, req: &Request<Incoming>) -> Response<Body> {
    let text = |status, body: String| page(status, "text/plain; charset=utf-8", Body::from(body));
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let st = &gw.state;
            let m = &st.metrics;
            m.tunnels.set(st.tunnels.open() as i64);
            m.sessions_cached.set(st.sessions.cached() as i64);
            m.upstream_idle.set(gw.proxy.idle_connections() as i64);
            page(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", Body::from(m.encode()))
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let store = gw.state.store.run(|c| c.query_row("SELECT 1", (), |r| r.get::<i64>(0))).await.is_ok();
            let audit = gw.state.audit.writing();
            if store && audit {
                text(StatusCode::OK, "ready\n".into())
            } else {
                let why = format!("not ready: store {}, audit log {}\n", ok(store), ok(audit));
                text(StatusCode::SERVICE_UNAVAILABLE, why)
            }
        }
        _ => text(StatusCode::NOT_FOUND, "metrics, healthz, readyz\n".into()),
    }
}

fn ok(b: bool) -> &'static str {
    if b { "ok" } else { "failing" }
}
