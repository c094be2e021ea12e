//! The portal: the fixed set of `/.poort/` pages (login, logout, app launcher, my sessions,
//! JWKS, health, the style sheet) and the launcher at `/`. Routes are exact matches on the
//! canonical path; pages are askama templates compiled into the binary with auto-escaping.
//! Before login only login, JWKS, health, the style sheet and the host hand-off answer.

mod device;
mod mfa;
mod passkey;
mod sso;

use std::collections::HashMap;
use std::sync::Mutex;

use askama::Template;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;

use crate::audit::Event;
use crate::body::Body;
use crate::clock::{UnixTime, format_minutes};
use crate::config::{Config, Route};
use crate::gateway::{Ctx, Gateway, error_page, page, port_of, redirect};
use crate::identity::seal::Sealer;
use crate::identity::valid_name;
use crate::policy::{self, Decision, Subject};
use crate::request::Target;
use crate::session::{self, Session, cookie};

const STYLE: &str = include_str!("../../assets/style.css");
const SCRIPT: &str = include_str!("../../assets/webauthn.js");
/// Largest form poort accepts (login, logout, session end).
const MAX_FORM: usize = 16 * 1024;
/// A host hand-off code is good for this long, once.
const HANDOFF_SECS: i64 = 60;

/// Portal state: pending host hand-offs, the sign-in rate limiter, the sealer for secrets.
pub struct State {
    handoffs: Mutex<HashMap<String, Handoff>>,
    limiter: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
    sealer: std::sync::Arc<Sealer>,
    passkeys: passkey::Passkeys,
    devices: device::Devices,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("portal::State")
    }
}

#[derive(Debug)]
struct Handoff {
    session_id: String,
    host: String,
    path: String,
    expires: UnixTime,
}

impl State {
    pub fn new(cfg: &Config, sealer: std::sync::Arc<Sealer>) -> anyhow::Result<State> {
        let per_minute =
            std::num::NonZeroU32::new(cfg.login.per_address_per_minute).unwrap_or(std::num::NonZeroU32::MIN);
        Ok(State {
            passkeys: passkey::Passkeys::new(&cfg.server.external_origin, &cfg.server.portal_host)?,
            handoffs: Mutex::new(HashMap::new()),
            devices: device::Devices::default(),
            limiter: governor::RateLimiter::keyed(governor::Quota::per_minute(per_minute)),
            sealer,
        })
    }

    /// Forgets rate-limit state of addresses that have been quiet (called periodically).
    pub fn tidy(&self) {
        self.limiter.retain_recent();
    }
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage<'a> {
    /// Single sign-on providers: (name, button title).
    providers: &'a [(String, String)],
    csrf: &'a str,
    next: &'a str,
    username: &'a str,
    error: Option<&'a str>,
}

struct TunnelLink {
    name: String,
    title: String,
    description: String,
    /// A suggested local port: the target's own port above 1024, else 10000 plus it.
    port: u32,
}

struct AppLink {
    title: String,
    description: String,
    url: String,
}

#[derive(Template)]
#[template(path = "launcher.html")]
struct LauncherPage<'a> {
    user: &'a str,
    csrf: &'a str,
    apps: Vec<AppLink>,
    tunnels: Vec<TunnelLink>,
    origin: &'a str,
}

struct SessionLine {
    id: String,
    created: String,
    last_seen: String,
    client_addr: String,
    user_agent: String,
    current: bool,
}

#[derive(Template)]
#[template(path = "sessions.html")]
struct SessionsPage<'a> {
    user: &'a str,
    csrf: &'a str,
    sessions: Vec<SessionLine>,
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    status: u16,
    title: &'a str,
    message: &'a str,
    request_id: &'a str,
}

pub fn render_error(status: u16, title: &str, message: &str, request_id: &str) -> String {
    ErrorPage { status, title, message, request_id }.render().unwrap_or_else(|_| format!("{status} {title}"))
}

pub(crate) fn html(status: StatusCode, t: &impl Template) -> Response<Body> {
    match t.render() {
        Ok(s) => page(status, "text/html; charset=utf-8", s),
        Err(e) => {
            tracing::error!(error = %e, "Template rendering failed");
            page(StatusCode::INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", Body::from_static("internal error\n"))
        }
    }
}

/// Where to send a user after login (SECURITY.md rule 12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// A single-slash relative path on the portal host.
    Relative(String),
    /// A path on a host-routed app's exact origin.
    App { host: String, path: String },
    /// Anything else: the launcher.
    Portal,
}

fn safe_relative(p: &str) -> bool {
    p.starts_with('/')
        && !p.starts_with("//")
        && !p.starts_with("/\\")
        && !p.bytes().any(|b| b <= b' ' || b == 0x7f || b == b'\\')
        && Target::parse(p).is_ok()
}

/// Classifies a `next` value; anything not plainly safe becomes `Portal`.
pub fn safe_next(next: &str, cfg: &Config) -> Next {
    if safe_relative(next) {
        return Next::Relative(next.to_string());
    }
    for app in &cfg.apps {
        let (Route::Host(host), Some(origin)) = (&app.route, app.origin(&cfg.server)) else {
            continue;
        };
        if let Some(rest) = next.strip_prefix(origin.as_str()) {
            let path = if rest.is_empty() { "/" } else { rest };
            if safe_relative(path) {
                return Next::App { host: host.clone(), path: path.to_string() };
            }
        }
    }
    Next::Portal
}

pub async fn serve(gw: &Gateway, ctx: Ctx, on_portal_host: bool, req: Request<Incoming>) -> Response<Body> {
    let path = ctx.front.target.path().to_string();
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    let post = *req.method() == Method::POST;
    match (on_portal_host, path.as_str()) {
        (_, "/.poort/style.css") if get => {
            let mut r = page(StatusCode::OK, "text/css; charset=utf-8", Body::from_static(STYLE));
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
            r
        }
        (true, "/.poort/webauthn.js") if get => {
            let mut r = page(StatusCode::OK, "text/javascript; charset=utf-8", Body::from_static(SCRIPT));
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
            r
        }
        (_, "/.poort/health") if get => page(StatusCode::OK, "text/plain; charset=utf-8", Body::from_static("ok\n")),
        (true, "/.poort/jwks.json") if get => {
            let mut r = page(StatusCode::OK, "application/json", Body::from(gw.proxy.signer().jwks().to_string()));
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
            r
        }
        (true, "/") if get => launcher(gw, &ctx, &req),
        (true, "/.poort/login") if get => login_form(gw, &ctx, &req).await,
        (true, "/.poort/login") if post => login_submit(gw, ctx, req).await,
        (true, "/.poort/logout") if post => logout(gw, ctx, req).await,
        (true, "/.poort/sessions") if get => sessions_page(gw, &ctx, &req).await,
        (true, "/.poort/sessions/end") if post => end_session(gw, ctx, req).await,
        (false, "/.poort/handoff") if get => handoff(gw, &ctx).await,
        (true, "/.poort/mfa") if get => mfa::mfa_page(gw, &ctx, &req).await,
        (true, "/.poort/mfa") if post => mfa::mfa_submit(gw, ctx, req).await,
        (true, "/.poort/security") if get => mfa::security_page(gw, &ctx, &req).await,
        (true, "/.poort/security/totp") if post => mfa::security_change(gw, ctx, req, "totp").await,
        (true, "/.poort/security/totp/confirm") if post => mfa::security_change(gw, ctx, req, "totp/confirm").await,
        (true, "/.poort/security/totp/remove") if post => mfa::security_change(gw, ctx, req, "totp/remove").await,
        (true, "/.poort/security/recovery") if post => mfa::security_change(gw, ctx, req, "recovery").await,
        (true, "/.poort/security/passkey/remove") if post => mfa::security_change(gw, ctx, req, "passkey/remove").await,
        (true, "/.poort/security/passkey/start") if post => passkey::register_start(gw, ctx, req).await,
        (true, "/.poort/security/passkey/finish") if post => passkey::register_finish(gw, ctx, req).await,
        (true, "/.poort/mfa/passkey/start") if post => passkey::factor_start(gw, ctx, req).await,
        (true, "/.poort/mfa/passkey/finish") if post => passkey::factor_finish(gw, ctx, req).await,
        (true, "/.poort/device/code") if post => device::code(gw, ctx, req).await,
        (true, "/.poort/device/token") if post => device::token(gw, req).await,
        (true, "/.poort/device/logout") if post => device::logout(gw, ctx, req).await,
        (true, "/.poort/device") if get => device::approve_page(gw, &ctx, &req).await,
        (true, "/.poort/device") if post => device::decide(gw, ctx, req).await,
        (true, p) if get && p.starts_with("/.poort/tunnel/") => {
            let name = p["/.poort/tunnel/".len()..].to_string();
            crate::tunnel::open(gw, ctx, req, &name).await
        }
        (true, p) if get && p.starts_with("/.poort/oidc/") => {
            let rest = p["/.poort/oidc/".len()..].to_string();
            sso::serve(gw, ctx, req, &rest).await
        }
        (true, "/.poort/login/passkey/start") if post => passkey::passwordless_start(gw, ctx, req).await,
        (true, "/.poort/login/passkey/finish") if post => passkey::passwordless_finish(gw, ctx, req).await,
        (
            true,
            "/"
            | "/.poort/login"
            | "/.poort/logout"
            | "/.poort/sessions"
            | "/.poort/sessions/end"
            | "/.poort/jwks.json"
            | "/.poort/mfa"
            | "/.poort/security"
            | "/.poort/security/totp"
            | "/.poort/security/totp/confirm"
            | "/.poort/security/totp/remove"
            | "/.poort/security/recovery"
            | "/.poort/security/passkey/remove"
            | "/.poort/security/passkey/start"
            | "/.poort/security/passkey/finish"
            | "/.poort/mfa/passkey/start"
            | "/.poort/mfa/passkey/finish"
            | "/.poort/login/passkey/start"
            | "/.poort/login/passkey/finish"
            | "/.poort/webauthn.js"
            | "/.poort/device"
            | "/.poort/device/code"
            | "/.poort/device/token"
            | "/.poort/device/logout",
        )
        | (_, "/.poort/style.css" | "/.poort/health")
        | (false, "/.poort/handoff") => error_page(StatusCode::METHOD_NOT_ALLOWED, ctx.id),
        _ => error_page(StatusCode::NOT_FOUND, ctx.id),
    }
}

/// The anti-CSRF value for a page: the browser's existing one, or a new one to set.
pub(crate) fn csrf_for_page(headers: &HeaderMap) -> (String, bool) {
    let cookies = headers.get_all(header::COOKIE).iter().map(|v| v.as_bytes());
    match cookie::find(cookies, cookie::CSRF_COOKIE) {
        Some(v) if cookie::decode_token(v).is_some() => (v.to_string(), false),
        _ => (cookie::encode_token(&session::random_bytes()), true),
    }
}

pub(crate) fn with_csrf_cookie(mut resp: Response<Body>, csrf: &str, is_new: bool) -> Response<Body> {
    if is_new {
        if let Ok(v) = HeaderValue::from_str(&cookie::set_csrf(csrf)) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

/// A form is genuine when it came from a poort page: the Origin is the portal's and the
/// hidden field matches the `__Host-` cookie (double submit).
pub(crate) fn form_is_genuine(gw: &Gateway, headers: &HeaderMap, form: &HashMap<String, String>) -> bool {
    let origin_ok =
        headers.get(header::ORIGIN).is_some_and(|o| o.as_bytes() == gw.cfg.server.external_origin.as_bytes());
    let cookies = headers.get_all(header::COOKIE).iter().map(|v| v.as_bytes());
    let cookie_value = cookie::find(cookies, cookie::CSRF_COOKIE).filter(|v| cookie::decode_token(v).is_some());
    let field = form.get("csrf").map(String::as_str).unwrap_or("");
    let token_ok = cookie_value.is_some_and(|c| bool::from(c.as_bytes().ct_eq(field.as_bytes())));
    origin_ok && token_ok
}

/// Reads a bounded urlencoded form body.
pub(crate) async fn read_form(req: Request<Incoming>) -> Option<(HeaderMap, HashMap<String, String>)> {
    let (parts, body) = req.into_parts();
    let ct = parts.headers.get(header::CONTENT_TYPE)?.as_bytes();
    if !ct.starts_with(b"application/x-www-form-urlencoded") {
        return None;
    }
    let bytes = Limited::new(body, MAX_FORM).collect().await.ok()?.to_bytes();
    let mut form = HashMap::new();
    for (k, v) in form_urlencoded::parse(&bytes) {
        // A repeated field is ambiguous: refuse the whole form.
        if form.insert(k.into_owned(), v.into_owned()).is_some() {
            return None;
        }
    }
    Some((parts.headers, form))
}

/// Whether `user` may still sign in during a lockdown (a member of the admin group).
pub(crate) async fn lockdown_admin(gw: &Gateway, user: &str) -> bool {
    if !valid_name(user) {
        return false;
    }
    let (name, group) = (user.to_string(), gw.mitigation.admin_group.clone());
    gw.store
        .run(move |c| crate::store::Store::identity(c, &name))
        .await
        .ok()
        .flatten()
        .is_some_and(|id| id.groups.contains(&group))
}

/// A form posted by a signed-in user from a poort page: the session, the headers, the fields.
/// Anything else is answered here (sign in, 400 or 403).
pub(crate) async fn signed_in_form(
    gw: &Gateway,
    ctx: &Ctx,
    req: Request<Incoming>,
) -> Result<(std::sync::Arc<Session>, HeaderMap, HashMap<String, String>), Response<Body>> {
    let Some(s) = ctx.session.clone() else { return Err(to_login(gw)) };
    let Some((headers, form)) = read_form(req).await else { return Err(error_page(StatusCode::BAD_REQUEST, ctx.id)) };
    if !form_is_genuine(gw, &headers, &form) {
        return Err(error_page(StatusCode::FORBIDDEN, ctx.id));
    }
    Ok((s, headers, form))
}

pub(crate) fn query_param(ctx: &Ctx, name: &str) -> Option<String> {
    let q = ctx.front.target.query()?;
    form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

pub(crate) fn to_login(gw: &Gateway) -> Response<Body> {
    redirect(StatusCode::FOUND, &format!("{}/.poort/login", gw.cfg.server.external_origin))
}

fn launcher(gw: &Gateway, ctx: &Ctx, req: &Request<Incoming>) -> Response<Body> {
    let Some(s) = &ctx.session else { return to_login(gw) };
    let apps = gw
        .cfg
        .apps
        .iter()
        .enumerate()
        .filter(|(i, app)| {
            // Apps that need a step-up are listed too: opening one asks for the factor.
            let who = Subject { identity: &s.identity, mfa: true };
            matches!(policy::evaluate(*i, &app.access, app.mfa, Some(who)), Decision::Allow(_))
        })
        .map(|(_, app)| AppLink {
            title: app.title.clone(),
            description: app.description.clone(),
            url: app.launch_url(&gw.cfg.server),
        })
        .collect();
    let who = Subject { identity: &s.identity, mfa: true };
    let tunnels = gw
        .cfg
        .tunnels
        .iter()
        .enumerate()
        .filter(|(i, t)| {
            matches!(policy::evaluate(gw.cfg.apps.len() + i, &t.access, t.mfa, Some(who)), Decision::Allow(_))
        })
        .map(|(_, t)| {
            let port: u32 = t.target.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
            TunnelLink {
                name: t.name.clone(),
                title: t.title.clone(),
                description: t.description.clone(),
                port: if port > 1024 { port } else { 10000 + port },
            }
        })
        .collect();
    let (csrf, new) = csrf_for_page(req.headers());
    let page =
        LauncherPage { user: &s.identity.user, csrf: &csrf, apps, tunnels, origin: &gw.cfg.server.external_origin };
    with_csrf_cookie(html(StatusCode::OK, &page), &csrf, new)
}

async fn login_form(gw: &Gateway, ctx: &Ctx, req: &Request<Incoming>) -> Response<Body> {
    let next = query_param(ctx, "next").unwrap_or_default();
    if let Some(s) = &ctx.session {
        return go_next(gw, s, safe_next(&next, &gw.cfg));
    }
    let (csrf, new) = csrf_for_page(req.headers());
    let next = match safe_next(&next, &gw.cfg) {
        Next::Portal => String::new(),
        _ => next,
    };
    let providers = gw.oidc.buttons();
    let page = LoginPage { providers: &providers, csrf: &csrf, next: &next, username: "", error: None };
    with_csrf_cookie(html(StatusCode::OK, &page), &csrf, new)
}

fn login_again(
    gw: &Gateway,
    status: StatusCode,
    headers: &HeaderMap,
    next: &str,
    username: &str,
    error: &str,
) -> Response<Body> {
    let (csrf, new) = csrf_for_page(headers);
    let providers = gw.oidc.buttons();
    let page = LoginPage { providers: &providers, csrf: &csrf, next, username, error: Some(error) };
    with_csrf_cookie(html(status, &page), &csrf, new)
}

async fn login_submit(gw: &Gateway, ctx: Ctx, req: Request<Incoming>) -> Response<Body> {
    let Some((headers, form)) = read_form(req).await else {
        return error_page(StatusCode::BAD_REQUEST, ctx.id);
    };
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let (username, pw, next) = (field("username").trim(), field("password"), field("next"));
    if !form_is_genuine(gw, &headers, &form) {
        return login_again(
            gw,
            StatusCode::FORBIDDEN,
            &headers,
            next,
            "",
            "The sign-in form expired. Please try again.",
        );
    }
    if !mfa::attempt_allowed(gw, ctx.client) {
        let msg = "Too many sign-in attempts from your address. Wait a minute and try again.";
        return login_again(gw, StatusCode::TOO_MANY_REQUESTS, &headers, next, "", msg);
    }
    if gw.mitigation.lockdown() && !lockdown_admin(gw, username).await {
        // No password check and no session for anyone but administrators; the same page for
        // unknown users, so this tells nothing about accounts.
        let pw = pw.to_string();
        let _ = tokio::task::spawn_blocking(move || crate::identity::password::verify_dummy(&pw)).await;
        let ev = Event::LockedDown { user: None, path: "/.poort/login".into(), client: ctx.client.to_string() };
        if let Err(e) = gw.audit.record(ev).await {
            tracing::error!(error = %e, "Audit write failed");
        }
        return crate::gateway::maintenance_page(ctx.id);
    }
    // Same work and the same answer whether the user exists, is locked, or typed a wrong
    // password.
    let checked = mfa::password_check(gw, username, pw, ctx.client).await;
    let client = ctx.client.to_string();
    let shown_user = if valid_name(username) { username.to_string() } else { "(invalid name)".to_string() };
    let username = match checked {
        mfa::PasswordCheck::Right(name) => name,
        failed => {
            tracing::info!(client = %client, user = %shown_user, "Login failed");
            let _ = gw.audit.record(Event::LoginFailed { user: shown_user, client }).await;
            let shown = if valid_name(username) { username } else { "" };
            if failed == mfa::PasswordCheck::DirectoryDown {
                let msg = "The user directory cannot be reached, so poort cannot check your password. Try again in a few minutes; if it persists, tell your IT helpdesk.";
                return login_again(gw, StatusCode::SERVICE_UNAVAILABLE, &headers, next, shown, msg);
            }
            return login_again(gw, StatusCode::UNAUTHORIZED, &headers, next, shown, "Wrong username or password.");
        }
    };
    let username = username.as_str();
    let user_agent = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let signed_in = SignedIn { user: username, factors: "pwd", user_agent, next, logout_url: None };
    open_session(gw, &ctx, signed_in).await
}

/// A sign-in that succeeded, by password or at an identity provider.
pub(crate) struct SignedIn<'a> {
    pub user: &'a str,
    /// `amr` values, space-separated: `pwd`, `ext`, `ext mfa`.
    pub factors: &'a str,
    pub user_agent: String,
    pub next: &'a str,
    /// Where signing out also ends the provider's session.
    pub logout_url: Option<String>,
}

/// Opens the session for a sign-in: a new token (a session the browser already had ends
/// here), audited before it is handed out, and the user sent on; with `[mfa] required`, a
/// user with a second factor on file gives it first, unless the sign-in already included one.
pub(crate) async fn open_session(gw: &Gateway, ctx: &Ctx, s: SignedIn<'_>) -> Response<Body> {
    if let Some(old) = &ctx.session {
        let _ = gw.sessions.end(&old.id).await;
    }
    let client = ctx.client.to_string();
    let created =
        gw.sessions.create_with(s.user, &gw.cfg.server.portal_host, client.clone(), s.user_agent, s.factors).await;
    let (id, token) = match created {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "Creating a session failed");
            return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
        }
    };
    if let Some(url) = s.logout_url {
        let sid = id.clone();
        if let Err(e) = gw.store.run(move |c| crate::store::Store::set_logout_url(c, &sid, &url)).await {
            tracing::warn!(error = %e, "Recording the provider's logout address failed");
        }
    }
    if let Err(e) =
        gw.audit.record(Event::LoginSucceeded { user: s.user.to_string(), session: id.clone(), client }).await
    {
        tracing::error!(error = %e, "Audit unavailable; ending the new session");
        let _ = gw.sessions.end(&id).await;
        return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
    }
    tracing::info!(user = %s.user, session = %id, factors = s.factors, "Login succeeded");
    let ask_factor = !session::includes_second_factor(s.factors) && gw.cfg.mfa.required && {
        let name = s.user.to_string();
        gw.store.run(move |c| crate::identity::mfa::factors(c, &name)).await.is_ok_and(|f| f.any())
    };
    let mut resp = match safe_next(s.next, &gw.cfg) {
        _ if ask_factor => {
            let q = form_urlencoded::Serializer::new(String::new()).append_pair("next", s.next).finish();
            redirect(StatusCode::SEE_OTHER, &format!("{}/.poort/mfa?{q}", gw.cfg.server.external_origin))
        }
        Next::App { host, path } => handoff_redirect(gw, &id, host, path),
        other => go_to(gw, other),
    };
    if let Ok(v) = HeaderValue::from_str(&cookie::set_session(&token.cookie_value)) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

pub(crate) fn go_to(gw: &Gateway, next: Next) -> Response<Body> {
    let origin = &gw.cfg.server.external_origin;
    match next {
        Next::Relative(p) => redirect(StatusCode::SEE_OTHER, &format!("{origin}{p}")),
        _ => redirect(StatusCode::SEE_OTHER, &format!("{origin}/")),
    }
}

pub(crate) fn go_next(gw: &Gateway, s: &Session, next: Next) -> Response<Body> {
    match next {
        Next::App { host, path } => handoff_redirect(gw, &s.id, host, path),
        other => go_to(gw, other),
    }
}

/// Sends the browser to an app host with a one-time code that sets that host's own cookie.
pub(crate) fn handoff_redirect(gw: &Gateway, session_id: &str, host: String, path: String) -> Response<Body> {
    let code = cookie::encode_token(&session::random_bytes());
    let now = gw.clock.now();
    if let Ok(mut h) = gw.portal.handoffs.lock() {
        h.retain(|_, v| v.expires > now);
        h.insert(
            code.clone(),
            Handoff { session_id: session_id.to_string(), host: host.clone(), path, expires: now + HANDOFF_SECS },
        );
    }
    redirect(
        StatusCode::SEE_OTHER,
        &format!("https://{host}{}/.poort/handoff?code={code}", port_of(&gw.cfg.server.external_origin)),
    )
}

async fn handoff(gw: &Gateway, ctx: &Ctx) -> Response<Body> {
    let code = query_param(ctx, "code").unwrap_or_default();
    let taken = gw.portal.handoffs.lock().ok().and_then(|mut h| h.remove(&code));
    let Some(h) = taken.filter(|h| h.host == ctx.front.host && h.expires > gw.clock.now()) else {
        return to_login(gw);
    };
    let token = session::new_token();
    let (hash, sid, host) = (token.hash, h.session_id.clone(), h.host.clone());
    let added = gw
        .store
        .run(move |c| {
            c.execute(
                "INSERT INTO session_tokens (token_hash, session_id, host) VALUES (?1, ?2, ?3)",
                rusqlite::params![&hash[..], sid, host],
            )
        })
        .await;
    if added.is_err() {
        // The session ended meanwhile (the foreign key refuses the token).
        return to_login(gw);
    }
    let mut resp = redirect(StatusCode::SEE_OTHER, &h.path);
    if let Ok(v) = HeaderValue::from_str(&cookie::set_session(&token.cookie_value)) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

fn clear_session_cookie(resp: &mut Response<Body>) {
    resp.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie::clear_session()).expect("invariant: constant cookie is valid"),
    );
}

async fn logout(gw: &Gateway, ctx: Ctx, req: Request<Incoming>) -> Response<Body> {
    let Some((headers, form)) = read_form(req).await else {
        return error_page(StatusCode::BAD_REQUEST, ctx.id);
    };
    if !form_is_genuine(gw, &headers, &form) {
        return error_page(StatusCode::FORBIDDEN, ctx.id);
    }
    let mut provider_logout = None;
    if let Some(s) = &ctx.session {
        // Read before the session row goes: a single sign-on session also ends at the provider.
        provider_logout = sso::logout_url(gw, &s.id).await;
        let _ = gw.sessions.end(&s.id).await;
        let ev = Event::Logout { user: s.identity.user.clone(), session: s.id.clone(), client: ctx.client.to_string() };
        if let Err(e) = gw.audit.record(ev).await {
            tracing::error!(error = %e, "Audit write failed");
        }
    }
    let mut resp = match provider_logout {
        Some(url) => redirect(StatusCode::SEE_OTHER, &url),
        None => to_login(gw),
    };
    *resp.status_mut() = StatusCode::SEE_OTHER;
    clear_session_cookie(&mut resp);
    resp
}

async fn sessions_page(gw: &Gateway, ctx: &Ctx, req: &Request<Incoming>) -> Response<Body> {
    let Some(s) = &ctx.session else { return to_login(gw) };
    let store = gw.store.clone();
    let user = s.identity.user.clone();
    let rows = match tokio::task::spawn_blocking(move || store.list_sessions(Some(&user))).await {
        Ok(Ok(rows)) => rows,
        _ => return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id),
    };
    let sessions = rows
        .into_iter()
        .map(|r| SessionLine {
            current: r.id == s.id,
            created: format_minutes(r.created_at),
            last_seen: format_minutes(if r.id == s.id { s.last_seen() } else { r.last_seen }),
            client_addr: r.client_addr,
            user_agent: r.user_agent,
            id: r.id,
        })
        .collect();
    let (csrf, new) = csrf_for_page(req.headers());
    with_csrf_cookie(html(StatusCode::OK, &SessionsPage { user: &s.identity.user, csrf: &csrf, sessions }), &csrf, new)
}

async fn end_session(gw: &Gateway, ctx: Ctx, req: Request<Incoming>) -> Response<Body> {
    let (s, _, form) = match signed_in_form(gw, &ctx, req).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let id = form.get("id").cloned().unwrap_or_default();
    let (store, user) = (gw.store.clone(), s.identity.user.clone());
    let owned = tokio::task::spawn_blocking(move || store.list_sessions(Some(&user)))
        .await
        .ok()
        .and_then(Result::ok)
        .is_some_and(|rows| rows.iter().any(|r| r.id == id));
    if !owned {
        return error_page(StatusCode::NOT_FOUND, ctx.id);
    }
    let _ = gw.sessions.end(&id).await;
    let ev = Event::SessionEnded { user: s.identity.user.clone(), session: id.clone(), by: s.identity.user.clone() };
    if let Err(e) = gw.audit.record(ev).await {
        tracing::error!(error = %e, "Audit write failed");
    }
    if id == s.id {
        let mut resp = to_login(gw);
        *resp.status_mut() = StatusCode::SEE_OTHER;
        clear_session_cookie(&mut resp);
        return resp;
    }
    redirect(StatusCode::SEE_OTHER, &format!("{}/.poort/sessions", gw.cfg.server.external_origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_targets() {
        let cfg = crate::config::parse(
            r#"
            [server]
            external_url = "https://gate.example:8443"
            [[app]]
            name = "git"
            upstream = "http://127.0.0.1:1"
            host = "git.example"
            access = "authenticated"
            "#,
            std::path::Path::new("."),
        )
        .unwrap();
        let cases = [
            ("/", Next::Relative("/".into())),
            ("/wiki/page?x=1", Next::Relative("/wiki/page?x=1".into())),
            ("//evil.example", Next::Portal),
            ("/\\evil.example", Next::Portal),
            ("/%2f/evil.example", Next::Portal),
            ("https://evil.example/", Next::Portal),
            ("javascript:alert(1)", Next::Portal),
            ("/ /evil", Next::Portal),
            ("/\t/evil", Next::Portal),
            ("", Next::Portal),
            ("https://git.example:8443/repo", Next::App { host: "git.example".into(), path: "/repo".into() }),
            ("https://git.example:8443", Next::App { host: "git.example".into(), path: "/".into() }),
            ("https://git.example:8443.evil.example/", Next::Portal),
            ("https://git.example:8443@evil.example/", Next::Portal),
            ("https://git.example/", Next::Portal),
        ];
        for (next, want) in cases {
            assert_eq!(safe_next(next, &cfg), want, "{next:?}");
        }
    }
}
