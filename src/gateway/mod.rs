//! The gateway: `stages`, the one function whose lines are the request stages of
//! docs/architecture.md, from a checked head to the handler that answers (the portal's route
//! table, a tunnel, or the proxy), and `handle` around it.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use parking_lot::RwLock;

use crate::audit::{Audit, Event};
use crate::body::{Body, RequestBody};
use crate::clock::Clock;
use crate::config::{Config, Route};
use crate::identity::assertion::Signer;
use crate::identity::seal::Sealer;
use crate::listen::Conn;
use crate::mitigate::{self, Mitigation, Verdict};
use crate::policy::{self, Decision, Resource, Subject};
use crate::portal;
use crate::proxy::{Origin, Proxy};
use crate::request::{self, Front};
use crate::respond::{At, Refusal, error_page, redirect, respond};
use crate::route::{Found, Routes};
use crate::session::{self, Lookup, Session, Sessions};
use crate::state::pending::SignIns;
use crate::state::{Ctx, RequestId, State};
use crate::store::Store;
use crate::upstream::Failure;

mod forward_auth;

/// The request pipeline for one config: the shared state, the routing table and the proxy,
/// and `handle`. A reload makes a new one (`next`); a request keeps the one it started with.
pub struct Gateway {
    pub state: State,
    pub proxy: Proxy,
    routes: Routes,
    /// Each app's name as a metric label and its upstream-time histogram, made once.
    app_labels: Vec<(crate::metrics::Name, prometheus_client::metrics::histogram::Histogram)>,
    lasting: Arc<Lasting>,
}

impl AsRef<State> for Gateway {
    fn as_ref(&self) -> &State {
        &self.state
    }
}

/// What the gateway keeps from one config to the next.
struct Lasting {
    request_ids: AtomicU64,
    /// The apps each session has opened in this process, by session id: the first access is
    /// audited, later ones are not.
    opened: RwLock<HashMap<String, HashSet<String>>>,
    /// The target of the request a connection's wrapper hands over in place of a refused
    /// head (`listen::Strict`): random per process, so no client can send it.
    marker: &'static str,
    /// Where the demo app listens, once an app has needed it.
    whoami: std::sync::OnceLock<String>,
}

/// The gateway in force: what the listeners serve. Each request takes the current `Gateway`
/// once and finishes with it; a reload puts a new one in place for the requests after it.
pub struct Live {
    current: RwLock<Arc<Gateway>>,
    marker: &'static str,
}

impl Live {
    pub fn new(gw: Arc<Gateway>) -> Live {
        Live { marker: gw.lasting.marker, current: RwLock::new(gw) }
    }

    /// The gateway in force now.
    pub fn get(&self) -> Arc<Gateway> {
        self.current.read().clone()
    }

    /// Puts `gw` in force for every request from now on.
    pub fn set(&self, gw: Arc<Gateway>) {
        *self.current.write() = gw;
    }
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

impl crate::listen::Handler for Live {
    fn marker(&self) -> &'static str {
        self.marker
    }

    fn connected(&self) -> Option<crate::metrics::Held> {
        self.get().connected()
    }

    fn handshake(&self, ok: bool) {
        self.get().handshake(ok);
    }

    async fn handle(self: Arc<Self>, peer: SocketAddr, conn: &Conn, req: Request<RequestBody>) -> Response<Body> {
        let gw = self.get();
        gw.handle(peer, conn, req).await
    }
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gateway")
    }
}

/// What start-up loads for a gateway besides its config and store.
pub struct Parts {
    pub metrics: Arc<crate::metrics::Metrics>,
    pub signer: Arc<Signer>,
    pub sealer: Arc<Sealer>,
    pub mitigation: Mitigation,
    /// Where the demo app listens, if an app uses it.
    pub whoami: Option<String>,
}

impl crate::listen::Handler for Gateway {
    /// The marker target for `listen::Strict`.
    fn marker(&self) -> &'static str {
        self.lasting.marker
    }

    fn connected(&self) -> Option<crate::metrics::Held> {
        Some(crate::metrics::Held::new(&self.state.metrics.connections))
    }

    fn handshake(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.state.metrics.handshakes.get_or_create(&crate::metrics::ResultLabels { result }).inc();
    }

    /// One request, start to finish. Closes an HTTP/1 connection whose request asked to
    /// switch protocols and did not: the bytes after it were never checked as HTTP.
    async fn handle(self: Arc<Self>, peer: SocketAddr, conn: &Conn, req: Request<RequestBody>) -> Response<Body> {
        let upgrade = req.version() == http::Version::HTTP_11 && req.headers().contains_key(header::UPGRADE);
        let head = req.method() == http::Method::HEAD;
        let start = crate::clock::instant();
        let access = self.state.cfg.log.access.then(|| (req.method().clone(), req.uri().path().to_string()));
        let me = self.clone();
        let mut resp = shielded(self.stages(peer, conn, req)).await;
        me.state
            .metrics
            .request_seconds
            .observe(crate::clock::instant().saturating_duration_since(start).as_secs_f64());
        if let Some((method, path)) = access {
            me.access_line(&method, &path, &resp, start);
        }
        if upgrade && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if head {
            without_body(&mut resp);
        }
        resp
    }
}

impl Gateway {
    pub fn new(
        cfg: Arc<Config>,
        clock: Arc<dyn Clock>,
        store: Store,
        audit: Audit,
        parts: Parts,
    ) -> anyhow::Result<Gateway> {
        let Parts { metrics, signer, sealer, mitigation, whoami } = parts;
        let sessions = Arc::new(Sessions::new(store.clone(), clock.clone(), cfg.session)?);
        let signins = Arc::new(SignIns::new(&cfg, sealer.clone())?);
        let oidc = crate::identity::oidc::Providers::new(&cfg.auth.oidc, &cfg.server.external_origin)?;
        let state = State {
            cfg: cfg.clone(),
            clock,
            store,
            audit,
            sessions,
            mitigation: Arc::new(mitigation),
            directory: None,
            oidc,
            signer,
            signins,
            tunnels: Arc::default(),
            metrics,
            grants: Arc::default(),
        };
        // Request ids: a random start, then counting; unique per process and cheap to make.
        let start = u64::from_be_bytes(crate::secret::random_bytes());
        let lasting = Arc::new(Lasting {
            request_ids: AtomicU64::new(start),
            opened: RwLock::default(),
            marker: Box::leak(
                format!("/.poort/refused/{}", session::cookie::encode_token(&crate::secret::random_bytes()))
                    .into_boxed_str(),
            ),
            whoami: whoami.map(std::sync::OnceLock::from).unwrap_or_default(),
        });
        Gateway::build(cfg, state, lasting)
    }

    /// The gateway for config `cfg`, replacing this one: sessions, sign-ins in flight,
    /// grants, counts and the store carry over; the routes, proxy, identity sources and
    /// settings are made from `cfg`. `mitigation` replaces the rules engine if the `[mitigate]`
    /// settings changed. Nothing is changed here: the caller puts the result in force.
    pub fn next(&self, cfg: Arc<Config>, mitigation: Option<Mitigation>) -> anyhow::Result<Gateway> {
        let st = &self.state;
        let oidc = crate::identity::oidc::Providers::new(&cfg.auth.oidc, &cfg.server.external_origin)?;
        let state = State {
            cfg: cfg.clone(),
            clock: st.clock.clone(),
            store: st.store.clone(),
            audit: st.audit.clone(),
            sessions: st.sessions.clone(),
            mitigation: mitigation.map_or_else(|| st.mitigation.clone(), Arc::new),
            directory: None,
            oidc,
            signer: st.signer.clone(),
            signins: st.signins.clone(),
            tunnels: st.tunnels.clone(),
            metrics: st.metrics.clone(),
            grants: st.grants.clone(),
        };
        Gateway::build(cfg, state, self.lasting.clone())
    }

    /// Whether the demo app runs; `set_whoami` starts using one a reload started.
    pub fn has_whoami(&self) -> bool {
        self.lasting.whoami.get().is_some()
    }

    pub fn set_whoami(&self, addr: String) {
        let _ = self.lasting.whoami.set(addr);
    }

    /// Puts the settings of `state.cfg` that live in shared parts in force; call it when the
    /// gateway made by `next` goes into force.
    pub fn apply_shared_settings(&self) {
        let cfg = &self.state.cfg;
        self.state.sessions.set_timeouts(cfg.session);
        self.state.signins.set_per_minute(cfg.login.per_address_per_minute);
    }

    fn build(cfg: Arc<Config>, mut state: State, lasting: Arc<Lasting>) -> anyhow::Result<Gateway> {
        let metrics = &state.metrics;
        let proxy = Proxy::new(
            cfg.proxy,
            cfg.server.workers,
            state.signer.clone(),
            lasting.whoami.get().cloned(),
            metrics.clone(),
            state.grants.clone(),
        );
        // Each app's label and upstream histogram, looked up once rather than per request.
        let app_labels = cfg
            .apps
            .iter()
            .map(|a| {
                let name = crate::metrics::Name(a.name.as_str().into());
                let label = crate::metrics::AppLabels { app: name.clone() };
                (name, metrics.upstream_seconds.get_or_create(&label).clone())
            })
            .collect();
        let routes = Routes::new(&cfg.server.portal_host, &cfg.apps);
        state.directory = cfg.auth.ldap.clone().map(crate::identity::ldap::Directory::new).transpose()?;
        Ok(Gateway { state, proxy, routes, app_labels, lasting })
    }

    /// The stages of docs/architecture.md, in order; each refusal is answered by `respond`.
    async fn stages(self: Arc<Self>, peer: SocketAddr, conn: &Conn, req: Request<RequestBody>) -> Response<Body> {
        let id = RequestId(self.lasting.request_ids.fetch_add(1, Ordering::Relaxed));
        let client = request::client_addr(peer.ip(), req.headers(), &self.state.cfg.server.trusted_proxies);
        let mut note = Note { id, client, app: None, session: None, kept: self.state.cfg.log.access };
        let front = match self.front_door(conn, &req) {
            Ok(front) => front,
            Err((refusal, sample)) => return self.noted(&note, self.refuse(at(id, client, &sample), refusal).await),
        };
        let found = match self.route(&front) {
            Ok(found) => found,
            Err(refusal) => return self.noted(&note, self.refuse(at(id, client, &front.host), refusal).await),
        };
        if let Found::App(i) | Found::AddSlash(i) = found {
            note.app = Some(i);
        }
        if let Err(refusal) = self.mitigate(&req, &front, &found, client, id).await {
            return self.noted(&note, self.refuse(at(id, client, front.target.path()), refusal).await);
        }
        let session = self.session_for(req.headers(), &front.host).await;
        note.session = session.clone();
        let ctx = Ctx { id, front, client, peer: peer.ip(), session };
        if self.locked_out(&ctx, &found) {
            return self.noted(&note, self.refuse(ctx.at(), Refusal::LockedDown).await);
        }
        self.noted(&note, self.dispatch(found, ctx, req).await)
    }

    /// Counts an answered request, and hands what the access log says of it to `handle`.
    fn noted(&self, note: &Note, mut resp: Response<Body>) -> Response<Body> {
        let refused = resp.extensions().get::<crate::respond::Refused>().map(|r| r.0);
        let app = note.app.map(|i| &self.app_labels[i].0);
        self.state.metrics.request(app, resp.status().as_u16(), refused);
        if note.kept {
            resp.extensions_mut().insert(note.clone());
        }
        resp
    }

    /// The access-log line of a request that took since `start`.
    fn access_line(&self, method: &http::Method, path: &str, resp: &Response<Body>, start: std::time::Instant) {
        let micros = crate::clock::instant().saturating_duration_since(start).as_micros() as u64;
        let note = resp.extensions().get::<Note>();
        let app = note.and_then(|n| n.app).map(|i| self.state.cfg.apps[i].name.as_str());
        let user = note.and_then(|n| n.session.as_deref()).map(|s| s.identity.user.as_str());
        let refused = resp.extensions().get::<crate::respond::Refused>().map(|r| r.0);
        tracing::info!(
            target: "poort::access",
            request = %note.map(|n| n.id).unwrap_or(RequestId(0)),
            client = %note.map_or_else(String::new, |n| n.client.to_string()),
            method = %method,
            path = %path.chars().take(256).collect::<String>(),
            status = resp.status().as_u16(),
            micros,
            app = app.unwrap_or("-"),
            user = user.unwrap_or("-"),
            refused = refused.unwrap_or("-"),
            "request"
        );
    }

    /// request::check and the connection's own checks: one canonical target and host, bounded
    /// headers, strict framing (a head the connection's wrapper refused arrives as the marker),
    /// the host the TLS handshake named, a body no larger than allowed. A refusal comes with
    /// what it records of the request.
    fn front_door(&self, conn: &Conn, req: &Request<RequestBody>) -> Result<Front, (Refusal, String)> {
        if req.uri().path() == self.lasting.marker {
            let why = conn.refused.take().unwrap_or(request::Reject::RequestLine);
            return Err((malformed(why.status(), why.code()), "(a raw head)".into()));
        }
        let front = request::check(req.method(), req.uri(), req.version(), req.headers())
            .map_err(|r| (malformed(r.status(), r.code()), req.uri().path().to_string()))?;
        // The host must be the one the TLS handshake named (RFC 9110 §7.4: 421 makes a
        // browser that reused a connection for another host open a new one).
        if conn.sni.as_ref().is_some_and(|sni| *sni != front.host) {
            return Err((malformed(StatusCode::MISDIRECTED_REQUEST, "host_not_sni"), front.host));
        }
        if front.content_length.is_some_and(|n| n > self.state.cfg.proxy.max_body_bytes) {
            return Err((malformed(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"), front.target.path().into()));
        }
        Ok(front)
    }

    /// route: the portal, a tunnel, an app, or nothing; a host nobody serves is refused.
    fn route(&self, front: &Front) -> Result<Found, Refusal> {
        match self.routes.find_target(&front.host, &front.target) {
            Found::UnknownHost => Err(malformed(StatusCode::MISDIRECTED_REQUEST, "unknown_host")),
            found => Ok(found),
        }
    }

    /// mitigate::check: the operator's emergency rules, before any session work.
    async fn mitigate(
        &self,
        req: &Request<RequestBody>,
        front: &Front,
        found: &Found,
        client: IpAddr,
        id: RequestId,
    ) -> Result<(), Refusal> {
        let app = match found {
            Found::App(i) | Found::AddSlash(i) => Some(self.state.cfg.apps[*i].name.as_str()),
            _ => None,
        };
        let raw_target = req.uri().path_and_query().map_or("", |p| p.as_str());
        let facts = mitigate::Facts::of(req.method().as_str(), &front.target, raw_target, req.headers(), client, app);
        self.rules(&facts, front.target.path(), client, id).await
    }

    /// The emergency rules' verdict on a request's facts; `path` is what a `log` rule records.
    async fn rules(
        &self,
        facts: &mitigate::Facts<'_>,
        path: &str,
        client: IpAddr,
        id: RequestId,
    ) -> Result<(), Refusal> {
        match self.state.mitigation.check(facts) {
            Verdict::Pass => Ok(()),
            Verdict::Deny { rule, .. } => Err(Refusal::Mitigated { rule, throttled: false }),
            Verdict::Throttled { rule, .. } => Err(Refusal::Mitigated { rule, throttled: true }),
            Verdict::Logged { rule } => Box::pin(self.logged(rule, path, client, id)).await,
        }
    }

    /// During a lockdown: admins go on; everyone else may only reach the routes the route
    /// table keeps open (the sign-in page and the fixed assets, so that an admin can sign in).
    fn locked_out(&self, ctx: &Ctx, found: &Found) -> bool {
        let mitigation = &self.state.mitigation;
        if !mitigation.lockdown()
            || ctx.session.as_ref().is_some_and(|s| s.identity.groups.contains(&mitigation.admin_group))
        {
            return false;
        }
        match found {
            Found::Portal { on_portal_host } => {
                !portal::routes::open_in_lockdown(*on_portal_host, ctx.front.target.path())
            }
            _ => true,
        }
    }

    /// The handler of what the route found.
    async fn dispatch(&self, found: Found, ctx: Ctx, req: Request<RequestBody>) -> Response<Body> {
        match found {
            // Cold paths are boxed so that the future of every request stays small.
            Found::Portal { on_portal_host } => {
                Box::pin(portal::routes::dispatch(&self.state, ctx, on_portal_host, req)).await
            }
            Found::Tunnel => Box::pin(crate::tunnel::open(&self.state, ctx, req)).await,
            Found::Terminal => Box::pin(crate::sshd::terminal::terminal(&self.state, ctx, req)).await,
            Found::ForwardAuth => Box::pin(self.forward_auth(ctx, req)).await,
            Found::App(i) => self.app(i, ctx, req).await,
            Found::AddSlash(i) => match &self.state.cfg.apps[i].route {
                Route::Path { prefix, .. } => {
                    // The query goes along (the front door checked its bytes).
                    let query = ctx.front.target.query().map(|q| format!("?{q}")).unwrap_or_default();
                    let location = format!("{}{prefix}{query}", self.state.cfg.server.external_origin);
                    redirect(StatusCode::PERMANENT_REDIRECT, &location)
                }
                Route::Host(_) => self.refuse(ctx.at(), Refusal::NoRoute).await,
            },
            Found::NotFound | Found::UnknownHost => self.refuse(ctx.at(), Refusal::NoRoute).await,
        }
    }

    /// A `log` rule matched: the request goes on once its record is written, and not without.
    async fn logged(&self, rule: String, path: &str, client: IpAddr, id: RequestId) -> Result<(), Refusal> {
        tracing::warn!(request = %id, client = %client, rule = %rule, action = "log", "Mitigation rule matched");
        let ev = Event::MitigationMatched {
            rule,
            action: "log".into(),
            path: path.chars().take(256).collect(),
            client,
            request_id: id.to_string(),
        };
        self.state.audit.record(ev).await.map(drop).map_err(|_| Refusal::Unavailable("the audit log, for a log rule"))
    }

    /// Answers a refusal (`respond::respond`); boxed, as refusals are the cold path.
    async fn refuse(&self, at: At<'_>, refusal: Refusal) -> Response<Body> {
        Box::pin(respond(&self.state, at, refusal)).await
    }

    /// policy::evaluate, then proxy::forward with the permit.
    async fn app(&self, i: usize, mut ctx: Ctx, req: Request<RequestBody>) -> Response<Body> {
        let app = &self.state.cfg.apps[i];
        // A proxy in front serves this app; only poort's own paths are answered on its host.
        if app.upstream == crate::config::Upstream::ForwardAuth {
            return self.refuse(ctx.at(), Refusal::NoRoute).await;
        }
        // A command-line session opens tunnels, nothing else.
        if ctx.session.as_ref().is_some_and(|s| s.kind != session::Kind::Browser) {
            ctx.session = None;
        }
        let who = ctx.session.as_ref().map(|s| Subject { identity: &s.identity, mfa: s.mfa() });
        match policy::evaluate(Resource::App(&app.name), &app.access, app.mfa, who) {
            Decision::Allow(permit) => {
                if let Err(refusal) = self.first_access(ctx.session.as_deref(), &app.name, ctx.client).await {
                    return self.refuse(ctx.at(), refusal).await;
                }
                let origin = Origin {
                    client: ctx.client,
                    host: &ctx.front.host,
                    port: crate::config::port_suffix(&self.state.cfg.server.external_origin),
                    session: ctx.session.as_deref(),
                    now: self.state.clock.now(),
                    upstream_seconds: &self.app_labels[i].1,
                };
                let refusal = match self
                    .proxy
                    .forward(permit, app, &ctx.front.target, origin, ctx.front.content_length, req)
                    .await
                {
                    // The session ended while the app was answering: a sign-in page rather
                    // than an answer cut before its first byte.
                    Ok(_) if ctx.session.as_ref().is_some_and(|s| s.ended()) => Refusal::Unauthenticated,
                    Ok(resp) => return resp,
                    // A body that broke its framing: refused like a bad head, and audited.
                    Err(Failure::BadBody) => malformed(StatusCode::BAD_REQUEST, "body_malformed"),
                    Err(Failure::BodyNotAllowed) => malformed(StatusCode::BAD_REQUEST, "body_not_allowed"),
                    Err(Failure::CrossOrigin) => Refusal::Denied {
                        resource: app.name.clone(),
                        reason: "WebSocket from a page of another origin".into(),
                    },
                    Err(f) => Refusal::Upstream(f),
                };
                self.refuse(ctx.at(), refusal).await
            }
            Decision::Authenticate { step_up } => match self.needs_login(&ctx, &req, step_up) {
                Some(mut to_sign_in) => {
                    to_sign_in.extensions_mut().insert(crate::respond::Refused("unauthenticated"));
                    to_sign_in
                }
                None => self.refuse(ctx.at(), Refusal::Unauthenticated).await,
            },
            Decision::Deny(reason) => {
                let denied = Refusal::Denied { resource: app.name.clone(), reason: reason.to_string() };
                self.refuse(ctx.at(), denied).await
            }
        }
    }

    /// Records a session's first access to an app in this process; later ones are not
    /// recorded. No access without its record.
    async fn first_access(&self, session: Option<&Session>, app: &str, client: IpAddr) -> Result<(), Refusal> {
        let Some(s) = session else { return Ok(()) };
        if !self.first_open(&s.id, app) {
            return Ok(());
        }
        let ev = Event::AccessAllowed {
            user: Some(s.identity.user.clone()),
            session: Some(s.id.clone()),
            app: app.to_string(),
            client,
        };
        match Box::pin(self.state.audit.record(ev)).await {
            Ok(_) => Ok(()),
            Err(_) => Err(Refusal::Unavailable("the audit log, for a first access")),
        }
    }

    /// True the first time session `id` opens `app` in this process.
    fn first_open(&self, id: &str, app: &str) -> bool {
        let seen = self.lasting.opened.read().get(id).is_some_and(|apps| apps.contains(app));
        !seen && self.lasting.opened.write().entry(id.to_string()).or_default().insert(app.to_string())
    }

    /// Forgets what ended sessions opened and assertions too old to reuse (called periodically).
    pub fn tidy(&self) {
        self.lasting.opened.write().retain(|id, _| self.state.sessions.is_live(id));
        self.proxy.tidy(self.state.clock.now());
    }

    /// A browser navigation goes to the login page (or, to step up, the second-factor page);
    /// None for anything else (refused as unauthenticated).
    fn needs_login(&self, ctx: &Ctx, req: &Request<RequestBody>, step_up: bool) -> Option<Response<Body>> {
        let wants_html =
            req.headers().get_all(header::ACCEPT).iter().any(|v| v.as_bytes().windows(9).any(|w| w == b"text/html"));
        if !wants_html || !matches!(*req.method(), http::Method::GET | http::Method::HEAD) {
            return None;
        }
        let target = ctx.front.target.forward_form(ctx.front.target.path());
        if ctx.front.host != self.state.cfg.server.portal_host {
            // An app on its own host: the portal hands a session over to this browser only.
            let (nonce, location) = portal::handoff_start(&self.state, &ctx.front.host, &target, step_up);
            let mut resp = redirect(StatusCode::FOUND, &location);
            if let Ok(v) = HeaderValue::from_str(&nonce) {
                resp.headers_mut().append(header::SET_COOKIE, v);
            }
            return Some(resp);
        }
        let page = if step_up { "mfa" } else { "login" };
        let mut location = format!("{}/.poort/{page}?", self.state.cfg.server.external_origin);
        location.push_str(&form_urlencoded::Serializer::new(String::new()).append_pair("next", &target).finish());
        Some(redirect(StatusCode::FOUND, &location))
    }

    /// The live session for this request's cookie, if it was issued for this host.
    async fn session_for(&self, headers: &http::HeaderMap, host: &str) -> Option<Arc<Session>> {
        let cookies = headers.get_all(header::COOKIE).iter().map(|v| v.as_bytes());
        let value = session::cookie::find(cookies, session::SESSION_COOKIE)?;
        match self.state.sessions.lookup(value).await {
            Ok(s) if s.host == host => Some(s),
            Ok(_) => None,
            Err((Lookup::Expired { idle }, Some(s))) => {
                let why = if idle { "idle timeout" } else { "absolute timeout" };
                let ev =
                    Event::SessionExpired { user: s.identity.user.clone(), session: s.id.clone(), why: why.into() };
                Box::pin(self.state.audit.note(ev)).await;
                None
            }
            Err(_) => None,
        }
    }
}

/// What the access log says of a request besides its head and answer, carried on the answer.
#[derive(Clone)]
struct Note {
    id: RequestId,
    client: IpAddr,
    /// The app the request routed to.
    app: Option<usize>,
    session: Option<Arc<Session>>,
    /// Whether there is an access log to carry it to.
    kept: bool,
}

/// A refusal at the front door, before there is a `Ctx`.
fn at(id: RequestId, client: IpAddr, sample: &str) -> At<'_> {
    At { id, client, sample, session: None }
}

fn malformed(status: StatusCode, code: &'static str) -> Refusal {
    Refusal::Malformed { status, code }
}

/// Runs a request's stages; a bug that panics in them costs that request a constant 500 page
/// and its connection, never a worker thread or another request. A plain function rather than
/// an `async fn`, which would hold the stages' future twice (as its argument and as what it
/// awaits): every request's state would be twice its size.
fn shielded(stages: impl Future<Output = Response<Body>>) -> impl Future<Output = Response<Body>> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(stages).catch_unwind().map(|ended| match ended {
        Ok(resp) => resp,
        Err(_) => {
            tracing::error!("A request's handling panicked; answered 500");
            let mut resp = error_page(StatusCode::INTERNAL_SERVER_ERROR, RequestId(0));
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
    })
}

/// A response to HEAD: the headers of the answer to GET, with its length and without its body
/// (HTTP/2 refuses a body on a HEAD response).
fn without_body(resp: &mut Response<Body>) {
    if let Body::Full(Some(b)) = resp.body() {
        let len = HeaderValue::from(b.len());
        resp.headers_mut().insert(header::CONTENT_LENGTH, len);
        *resp.body_mut() = Body::empty();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_a_request_costs_that_request_only() {
        let resp = shielded(async { panic!("a bug in a handler") }).await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(resp.headers().get(header::CONNECTION).unwrap(), "close");
        let fine = shielded(async { error_page(StatusCode::NOT_FOUND, RequestId(1)) }).await;
        assert_eq!(fine.status(), StatusCode::NOT_FOUND);
    }
}
