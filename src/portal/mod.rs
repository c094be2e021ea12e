//! The portal: the fixed set of `/.poort/` pages (login, logout, app launcher, my sessions,
//! second factors, command-line sign-in, the host hand-off, JWKS, health, the style sheet,
//! and the admin console).
//! Which route answers whom is declared in `routes`, whose dispatcher applies each route's
//! guard before the handler here runs. Pages are askama templates compiled into the binary
//! with auto-escaping.

mod admin;
pub mod device;
mod mfa;
mod passkey;
mod signin;
pub mod routes;
mod sso;

use askama::Template;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use crate::audit::Event;
use crate::body::Body;
use crate::clock::format_minutes;
use crate::config::{Config, Route};
use crate::names::valid_user_name;
use crate::policy::{self, Decision, Resource, Subject};
use crate::request::Target;
use crate::respond::{error_page, html, page, redirect};
use crate::session::{self, Factor, Factors, cookie};
use crate::state::State;
use crate::state::pending::Handoff;
use crate::store::flows;
pub use routes::Call;
use routes::Page;
pub(crate) use signin::{PasswordCheck, SignedIn, attempt_allowed, lockdown_admin, open_session};

const STYLE: &str = include_str!("../../assets/style.css");
const SCRIPT: &str = include_str!("../../assets/webauthn.js");
const TERMINAL_SCRIPT: &str = include_str!("../../assets/terminal.js");
/// The terminal emulator, xterm.js (MIT; assets/vendor/xterm, refreshed by scripts/vendor-xterm).
const XTERM_SCRIPT: &str = include_str!("../../assets/vendor/xterm/xterm.js");
const XTERM_STYLE: &str = include_str!("../../assets/vendor/xterm/xterm.css");
/// A host hand-off code is good for this long, once.
const HANDOFF_SECS: i64 = 60;

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

/// An SSH target the person may use: the command that reaches it, and the browser terminal.
struct SshLink {
    name: String,
    title: String,
    description: String,
    /// `ssh -p PORT PERSON+NAME@HOST`, when the front door listens.
    command: String,
    /// The target allows a shell: it opens in the browser too.
    shell: bool,
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
    ssh: Vec<SshLink>,
    origin: &'a str,
    /// In the admin group: the console is linked (it checks for itself who gets in).
    admin: bool,
}

struct SessionLine {
    id: String,
    created: String,
    last_seen: String,
    client_addr: String,
    /// Browser and system, as a person names them ("Firefox on Windows").
    browser: String,
    current: bool,
    /// A command-line session this browser session approved.
    approved_here: bool,
}

/// A recent change to the user's factors, from the audit log.
struct ChangeLine {
    at: String,
    change: String,
    client: String,
    /// Made with the password alone (the first factor of a user who had none).
    password_only: bool,
}

#[derive(Template)]
#[template(path = "sessions.html")]
struct SessionsPage<'a> {
    user: &'a str,
    csrf: &'a str,
    sessions: Vec<SessionLine>,
    changes: Vec<ChangeLine>,
    approved_here: usize,
}

/// Where to send a user after login (docs/threat-model.md, rule 12).
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

/// Runs the handler of a route whose guard the dispatcher (`routes::dispatch`) applied.
pub(crate) async fn serve(st: &State, page_: Page, call: Call) -> Response<Body> {
    let cached = |body: Body, content_type: &'static str, max_age: &'static str| {
        let mut r = page(StatusCode::OK, content_type, body);
        r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static(max_age));
        r
    };
    match page_ {
        Page::Style => cached(Body::from_static(STYLE), "text/css; charset=utf-8", "public, max-age=3600"),
        Page::Script => cached(Body::from_static(SCRIPT), "text/javascript; charset=utf-8", "public, max-age=3600"),
        Page::TerminalScript => {
            cached(Body::from_static(TERMINAL_SCRIPT), "text/javascript; charset=utf-8", "private, max-age=3600")
        }
        Page::XtermScript => {
            cached(Body::from_static(XTERM_SCRIPT), "text/javascript; charset=utf-8", "private, max-age=3600")
        }
        Page::XtermStyle => cached(Body::from_static(XTERM_STYLE), "text/css; charset=utf-8", "private, max-age=3600"),
        Page::Health => page(StatusCode::OK, "text/plain; charset=utf-8", Body::from_static("ok\n")),
        Page::Jwks => cached(Body::from(st.signer.jwks().to_string()), "application/json", "public, max-age=300"),
        Page::Launcher => launcher(st, &call),
        Page::LoginForm => login_form(st, &call),
        Page::LoginSubmit => login_submit(st, call).await,
        Page::Logout => logout(st, call).await,
        Page::Sessions => sessions_page(st, &call).await,
        Page::EndSession => end_session(st, call).await,
        Page::Handoff => handoff(st, &call).await,
        Page::HandoffBegin => handoff_begin(st, &call).await,
        Page::MfaForm => mfa::factor_form(st, &call, mfa::Mode::StepUp).await,
        Page::MfaSubmit => mfa::factor_submit(st, call, mfa::Mode::StepUp).await,
        Page::ConfirmForm => mfa::factor_form(st, &call, mfa::Mode::Confirm).await,
        Page::ConfirmSubmit => mfa::factor_submit(st, call, mfa::Mode::Confirm).await,
        Page::Security => mfa::security_page(st, &call).await,
        Page::TotpBegin => mfa::totp_begin(st, &call).await,
        Page::TotpConfirm => mfa::totp_confirm(st, call).await,
        Page::TotpRemove => mfa::totp_remove(st, &call).await,
        Page::RecoveryCodes => mfa::recovery_codes(st, &call).await,
        Page::PasskeyRemove => mfa::passkey_remove(st, &call).await,
        Page::SshKeyAdd => mfa::ssh_key_add(st, &call).await,
        Page::SshKeyRemove => mfa::ssh_key_remove(st, &call).await,
        Page::PasskeyRegisterStart => passkey::register_start(st, call).await,
        Page::PasskeyRegisterFinish => passkey::register_finish(st, call).await,
        Page::FactorStart => passkey::factor_start(st, call).await,
        Page::FactorFinish => passkey::factor_finish(st, call).await,
        Page::PasswordlessStart => passkey::passwordless_start(st, call).await,
        Page::PasswordlessFinish => passkey::passwordless_finish(st, call).await,
        Page::DeviceCode => device::code(st, &call).await,
        Page::DeviceToken => device::token(st, &call).await,
        Page::DeviceLogout => device::logout(st, &call).await,
        Page::DeviceForm => device::approve_page(st, &call).await,
        Page::DeviceDecide => device::decide(st, call).await,
        // The gateway routes tunnels (route::Found::Tunnel); the row only declares them.
        Page::Tunnel | Page::ForwardAuth | Page::Terminal => error_page(StatusCode::NOT_FOUND, call.ctx.id),
        Page::SignInHere => sign_in_here(st, &call),
        Page::Oidc => sso::serve(st, call).await,
        Page::AdminHome
        | Page::AdminUsers
        | Page::AdminUser
        | Page::AdminUserAct
        | Page::AdminSessions
        | Page::AdminSessionsAct
        | Page::AdminRecordings
        | Page::AdminRecording
        | Page::AdminAudit
        | Page::AdminAuditExport
        | Page::AdminMitigation
        | Page::AdminMitigationAct
        | Page::AdminAccess
        | Page::AdminReport => admin::serve(st, page_, call).await,
    }
}

/// The anti-CSRF value for a page: the browser's existing one, or a new one to set.
pub(crate) fn csrf_for_page(headers: &HeaderMap) -> (String, bool) {
    let cookies = headers.get_all(header::COOKIE).iter().map(|v| v.as_bytes());
    match cookie::find(cookies, cookie::CSRF_COOKIE) {
        Some(v) if cookie::decode_token(v).is_some() => (v.to_string(), false),
        _ => (cookie::encode_token(&crate::secret::random_bytes()), true),
    }
}

pub(crate) fn with_csrf_cookie(mut resp: Response<Body>, csrf: &str, is_new: bool) -> Response<Body> {
    if is_new && let Ok(v) = HeaderValue::from_str(&cookie::set_csrf(csrf)) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

pub(crate) fn query_param(call: &Call, name: &str) -> Option<String> {
    let q = call.ctx.front.target.query()?;
    form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

pub(crate) fn to_login(st: &State) -> Response<Body> {
    redirect(StatusCode::FOUND, &format!("{}/.poort/login", st.cfg.server.external_origin))
}

fn launcher(st: &State, call: &Call) -> Response<Body> {
    let s = call.session();
    let apps = st
        .cfg
        .apps
        .iter()
        .filter(|app| {
            // Apps that need a step-up are listed too: opening one asks for the factor.
            let who = Subject { identity: &s.identity, mfa: true };
            matches!(policy::evaluate(Resource::App(&app.name), &app.access, app.mfa, Some(who)), Decision::Allow(_))
        })
        .map(|app| AppLink {
            title: app.title.clone(),
            description: app.description.clone(),
            url: app.launch_url(&st.cfg.server),
        })
        .collect();
    let who = Subject { identity: &s.identity, mfa: true };
    let tunnels = st
        .cfg
        .tunnels
        .iter()
        .filter(|t| {
            matches!(policy::evaluate(Resource::Tunnel(&t.name), &t.access, t.mfa, Some(who)), Decision::Allow(_))
        })
        .map(|t| {
            let port: u32 = t.target.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
            TunnelLink {
                name: t.name.clone(),
                title: t.title.clone(),
                description: t.description.clone(),
                port: if port > 1024 { port } else { 10000 + port },
            }
        })
        .collect();
    let ssh = st
        .cfg
        .ssh_targets
        .iter()
        .filter(|t| {
            matches!(policy::evaluate(Resource::Ssh(&t.name), &t.access, t.mfa, Some(who)), Decision::Allow(_))
                && !t.principals_for(&s.identity).is_empty()
        })
        .map(|t| SshLink {
            name: t.name.clone(),
            title: t.title.clone(),
            description: t.description.clone(),
            command: st.cfg.ssh.listen.map_or_else(String::new, |a| {
                let port = if a.port() == 22 { String::new() } else { format!("-p {} ", a.port()) };
                format!("ssh {port}{}+{}@{}", s.identity.user, t.name, st.cfg.server.portal_host)
            }),
            shell: t.allow.shell,
        })
        .collect();
    let (csrf, new) = csrf_for_page(call.headers());
    let admin = s.identity.groups.contains(&st.mitigation.admin_group);
    let page = LauncherPage {
        user: &s.identity.user,
        csrf: &csrf,
        apps,
        tunnels,
        ssh,
        origin: &st.cfg.server.external_origin,
        admin,
    };
    with_csrf_cookie(html(StatusCode::OK, &page), &csrf, new)
}

fn login_form(st: &State, call: &Call) -> Response<Body> {
    let next = query_param(call, "next").unwrap_or_default();
    if call.ctx.session.is_some() {
        return go_to(st, safe_next(&next, &st.cfg));
    }
    let (csrf, new) = csrf_for_page(call.headers());
    let next = match safe_next(&next, &st.cfg) {
        Next::Portal => String::new(),
        _ => next,
    };
    let providers = st.oidc.buttons();
    let page = LoginPage { providers: &providers, csrf: &csrf, next: &next, username: "", error: None };
    with_csrf_cookie(html(StatusCode::OK, &page), &csrf, new)
}

pub(crate) fn login_again(
    st: &State,
    status: StatusCode,
    headers: &HeaderMap,
    next: &str,
    username: &str,
    error: &str,
) -> Response<Body> {
    let (csrf, new) = csrf_for_page(headers);
    let providers = st.oidc.buttons();
    // The form again, with only what the form itself would carry: a `next` that is a safe
    // place to go, a name that is a user name; never other bytes the request posted.
    let next = if safe_next(next, &st.cfg) == Next::Portal { "" } else { next };
    let username = if valid_user_name(username) { username } else { "" };
    let page = LoginPage { providers: &providers, csrf: &csrf, next, username, error: Some(error) };
    with_csrf_cookie(html(status, &page), &csrf, new)
}

async fn login_submit(st: &State, call: Call) -> Response<Body> {
    let (ctx, headers) = (&call.ctx, call.headers());
    let (username, pw, next) = (call.field("username").trim(), call.field("password"), call.field("next"));
    if st.mitigation.lockdown() && !lockdown_admin(st, username).await {
        // No password check and no session for anyone but administrators; the same page for
        // unknown users, so this tells nothing about accounts.
        let pw = pw.to_string();
        let _ = tokio::task::spawn_blocking(move || crate::identity::password::verify_dummy(&pw)).await;
        let ev = Event::LockedDown { user: None, path: "/.poort/login".into(), client: ctx.client };
        st.audit.note(ev).await;
        return crate::respond::maintenance_page(ctx.id);
    }
    // Same work and the same answer whether the user exists, is locked, or typed a wrong
    // password.
    let checked = signin::password_check(st, username, pw, ctx.client).await;
    let client = ctx.client;
    let shown_user = if valid_user_name(username) { username.to_string() } else { "(invalid name)".to_string() };
    let username = match checked {
        PasswordCheck::Right(name) => name,
        failed => {
            tracing::info!(client = %client, user = %shown_user, "Login failed");
            st.audit.note(Event::LoginFailed { user: shown_user, client }).await;
            let shown = if valid_user_name(username) { username } else { "" };
            if failed == PasswordCheck::DirectoryDown {
                let msg = "The user directory cannot be reached, so poort cannot check your password. Try again in a few minutes; if it persists, tell your IT helpdesk.";
                return login_again(st, StatusCode::SERVICE_UNAVAILABLE, headers, next, shown, msg);
            }
            return login_again(st, StatusCode::UNAUTHORIZED, headers, next, shown, "Wrong username or password.");
        }
    };
    let username = username.as_str();
    let user_agent = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let signed_in =
        SignedIn { user: username, factors: Factors::of(&[Factor::Pwd]), user_agent, next, logout_url: None };
    open_session(st, ctx, signed_in).await
}

/// Sends the browser on after a sign-in or a step-up. An app on its own host is reached
/// through that host: it starts a hand-off bound to the browser (`handoff_begin`).
pub(crate) fn go_to(st: &State, next: Next) -> Response<Body> {
    redirect(StatusCode::SEE_OTHER, &next_url(st, next))
}

/// The address `go_to` sends the browser to.
pub(crate) fn next_url(st: &State, next: Next) -> String {
    let origin = &st.cfg.server.external_origin;
    match next {
        Next::Relative(p) => format!("{origin}{p}"),
        Next::App { host, path } => format!("https://{host}{}{path}", crate::config::port_suffix(origin)),
        Next::Portal => format!("{origin}/"),
    }
}

/// The name of the nonce cookie an app host sets before it sends a browser to the portal for a
/// hand-off; the hand-off works only in the browser that holds it.
pub const HANDOFF_COOKIE: &str = "__Host-poort-handoff";

/// What an app host does for a browser without a session there: set a nonce cookie on the
/// app host and send the browser to the portal's hand-off (via sign-in or step-up if needed).
/// Returns the `Set-Cookie` value and the portal address to go to.
pub fn handoff_start(st: &State, host: &str, path: &str, step_up: bool) -> (String, String) {
    let nonce = cookie::encode_token(&crate::secret::random_bytes());
    let bind = crate::secret::b64(&session::hash_token(nonce.as_bytes()));
    let begin = format!(
        "/.poort/handoff/begin?{}",
        form_urlencoded::Serializer::new(String::new())
            .append_pair("host", host)
            .append_pair("path", path)
            .append_pair("bind", &bind)
            .finish()
    );
    let origin = &st.cfg.server.external_origin;
    let location = if step_up {
        let q = form_urlencoded::Serializer::new(String::new()).append_pair("next", &begin).finish();
        format!("{origin}/.poort/mfa?{q}")
    } else {
        format!("{origin}{begin}")
    };
    (handoff_cookie(&nonce, 300), location)
}

/// GET /.poort/signin?next=PATH[&step_up=1] on an app's host: where a proxy in front of an
/// app (forward-auth) sends a browser that must sign in. Starts the hand-off to the portal
/// for this host; `next` is a path on it.
fn sign_in_here(st: &State, call: &Call) -> Response<Body> {
    let next = query_param(call, "next").filter(|n| safe_relative(n)).unwrap_or_else(|| "/".into());
    let step_up = query_param(call, "step_up").as_deref() == Some("1");
    let (nonce, location) = handoff_start(st, &call.ctx.front.host, &next, step_up);
    let mut resp = redirect(StatusCode::FOUND, &location);
    if let Ok(v) = HeaderValue::from_str(&nonce) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

/// The `Set-Cookie` value of the hand-off nonce (`max_age` 0 removes it).
fn handoff_cookie(nonce: &str, max_age: u32) -> String {
    format!("{HANDOFF_COOKIE}={nonce}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={max_age}")
}

/// GET /.poort/handoff/begin on the portal (signed in): a one-time code for the app host,
/// bound to the nonce the browser holds there.
async fn handoff_begin(st: &State, call: &Call) -> Response<Body> {
    let s = call.session();
    let (host, path, bind) = (
        query_param(call, "host").unwrap_or_default(),
        query_param(call, "path").unwrap_or_default(),
        query_param(call, "bind").unwrap_or_default(),
    );
    let known = st.cfg.apps.iter().any(|a| a.route == Route::Host(host.clone()));
    let bind: Option<[u8; 32]> = cookie::decode_token(&bind);
    let (Some(bind), true, true) = (bind, known, safe_relative(&path)) else {
        return go_to(st, Next::Portal);
    };
    let code = cookie::encode_token(&crate::secret::random_bytes());
    let now = st.clock.now();
    let handoff = Handoff {
        session_id: s.id.clone(),
        user: s.identity.user.clone(),
        host: host.clone(),
        path,
        bind,
        expires: now + HANDOFF_SECS,
    };
    let c2 = code.clone();
    // In the store: the app host's request may reach another node.
    if !matches!(st.store.run(move |c| flows::put(c, flows::HANDOFF, &c2, &handoff, handoff.expires)).await, Ok(true)) {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, call.ctx.id);
    }
    redirect(
        StatusCode::SEE_OTHER,
        &format!(
            "https://{host}{}/.poort/handoff?code={code}",
            crate::config::port_suffix(&st.cfg.server.external_origin)
        ),
    )
}

/// GET /.poort/handoff?code= on an app host: the code must be this host's, unused, unexpired,
/// and asked for by this browser (its nonce cookie). Audited either way.
async fn handoff(st: &State, call: &Call) -> Response<Body> {
    let ctx = &call.ctx;
    let code = query_param(call, "code").unwrap_or_default();
    let now = st.clock.now();
    let c2 = code.clone();
    // Taken out whatever happens next: a code works once, on whichever node it reaches.
    let taken: Option<Handoff> = match st.store.run(move |c| flows::take(c, flows::HANDOFF, &c2, now)).await {
        Ok(t) => t,
        Err(_) => return error_page(StatusCode::SERVICE_UNAVAILABLE, call.ctx.id),
    };
    let cookies = call.headers().get_all(header::COOKIE).iter().map(|v| v.as_bytes());
    let nonce = cookie::find(cookies, HANDOFF_COOKIE).map(|n| session::hash_token(n.as_bytes()));
    let client = ctx.client;
    let why = match &taken {
        None => Some("unknown or used code"),
        Some(h) if h.host != ctx.front.host => Some("code for another host"),
        Some(h) if h.expires <= st.clock.now() => Some("expired code"),
        Some(h) if !nonce.is_some_and(|n| bool::from(subtle::ConstantTimeEq::ct_eq(&n[..], &h.bind[..]))) => {
            Some("code asked for by another browser")
        }
        Some(_) => None,
    };
    let mut resp = match (taken, why) {
        (Some(h), None) => {
            let token = session::new_token();
            let (hash, sid, host) = (token.hash, h.session_id.clone(), h.host.clone());
            let added = st.store.run(move |c| crate::store::Store::add_token(c, &sid, &hash, &host)).await;
            if !matches!(added, Ok(true)) {
                // The session ended meanwhile.
                return to_login(st);
            }
            let ev = Event::HandoffRedeemed {
                user: h.user.clone(),
                session: h.session_id.clone(),
                host: h.host.clone(),
                client,
            };
            if let Err(e) = st.audit.record(ev).await {
                tracing::error!(error = %e, "Audit unavailable; refusing the hand-off");
                return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
            }
            let mut resp = redirect(StatusCode::SEE_OTHER, &h.path);
            if let Ok(v) = HeaderValue::from_str(&cookie::set_session(&token.cookie_value)) {
                resp.headers_mut().append(header::SET_COOKIE, v);
            }
            resp
        }
        (_, why) => {
            let why = why.unwrap_or("refused");
            tracing::info!(client = %client, host = %ctx.front.host, why, "Hand-off refused");
            let ev = Event::HandoffRefused { host: ctx.front.host.clone(), why: why.into(), client };
            st.audit.refusal("handoff_refused", why, ctx.client, &ctx.front.host, ev);
            error_page(StatusCode::FORBIDDEN, ctx.id)
        }
    };
    resp.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_str(&handoff_cookie("", 0)).expect("invariant: constant cookie is valid"),
    );
    resp
}

fn clear_session_cookie(resp: &mut Response<Body>) {
    resp.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie::clear_session()).expect("invariant: constant cookie is valid"),
    );
}

/// POST /.poort/logout; with `approved=end`, the command-line sessions this browser
/// approved end too.
async fn logout(st: &State, call: Call) -> Response<Body> {
    let ctx = &call.ctx;
    let mut provider_logout = None;
    if let Some(s) = &ctx.session {
        // Read before the session row goes: a single sign-on session also ends at the provider.
        provider_logout = sso::logout_url(st, &s.id).await;
        if call.field("approved") == "end" {
            let (store, id, now) = (st.store.clone(), s.id.clone(), st.clock.now());
            let ended = tokio::task::spawn_blocking(move || store.revoke_children(&id, now)).await;
            for child in ended.ok().and_then(Result::ok).unwrap_or_default() {
                let ev =
                    Event::SessionEnded { user: s.identity.user.clone(), session: child, by: s.identity.user.clone() };
                st.audit.note(ev).await;
            }
        }
        let _ = st.sessions.end(&s.id).await;
        let ev = Event::Logout { user: s.identity.user.clone(), session: s.id.clone(), client: ctx.client };
        st.audit.note(ev).await;
    }
    let mut resp = match provider_logout {
        Some(url) => redirect(StatusCode::SEE_OTHER, &url),
        None => to_login(st),
    };
    *resp.status_mut() = StatusCode::SEE_OTHER;
    clear_session_cookie(&mut resp);
    resp
}

async fn sessions_page(st: &State, call: &Call) -> Response<Body> {
    let s = call.session();
    let store = st.store.clone();
    let user = s.identity.user.clone();
    let found = tokio::task::spawn_blocking(move || {
        let rows = store.list_sessions(Some(&user))?;
        let changes = store.with(|c| crate::store::Store::factor_changes(c, &user, 20))?;
        anyhow::Ok((rows, changes))
    })
    .await;
    let Ok(Ok((rows, changes))) = found else { return error_page(StatusCode::SERVICE_UNAVAILABLE, call.ctx.id) };
    let approved_here = rows.iter().filter(|r| r.parent.as_deref() == Some(&s.id)).count();
    let sessions = rows
        .into_iter()
        .map(|r| SessionLine {
            current: r.id == s.id,
            approved_here: r.parent.as_deref() == Some(&s.id),
            created: format_minutes(r.created_at),
            last_seen: format_minutes(if r.id == s.id { s.last_seen() } else { r.last_seen }),
            client_addr: r.client_addr,
            browser: browser_of(&r.user_agent),
            id: r.id,
        })
        .collect();
    let changes = changes
        .into_iter()
        .map(|c| ChangeLine {
            at: format_minutes(c.at),
            change: c.change,
            client: c.client,
            password_only: c.proof == crate::identity::mfa::PROOF_PASSWORD_ONLY,
        })
        .collect();
    let (csrf, new) = csrf_for_page(call.headers());
    let page = SessionsPage { user: &s.identity.user, csrf: &csrf, sessions, changes, approved_here };
    with_csrf_cookie(html(StatusCode::OK, &page), &csrf, new)
}

async fn end_session(st: &State, call: Call) -> Response<Body> {
    let (ctx, s) = (&call.ctx, call.session());
    let id = call.field("id").to_string();
    let (store, user) = (st.store.clone(), s.identity.user.clone());
    let owned = tokio::task::spawn_blocking(move || store.list_sessions(Some(&user)))
        .await
        .ok()
        .and_then(Result::ok)
        .is_some_and(|rows| rows.iter().any(|r| r.id == id));
    if !owned {
        return error_page(StatusCode::NOT_FOUND, ctx.id);
    }
    let _ = st.sessions.end(&id).await;
    let ev = Event::SessionEnded { user: s.identity.user.clone(), session: id.clone(), by: s.identity.user.clone() };
    st.audit.note(ev).await;
    if id == s.id {
        let mut resp = to_login(st);
        *resp.status_mut() = StatusCode::SEE_OTHER;
        clear_session_cookie(&mut resp);
        return resp;
    }
    redirect(StatusCode::SEE_OTHER, &format!("{}/.poort/sessions", st.cfg.server.external_origin))
}

/// Browser and system from a User-Agent, as a person names them ("Firefox on Windows"); the
/// command line's own name for its sessions; else "unknown". The first match in each table
/// wins: Edge and Opera also say Chrome, Chrome also says Safari, Android also says Linux.
pub(crate) fn browser_of(ua: &str) -> String {
    const BROWSERS: [(&str, &str); 7] = [
        ("Edg/", "Edge"),
        ("OPR/", "Opera"),
        ("Firefox/", "Firefox"),
        ("Chrome/", "Chrome"),
        ("Chromium/", "Chrome"),
        ("Safari/", "Safari"),
        ("curl/", "curl"),
    ];
    const SYSTEMS: [(&str, &str); 7] = [
        ("Windows", "Windows"),
        ("Android", "Android"),
        ("iPhone", "iOS"),
        ("iPad", "iOS"),
        ("Macintosh", "macOS"),
        ("CrOS", "ChromeOS"),
        ("Linux", "Linux"),
    ];
    if ua.starts_with("poort/") {
        return "poort command line".into();
    }
    let first =
        |table: &[(&str, &'static str)]| table.iter().find(|(mark, _)| ua.contains(mark)).map(|(_, name)| *name);
    match (first(&BROWSERS), first(&SYSTEMS)) {
        (None, None) => "unknown".into(),
        (Some(b), None) => b.into(),
        (None, Some(o)) => format!("a browser on {o}"),
        (Some(b), Some(o)) => format!("{b} on {o}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browsers_are_named_as_people_name_them() {
        let cases = [
            ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:132.0) Gecko/20100101 Firefox/132.0", "Firefox on Windows"),
            (
                "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Safari/605.1.15",
                "Safari on macOS",
            ),
            (
                "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
                "Safari on iOS",
            ),
            (
                "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
                "Chrome on Linux",
            ),
            (
                "Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
                "Chrome on Android",
            ),
            (
                "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
                "Edge on Windows",
            ),
            ("curl/8.5.0", "curl"),
            ("", "unknown"),
        ];
        for (ua, want) in cases {
            assert_eq!(browser_of(ua), want, "{ua}");
        }
    }

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
