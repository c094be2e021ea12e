//! An SSH target in the browser: `/.poort/ssh/NAME[?account=ACCOUNT]` is a page with a terminal
//! (xterm.js, compiled in), and the same path with a WebSocket upgrade carries the session.
//! The same policy as for the SSH front door decides, the same certificate signs in, and the
//! session is recorded the same way.
//!
//! Who may open one: the page is only the person's own navigation (`routes::navigated`), so a
//! script on an app that shares the portal's origin cannot read it; the WebSocket needs the
//! page's origin and a ticket only the page holds: keyed with the gateway's secret over the
//! session, the target, the account and the minute, good for two minutes. A script that can
//! open a WebSocket on the portal's origin still has no ticket.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use russh::ChannelMsg;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::{Channel1, Parts, destination, target};
use crate::audit::Event;
use crate::body::{Body, RequestBody};
use crate::config::SshTarget;
use crate::policy::{self, Decision, Resource, Subject};
use crate::portal::routes;
use crate::respond::{TerminalPage, error_page, redirect, terminal_page};
use crate::session::Session;
use crate::state::{Ctx, State};

/// The ticket for `session` to open `target` as `account` in `minute`.
fn ticket(st: &State, session: &Session, target: &str, account: &str, minute: i64) -> String {
    st.signins.sealer.keyed("ssh terminal", &format!("{}\n{target}\n{account}\n{minute}", session.id))
}

fn ticket_ok(st: &State, session: &Session, target: &str, account: &str, given: &str) -> bool {
    use subtle::ConstantTimeEq;
    let minute = st.clock.now().div_euclid(60);
    [minute, minute - 1].iter().any(|m| {
        let want = ticket(st, session, target, account, *m);
        bool::from(want.as_bytes().ct_eq(given.as_bytes()))
    })
}

fn query(ctx: &Ctx, name: &str) -> String {
    let q = ctx.front.target.query().unwrap_or("");
    form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned()).unwrap_or_default()
}

/// GET /.poort/ssh/NAME: the page, or with a WebSocket upgrade the session.
pub async fn terminal(st: &State, ctx: Ctx, req: Request<RequestBody>) -> Response<Body> {
    let row = routes::row_of(routes::Page::Terminal);
    let call = match routes::admit(st, ctx, row, req).await {
        Ok(call) => call,
        Err(refused) => return refused,
    };
    let session = call.session().clone();
    let (ctx, name) = (call.ctx.clone(), call.rest.clone());
    let account = query(&ctx, "account");
    let denied = |reason: &str| {
        let ev = Event::AccessDenied {
            user: session.identity.user.clone(),
            session: session.id.clone(),
            app: format!("ssh:{}", name.chars().take(64).collect::<String>()),
            reason: reason.to_string(),
            client: ctx.client,
        };
        st.audit.refusal("access_denied", "ssh terminal", ctx.client, &name, ev);
        error_page(StatusCode::FORBIDDEN, ctx.id)
    };
    // Unknown and refused look the same.
    let Some(t) = st.cfg.ssh_targets.iter().find(|t| t.name == name) else {
        return denied("no SSH target of that name");
    };
    let who = Subject { identity: &session.identity, mfa: session.mfa() };
    let permit = match policy::evaluate(Resource::Ssh(&t.name), &t.access, t.mfa, Some(who)) {
        Decision::Allow(p) => p,
        Decision::Authenticate { .. } => {
            let here = format!("{}?account={account}", ctx.front.target.path());
            let next = form_urlencoded::Serializer::new(String::new()).append_pair("next", &here).finish();
            return redirect(StatusCode::SEE_OTHER, &format!("{}/.poort/mfa?{next}", st.cfg.server.external_origin));
        }
        Decision::Deny(reason) => return denied(&reason.to_string()),
    };
    if !t.allow.shell {
        return denied("shell is not allowed on this target");
    }
    let accounts = t.principals_for(&session.identity);
    let account = if account.is_empty() { accounts.first().cloned().unwrap_or_default() } else { account };
    if !accounts.contains(&account) {
        return denied("the account is not open to them");
    }
    let mut req = call.into_request();
    let Some(accept) = crate::tunnel::websocket_key(&req) else {
        // The page: the person's own navigation only.
        if !routes::navigated(st, req.headers()) {
            return denied("a terminal page not opened by the person");
        }
        let minute = st.clock.now().div_euclid(60);
        let q = form_urlencoded::Serializer::new(String::new())
            .append_pair("account", &account)
            .append_pair("ticket", &ticket(st, &session, &t.name, &account, minute))
            .finish();
        let socket = format!("{}{}?{q}", crate::route::TERMINALS, t.name);
        let heading = format!("{} as {account}", t.title);
        let about = if t.record {
            "This session is recorded: what you type and what the target shows.".to_string()
        } else {
            "An SSH session through poort.".to_string()
        };
        let (csrf, _) = crate::portal::csrf_for_page(req.headers());
        let p = TerminalPage {
            user: &session.identity.user,
            csrf: &csrf,
            heading: &heading,
            about: &about,
            mode: "ssh",
            socket: &socket,
            admin: false,
            token: "",
            end_session: None,
        };
        let Some((before, after)) = crate::respond::terminal_parts(&p) else {
            return error_page(StatusCode::INTERNAL_SERVER_ERROR, ctx.id);
        };
        let mut resp = terminal_page(StatusCode::OK, before + &after);
        resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return resp;
    };
    // The WebSocket: from the portal's own page, with its ticket.
    let origin_ok =
        req.headers().get(header::ORIGIN).is_some_and(|o| o.as_bytes() == st.cfg.server.external_origin.as_bytes());
    if !origin_ok || !ticket_ok(st, &session, &t.name, &account, &query(&ctx, "ticket")) {
        return denied("a terminal WebSocket without its page's origin and ticket");
    }
    let limits = st.cfg.tunnel;
    let Some(slot) = st.tunnels.take(&session.id, limits.per_session, limits.total) else {
        return error_page(StatusCode::TOO_MANY_REQUESTS, ctx.id);
    };
    let grant = st.grants.hold(&permit, Some(&session), &destination(t, &account));
    let ev = Event::SshOpened {
        user: session.identity.user.clone(),
        session: session.id.clone(),
        target: t.name.clone(),
        principal: account.clone(),
        method: "browser terminal".into(),
        client: ctx.client,
    };
    if st.audit.record(ev).await.is_err() {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
    }
    let upgrade = crate::body::wire::on_upgrade(&mut req);
    let ca = match crate::ssh::UserCa::load_or_create(&st.cfg.data_dir) {
        Ok(ca) => ca,
        Err(e) => {
            tracing::error!(error = %e, "The SSH user CA cannot be read");
            return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
        }
    };
    let job = Job { target: t.clone(), account, client: ctx.client, parts: Parts::of(st), ca };
    tokio::spawn(async move {
        let _slot = slot;
        let Ok(upgraded) = upgrade.await else { return };
        let ws = crate::tunnel::server_socket(upgraded).await;
        let started = crate::clock::instant();
        let why = job.run(&session, ws, &grant).await;
        let ev = Event::SshClosed {
            user: session.identity.user.clone(),
            session: session.id.clone(),
            target: job.target.name.clone(),
            seconds: started.elapsed().as_secs(),
            why: why.to_string(),
        };
        job.parts.audit.note(ev).await;
    });
    crate::tunnel::switching(accept)
}

struct Job {
    target: SshTarget,
    account: String,
    client: std::net::IpAddr,
    parts: Parts,
    ca: crate::ssh::UserCa,
}

/// A text message from the page: the terminal's size.
#[derive(serde::Deserialize)]
struct Size {
    cols: u32,
    rows: u32,
}

impl Size {
    fn bounded(self) -> (u32, u32) {
        (self.cols.clamp(10, 500), self.rows.clamp(5, 200))
    }
}

impl Job {
    /// Signs in to the target, starts a recorded shell, and carries it to and from the page
    /// until either side ends, the session or the access ends, or it idles; says why.
    async fn run<S>(
        &self,
        session: &Arc<Session>,
        mut ws: WebSocketStream<S>,
        grant: &crate::session::grant::Grant,
    ) -> &'static str
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let say = |text: String| Message::Text(serde_json::json!({ "status": text }).to_string().into());
        // The page sends its size first.
        let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        let (cols, rows) = match first {
            Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Size>(&t).map(Size::bounded).unwrap_or((80, 24)),
            _ => return "the page sent nothing",
        };
        let to = target::To { session, target: &self.target, principal: &self.account, client: self.client };
        let serial = u64::from_be_bytes(crate::secret::random_bytes()) >> 16;
        let conn = match target::connect(&self.parts, &self.ca, serial, &to).await {
            Ok(c) => c,
            Err(why) => {
                let _ = ws.send(say(format!("poort: {why}"))).await;
                let _ = ws.close(None).await;
                return "the target could not be reached";
            }
        };
        let Ok(channel) = conn.channel_open_session().await else { return "the target opened no session" };
        let (mut rd, wr) = channel.split();
        let term = "xterm-256color";
        if wr.request_pty(true, term, cols, rows, 0, 0, &[]).await.is_err() || !answered(&mut rd).await {
            let _ = ws.send(say("poort: the target gave no terminal".into())).await;
            return "the target gave no terminal";
        }
        let about = Channel1 { parts: &self.parts, session, target: &self.target, principal: &self.account, n: 0 };
        let recorder = match about.open("shell (browser)", self.target.record, (cols, rows, term.into())).await {
            Ok(r) => parking_lot::Mutex::new(r),
            Err(why) => {
                let _ = ws.send(say(format!("poort: {why}"))).await;
                return why;
            }
        };
        if wr.request_shell(true).await.is_err() || !answered(&mut rd).await {
            let _ = ws.send(say("poort: the target started no shell".into())).await;
            return "the target started no shell";
        }
        let started = crate::clock::instant();
        let (up, down, last) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
        let since = || started.elapsed().as_millis() as u64;
        let (mut ws_tx, mut ws_rx) = ws.split();
        let mut exit_status = None;
        let from_page = async {
            while let Some(msg) = ws_rx.next().await {
                match msg {
                    Ok(Message::Binary(b)) => {
                        if let Some(r) = recorder.lock().as_mut() {
                            r.input(&b);
                        }
                        up.fetch_add(b.len() as u64, Ordering::Relaxed);
                        last.store(since(), Ordering::Relaxed);
                        if wr.data_bytes(b).await.is_err() {
                            return "the target closed";
                        }
                    }
                    Ok(Message::Text(t)) => {
                        if let Ok(size) = serde_json::from_str::<Size>(&t) {
                            let (c, r) = size.bounded();
                            let _ = wr.window_change(c, r, 0, 0).await;
                            if let Some(rec) = recorder.lock().as_mut() {
                                rec.resize(c, r);
                            }
                        }
                    }
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            let _ = wr.eof().await;
            "the page closed"
        };
        let from_target = async {
            while let Some(msg) = rd.wait().await {
                let data = match msg {
                    ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => data,
                    ChannelMsg::ExitStatus { exit_status: s } => {
                        exit_status = Some(s);
                        continue;
                    }
                    ChannelMsg::Close | ChannelMsg::Eof => break,
                    _ => continue,
                };
                let full = recorder.lock().as_mut().is_some_and(|r| {
                    r.output(&data);
                    r.full()
                });
                if full {
                    return "the recording reached its limit";
                }
                down.fetch_add(data.len() as u64, Ordering::Relaxed);
                last.store(since(), Ordering::Relaxed);
                if ws_tx.send(Message::Binary(data)).await.is_err() {
                    return "the page closed";
                }
            }
            "the target closed"
        };
        let idle = self.parts.cfg.ssh.idle_timeout;
        let watch = async {
            let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
            loop {
                tokio::time::sleep(tick).await;
                let quiet = Duration::from_millis(since().saturating_sub(last.load(Ordering::Relaxed)));
                if quiet >= idle {
                    return "idle";
                }
                if quiet < tick {
                    session.touch(self.parts.clock.now());
                }
            }
        };
        let why = tokio::select! {
            why = from_page => why,
            why = from_target => why,
            why = grant.ended() => why,
            why = watch => why,
        };
        let (recording, sha256) = match recorder.lock().take() {
            Some(r) => r.finish(),
            None => (String::new(), String::new()),
        };
        let ev = Event::SshChannelClosed {
            user: session.identity.user.clone(),
            session: session.id.clone(),
            target: self.target.name.clone(),
            principal: self.account.clone(),
            what: "shell (browser)".into(),
            bytes_in: up.load(Ordering::Relaxed),
            bytes_out: down.load(Ordering::Relaxed),
            seconds: started.elapsed().as_secs(),
            recording,
            sha256,
            exit_status,
            files: Vec::new(),
        };
        self.parts.audit.note(ev).await;
        let _ = conn.disconnect(russh::Disconnect::ByApplication, "", "").await;
        why
    }
}

/// The target's answer to the request just sent (Success), skipping what comes before it.
async fn answered(rd: &mut russh::ChannelReadHalf) -> bool {
    let wait = async {
        while let Some(msg) = rd.wait().await {
            match msg {
                ChannelMsg::Success => return true,
                ChannelMsg::Failure | ChannelMsg::Close => return false,
                _ => {}
            }
        }
        false
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await.unwrap_or(false)
}
