//! Every route the gateway itself answers, in one table, and the one dispatcher that applies
//! each row's guard before its handler runs: who may call it (anyone, the command line, a
//! signed-in browser, or one that proved who it is within five minutes), how its body is read
//! and checked (form or JSON with the Origin and double-submit CSRF checks), its rate class,
//! whether it stays open during a lockdown, and whether it must be a person's own action in the
//! portal (fetch metadata). A handler is never reached by a caller its row does not allow, so
//! no handler repeats these checks. docs/architecture.md lists the rows open before login; a
//! test holds the two together.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use subtle::ConstantTimeEq;

use crate::body::{Body, RequestBody};
use crate::respond::{error_page, json_error, page, redirect};
use crate::session::{Kind, Session, cookie};
use crate::state::{Ctx, State};

/// Where a route answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    Portal,
    /// A host-routed app's own host (the hand-off).
    AppHost,
    Any,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Anyone, signed in or not.
    Anyone,
    /// The command line: it sends `X-Poort-Client: cli`, and a browser's request, which
    /// always carries `Origin` or `Sec-Fetch-Site`, is refused.
    Cli,
    /// The command line with its own session.
    CliSession,
    /// A signed-in browser session.
    Session,
    /// A browser session whose user proved who they are within `session::FRESH_FOR`: with a
    /// second factor if they have one, else a password or a provider sign-in.
    Fresh,
    /// The admin console (`portal::admin`): a browser session of a member of `[mitigate]
    /// admin_group` (as the store has it now, not as the session began) that was opened or
    /// stepped up with a second factor. A page must be the person's own navigation from the
    /// portal or the address bar (`admin::navigated`), never a script's or a frame's request;
    /// an action (a post) is also the person's own action (`own_action`) after a fresh second
    /// factor.
    Admin,
}

/// How a route's request body is read before its handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// No body is read (GET, or a body the handler does not use).
    None,
    /// A urlencoded form from a portal page: Origin and the CSRF field are checked.
    Form,
    /// JSON from the portal's script: Origin and the CSRF header are checked.
    Json,
    /// JSON from the command line, which has no CSRF cookie (the `Cli` guard stands in).
    CliJson,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// GET and HEAD.
    Get,
    Post,
}

/// Per-address rate classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    None,
    /// Shares the sign-in limit (`[login] per_address_per_minute`): every attempt at a
    /// password, a factor, a passkey, a provider sign-in or a command-line code.
    SignIn,
}

/// What a route does: the handler the dispatcher calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Style,
    Script,
    Health,
    Jwks,
    Launcher,
    LoginForm,
    LoginSubmit,
    Logout,
    Sessions,
    EndSession,
    Handoff,
    HandoffBegin,
    MfaForm,
    MfaSubmit,
    ConfirmForm,
    ConfirmSubmit,
    Security,
    TotpBegin,
    TotpConfirm,
    TotpRemove,
    RecoveryCodes,
    PasskeyRemove,
    SshKeyAdd,
    SshKeyRemove,
    PasskeyRegisterStart,
    PasskeyRegisterFinish,
    FactorStart,
    FactorFinish,
    PasswordlessStart,
    PasswordlessFinish,
    DeviceCode,
    DeviceToken,
    DeviceLogout,
    DeviceForm,
    DeviceDecide,
    Tunnel,
    ForwardAuth,
    SignInHere,
    Oidc,
    AdminHome,
    AdminUsers,
    AdminUser,
    AdminUserAct,
    AdminSessions,
    AdminSessionsAct,
    AdminAudit,
    AdminAuditExport,
    AdminMitigation,
    AdminMitigationAct,
    AdminAccess,
    AdminReport,
    AdminRecordings,
    AdminRecording,
    TerminalScript,
    XtermScript,
    XtermStyle,
    Terminal,
}

#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub on: On,
    pub path: &'static str,
    /// `path` is a prefix and the rest of the request path is the handler's to read.
    pub prefix: bool,
    pub verb: Verb,
    pub guard: Guard,
    pub input: Input,
    pub rate: Rate,
    /// Stays open to everyone during a lockdown (so that an administrator can sign in).
    pub lockdown: bool,
    /// Must be a person's own action in the portal: a top-level navigation they started on a
    /// portal page (`Sec-Fetch-Site: same-origin`, `Sec-Fetch-Mode: navigate`,
    /// `Sec-Fetch-Dest: document`, `Sec-Fetch-User: ?1`), never a script's request or a form
    /// posted into a frame. Only form rows can be: a JSON request is a script's.
    pub own_action: bool,
    pub page: Page,
}

const fn row(on: On, path: &'static str, verb: Verb, guard: Guard, input: Input, page: Page) -> Route {
    Route { on, path, prefix: false, verb, guard, input, rate: Rate::None, lockdown: false, own_action: false, page }
}

impl Route {
    const fn open_in_lockdown(mut self) -> Route {
        self.lockdown = true;
        self
    }

    const fn limited(mut self) -> Route {
        self.rate = Rate::SignIn;
        self
    }

    const fn own_action(mut self) -> Route {
        self.own_action = true;
        self
    }

    const fn prefix(mut self) -> Route {
        self.prefix = true;
        self
    }
}

use Guard::*;
use Input::{CliJson, Form, Json, None as NoBody};
use On::{Any, AppHost, Portal};
use Verb::{Get, Post};

/// The table. Paths are exact matches on the canonical path unless the row is a prefix.
pub const ROUTES: &[Route] = &[
    row(Any, "/.poort/style.css", Get, Anyone, NoBody, Page::Style).open_in_lockdown(),
    row(Any, "/.poort/health", Get, Anyone, NoBody, Page::Health).open_in_lockdown(),
    row(Portal, "/.poort/webauthn.js", Get, Anyone, NoBody, Page::Script).open_in_lockdown(),
    row(Portal, "/.poort/jwks.json", Get, Anyone, NoBody, Page::Jwks).open_in_lockdown(),
    row(Portal, "/.poort/login", Get, Anyone, NoBody, Page::LoginForm).open_in_lockdown(),
    row(Portal, "/.poort/login", Post, Anyone, Form, Page::LoginSubmit).open_in_lockdown().limited(),
    row(Portal, "/.poort/logout", Post, Anyone, Form, Page::Logout).open_in_lockdown(),
    row(Portal, "/.poort/login/passkey/start", Post, Anyone, Json, Page::PasswordlessStart).limited(),
    row(Portal, "/.poort/login/passkey/finish", Post, Anyone, Json, Page::PasswordlessFinish).limited(),
    row(Portal, "/.poort/oidc/", Get, Anyone, NoBody, Page::Oidc).prefix().limited(),
    row(AppHost, "/.poort/handoff", Get, Anyone, NoBody, Page::Handoff).limited(),
    row(Portal, "/.poort/device/code", Post, Cli, NoBody, Page::DeviceCode).limited(),
    row(Portal, "/.poort/device/token", Post, Cli, CliJson, Page::DeviceToken),
    row(Portal, "/.poort/device/logout", Post, Cli, NoBody, Page::DeviceLogout),
    // Routed by the gateway (route::Found::Tunnel), admitted by this row.
    row(Portal, crate::route::TUNNELS, Get, CliSession, NoBody, Page::Tunnel).prefix(),
    // Routed by the gateway (route::Found::Terminal) to the SSH front door, admitted by this
    // row: the page of an SSH session in the browser, and its WebSocket. The page must be the
    // person's own navigation, and the WebSocket carries a ticket only that page holds
    // (`sshd::terminal`).
    row(Portal, crate::route::TERMINALS, Get, Session, NoBody, Page::Terminal).prefix(),
    // The terminal's scripts and styles, for signed-in pages only.
    row(Portal, "/.poort/terminal.js", Get, Session, NoBody, Page::TerminalScript),
    row(Portal, "/.poort/xterm.js", Get, Session, NoBody, Page::XtermScript),
    row(Portal, "/.poort/xterm.css", Get, Session, NoBody, Page::XtermStyle),
    // Routed by the gateway (route::Found::ForwardAuth), admitted by this row: what a proxy
    // in front of an app asks for each request. Its caller must be a trusted proxy.
    row(Any, crate::route::FORWARD_AUTH, Get, Anyone, NoBody, Page::ForwardAuth),
    // Where a proxy in front of an app sends a browser that needs to sign in: starts the
    // hand-off to the portal, as any navigation to an app host poort serves itself does.
    row(AppHost, "/.poort/signin", Get, Anyone, NoBody, Page::SignInHere),
    row(Portal, "/", Get, Session, NoBody, Page::Launcher),
    row(Portal, "/.poort/handoff/begin", Get, Session, NoBody, Page::HandoffBegin),
    row(Portal, "/.poort/sessions", Get, Session, NoBody, Page::Sessions),
    // Ending a session (any of the user's, on any device) is the person's own click too.
    row(Portal, "/.poort/sessions/end", Post, Session, Form, Page::EndSession).own_action(),
    row(Portal, "/.poort/mfa", Get, Session, NoBody, Page::MfaForm),
    row(Portal, "/.poort/mfa", Post, Session, Form, Page::MfaSubmit).limited(),
    row(Portal, "/.poort/mfa/passkey/start", Post, Session, Json, Page::FactorStart),
    row(Portal, "/.poort/mfa/passkey/finish", Post, Session, Json, Page::FactorFinish).limited(),
    row(Portal, "/.poort/confirm", Get, Session, NoBody, Page::ConfirmForm),
    row(Portal, "/.poort/confirm", Post, Session, Form, Page::ConfirmSubmit).limited(),
    row(Portal, "/.poort/security", Get, Session, NoBody, Page::Security),
    row(Portal, "/.poort/security/totp", Post, Fresh, Form, Page::TotpBegin).own_action(),
    // Confirms the secret a fresh session began, with a code from it.
    row(Portal, "/.poort/security/totp/confirm", Post, Fresh, Form, Page::TotpConfirm).own_action().limited(),
    row(Portal, "/.poort/security/totp/remove", Post, Fresh, Form, Page::TotpRemove).own_action(),
    row(Portal, "/.poort/security/recovery", Post, Fresh, Form, Page::RecoveryCodes).own_action(),
    row(Portal, "/.poort/security/passkey/remove", Post, Fresh, Form, Page::PasskeyRemove).own_action(),
    row(Portal, "/.poort/security/ssh/add", Post, Fresh, Form, Page::SshKeyAdd).own_action(),
    row(Portal, "/.poort/security/ssh/remove", Post, Fresh, Form, Page::SshKeyRemove).own_action(),
    // A form post (the person's own navigation) that answers with a page carrying the
    // registration: a script's request gets nothing to register.
    row(Portal, "/.poort/security/passkey/start", Post, Fresh, Form, Page::PasskeyRegisterStart).own_action(),
    // Finishes the ceremony a fresh session started, bound to that session.
    row(Portal, "/.poort/security/passkey/finish", Post, Session, Json, Page::PasskeyRegisterFinish),
    row(Portal, "/.poort/device", Get, Session, NoBody, Page::DeviceForm),
    // Approving also needs a factor proved for this very code (portal::device).
    row(Portal, "/.poort/device", Post, Session, Form, Page::DeviceDecide).own_action(),
    // The admin console: every row is `Admin`, every post also a person's own action.
    row(Portal, "/.poort/admin", Get, Admin, NoBody, Page::AdminHome),
    row(Portal, "/.poort/admin/users", Get, Admin, NoBody, Page::AdminUsers),
    row(Portal, "/.poort/admin/users", Post, Admin, Form, Page::AdminUserAct).own_action(),
    row(Portal, "/.poort/admin/user", Get, Admin, NoBody, Page::AdminUser),
    row(Portal, "/.poort/admin/sessions", Get, Admin, NoBody, Page::AdminSessions),
    row(Portal, "/.poort/admin/sessions", Post, Admin, Form, Page::AdminSessionsAct).own_action(),
    row(Portal, "/.poort/admin/audit", Get, Admin, NoBody, Page::AdminAudit),
    row(Portal, "/.poort/admin/audit/export", Get, Admin, NoBody, Page::AdminAuditExport),
    row(Portal, "/.poort/admin/mitigation", Get, Admin, NoBody, Page::AdminMitigation),
    row(Portal, "/.poort/admin/mitigation", Post, Admin, Form, Page::AdminMitigationAct).own_action(),
    row(Portal, "/.poort/admin/access", Get, Admin, NoBody, Page::AdminAccess),
    row(Portal, "/.poort/admin/report", Get, Admin, NoBody, Page::AdminReport),
    row(Portal, "/.poort/admin/recordings", Get, Admin, NoBody, Page::AdminRecordings),
    row(Portal, "/.poort/admin/recording", Get, Admin, NoBody, Page::AdminRecording),
];

impl Route {
    fn answers(&self, on_portal_host: bool, path: &str) -> bool {
        let host_ok = match self.on {
            Any => true,
            Portal => on_portal_host,
            AppHost => !on_portal_host,
        };
        host_ok
            && if self.prefix {
                path.strip_prefix(self.path).is_some_and(|rest| !rest.is_empty())
            } else {
                path == self.path
            }
    }
}

/// Whether a path stays open to everyone during a lockdown.
pub fn open_in_lockdown(on_portal_host: bool, path: &str) -> bool {
    ROUTES.iter().any(|r| r.lockdown && r.answers(on_portal_host, path))
}

/// What the dispatcher hands a handler: the request's facts and head, and its body as the
/// row said to read it.
pub struct Call {
    pub ctx: Ctx,
    pub head: http::request::Parts,
    /// The form fields (`Input::Form`); empty otherwise.
    pub form: HashMap<String, String>,
    /// The JSON body (`Input::Json`, `Input::CliJson`); empty otherwise.
    pub json: Bytes,
    /// The unread body (`Input::None`).
    pub body: Option<RequestBody>,
    /// The rest of the path after a prefix row's path.
    pub rest: String,
}

impl Call {
    /// A form field, or "".
    pub fn field(&self, name: &str) -> &str {
        self.form.get(name).map_or("", String::as_str)
    }

    /// The session the row's guard required.
    pub fn session(&self) -> &Arc<Session> {
        self.ctx.session.as_ref().expect("invariant: the route's guard requires a session")
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.head.headers
    }

    /// The request again, for a handler that needs it whole (a WebSocket upgrade).
    pub fn into_request(self) -> Request<RequestBody> {
        Request::from_parts(self.head, self.body.expect("invariant: a route without input keeps its body"))
    }
}

/// Largest form, and largest JSON body, the portal reads.
const MAX_FORM: usize = 16 * 1024;
const MAX_JSON: usize = 64 * 1024;

/// Answers one request for a gateway route: finds its row, admits the request by the row's
/// rules, then calls its handler.
pub async fn dispatch(st: &State, ctx: Ctx, on_portal_host: bool, req: Request<RequestBody>) -> Response<Body> {
    let path = ctx.front.target.path();
    let verb = verb_of(req.method());
    let found = {
        let mut rows = ROUTES.iter().filter(|r| r.answers(on_portal_host, path)).peekable();
        rows.peek().is_some().then(|| rows.find(|r| Some(r.verb) == verb).copied())
    };
    let route = match found {
        None => return error_page(StatusCode::NOT_FOUND, ctx.id),
        Some(None) => return error_page(StatusCode::METHOD_NOT_ALLOWED, ctx.id),
        Some(Some(r)) => r,
    };
    match admit(st, ctx, &route, req).await {
        Ok(call) => Box::pin(super::serve(st, route.page, call)).await,
        Err(refused) => refused,
    }
}

fn verb_of(method: &Method) -> Option<Verb> {
    match *method {
        Method::GET | Method::HEAD => Some(Get),
        Method::POST => Some(Post),
        _ => None,
    }
}

/// The row of a page the gateway routes to a handler outside the portal (a tunnel).
pub fn row_of(page: Page) -> &'static Route {
    ROUTES.iter().find(|r| r.page == page).expect("invariant: every page has a row")
}

/// Admits a request to `route` by the row's rules: the session kind it takes, its guard, its
/// rate class, the own-action check, and its body read and checked as the row says. Every
/// request a route table row answers passes here before its handler sees it.
pub async fn admit(st: &State, mut ctx: Ctx, route: &Route, req: Request<RequestBody>) -> Result<Call, Response<Body>> {
    if verb_of(req.method()) != Some(route.verb) {
        return Err(error_page(StatusCode::METHOD_NOT_ALLOWED, ctx.id));
    }
    let path = ctx.front.target.path();
    let rest = if route.prefix { path[route.path.len()..].to_string() } else { String::new() };

    // A session counts only where it belongs: command-line sessions on command-line routes,
    // browser sessions everywhere else.
    let wants = if matches!(route.guard, Cli | CliSession) { Kind::Cli } else { Kind::Browser };
    if ctx.session.as_ref().is_some_and(|s| s.kind != wants) {
        ctx.session = None;
    }
    let (head, body) = req.into_parts();
    if let Some(refused) = guard(st, &ctx, route, &head).await {
        return Err(refused);
    }
    let allowed =
        if route.rate == Rate::SignIn { super::signin::attempt_allowed(st, ctx.client).await } else { Some(true) };
    if allowed.is_none() {
        // The store (which counts attempts for every node) did not answer: no sign-in now.
        return Err(match route.input {
            Json | CliJson | NoBody if route.page != Page::Oidc => {
                json_error(StatusCode::SERVICE_UNAVAILABLE, "sign-in is unavailable right now; try again shortly")
            }
            _ => error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id),
        });
    }
    if allowed == Some(false) {
        return Err(match route.input {
            Json | CliJson | NoBody if route.page != Page::Oidc => {
                json_error(StatusCode::TOO_MANY_REQUESTS, "too many attempts from your address; wait a minute")
            }
            _ => error_page(StatusCode::TOO_MANY_REQUESTS, ctx.id),
        });
    }
    if route.own_action && !own_action(st, &head.headers) {
        tracing::warn!(request = %ctx.id, client = %ctx.client, path, "Refused: not a person's own action in the portal");
        return Err(error_page(StatusCode::FORBIDDEN, ctx.id));
    }
    let mut call = Call { ctx, head, form: HashMap::new(), json: Bytes::new(), body: None, rest };
    match route.input {
        NoBody => call.body = Some(body),
        Form => match read_form(&call.head.headers, body).await {
            Some(form) if genuine(st, &call.head.headers, form.get("csrf").map(String::as_bytes)) => call.form = form,
            Some(form) if route.page == Page::LoginSubmit => {
                let next = form.get("next").cloned().unwrap_or_default();
                // A browser always says where a form post comes from (Origin); a script usually
                // not, or names another address than the one users type.
                let from_here = call
                    .head
                    .headers
                    .get(header::ORIGIN)
                    .is_some_and(|o| o.as_bytes() == st.cfg.server.external_origin.as_bytes());
                let why = if from_here {
                    "The sign-in form expired. Please try again."
                } else {
                    "This sign-in did not come from the sign-in page (its Origin header must be the gateway's own address). Use the form below."
                };
                return Err(super::login_again(st, StatusCode::FORBIDDEN, &call.head.headers, &next, "", why));
            }
            Some(_) => return Err(error_page(StatusCode::FORBIDDEN, call.ctx.id)),
            None => return Err(error_page(StatusCode::BAD_REQUEST, call.ctx.id)),
        },
        Json | CliJson => {
            let h = &call.head.headers;
            let from_page = route.input == CliJson
                || (h.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
                    && genuine(st, h, h.get("x-poort-csrf").map(|v| v.as_bytes())));
            if !from_page {
                return Err(json_error(StatusCode::FORBIDDEN, "the request did not come from a poort page"));
            }
            match Limited::new(body, MAX_JSON).collect().await {
                Ok(b) => call.json = b.to_bytes(),
                Err(_) => return Err(json_error(StatusCode::PAYLOAD_TOO_LARGE, "too large")),
            }
        }
    }
    Ok(call)
}

/// The guard of `route` for this request: None to go on, or the answer.
async fn guard(st: &State, ctx: &Ctx, route: &Route, head: &http::request::Parts) -> Option<Response<Body>> {
    let h = &head.headers;
    match route.guard {
        Anyone => None,
        Cli | CliSession => {
            let marked = h.get("x-poort-client").is_some_and(|v| v.as_bytes() == b"cli");
            if !marked || h.contains_key(header::ORIGIN) || h.contains_key("sec-fetch-site") {
                return Some(json_error(StatusCode::BAD_REQUEST, "invalid_request"));
            }
            (route.guard == CliSession && ctx.session.is_none())
                .then(|| json_error(StatusCode::UNAUTHORIZED, "not signed in, or the session ended: run poort login"))
        }
        Session | Fresh | Admin => {
            let Some(s) = &ctx.session else {
                return Some(match (route.input, route.verb) {
                    (Json, _) => json_error(StatusCode::UNAUTHORIZED, "sign in first"),
                    (_, Get) => {
                        let here = ctx.front.target.forward_form(ctx.front.target.path());
                        let q = form_urlencoded::Serializer::new(String::new()).append_pair("next", &here).finish();
                        redirect(StatusCode::FOUND, &format!("{}/.poort/login?{q}", st.cfg.server.external_origin))
                    }
                    _ => redirect(StatusCode::SEE_OTHER, &format!("{}/.poort/login", st.cfg.server.external_origin)),
                });
            };
            if route.guard == Admin {
                return super::admin::admit(st, ctx, s, route, h).await;
            }
            if route.guard == Fresh && !fresh(st, s).await {
                let confirm = format!("{}/.poort/confirm?next=%2F.poort%2Fsecurity", st.cfg.server.external_origin);
                return Some(match route.input {
                    Json => page(
                        StatusCode::FORBIDDEN,
                        "application/json",
                        Body::from(
                            serde_json::json!({ "error": "confirm it is you first", "confirm": confirm }).to_string(),
                        ),
                    ),
                    _ => redirect(StatusCode::SEE_OTHER, &confirm),
                });
            }
            None
        }
    }
}

/// Whether session `s` has a fresh proof of its user (see `Guard::Fresh`).
pub async fn fresh(st: &State, s: &Session) -> bool {
    let name = s.identity.user.clone();
    // A store that cannot be read fails closed: as if the user had a factor to prove.
    let has_factor = !matches!(st.store.run(move |c| crate::identity::mfa::factors(c, &name)).await, Ok(f) if !f.any());
    s.fresh(st.clock.now(), has_factor)
}

/// A person's own action on a portal page (see `Route::own_action`): a top-level navigation
/// the user activated (fetch metadata: a script's `fetch`, a form it submits without a click,
/// or a form posted into a frame, never carries all four), sent from a portal page (`Referer` under `/.poort/`; the portal's
/// pages send it, and an app's page, which shares the origin when the app is routed by path,
/// cannot send a portal page's address).
fn own_action(st: &State, h: &HeaderMap) -> bool {
    let is = |name: &str, want: &[u8]| h.get(name).is_some_and(|v| v.as_bytes() == want);
    let portal = format!("{}/.poort/", st.cfg.server.external_origin);
    let from_portal = h.get(header::REFERER).is_some_and(|r| r.as_bytes().starts_with(portal.as_bytes()));
    is("sec-fetch-site", b"same-origin")
        && is("sec-fetch-mode", b"navigate")
        && is("sec-fetch-dest", b"document")
        && is("sec-fetch-user", b"?1")
        && from_portal
}

/// A request from a portal page: the Origin is the portal's and `sent` (the form field or
/// header) matches the `__Host-` CSRF cookie (double submit).
fn genuine(st: &State, h: &HeaderMap, sent: Option<&[u8]>) -> bool {
    let origin_ok = h.get(header::ORIGIN).is_some_and(|o| o.as_bytes() == st.cfg.server.external_origin.as_bytes());
    let cookies = h.get_all(header::COOKIE).iter().map(|v| v.as_bytes());
    let cookie_value = cookie::find(cookies, cookie::CSRF_COOKIE).filter(|v| cookie::decode_token(v).is_some());
    let token_ok = cookie_value.is_some_and(|c| bool::from(c.as_bytes().ct_eq(sent.unwrap_or_default())));
    origin_ok && token_ok
}

/// Reads a bounded urlencoded form body; None if it is not one, or names a field twice.
async fn read_form(h: &HeaderMap, body: RequestBody) -> Option<HashMap<String, String>> {
    let ct = h.get(header::CONTENT_TYPE)?.as_bytes();
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
    Some(form)
}

/// A page the person opened themselves: a top-level navigation (fetch metadata) they
/// activated, from the address bar or a bookmark (`none`), or from a portal page. A script's
/// `fetch`, a frame, or a window an app's page opened on the portal's origin (when apps are
/// routed by path they share it) sends something else, and reads no admin page.
pub fn navigated(st: &State, h: &HeaderMap) -> bool {
    let is = |name: &str, want: &[u8]| h.get(name).is_some_and(|v| v.as_bytes() == want);
    let portal = format!("{}/.poort/", st.cfg.server.external_origin);
    let launcher = format!("{}/", st.cfg.server.external_origin);
    let from_portal = h.get(header::REFERER).is_some_and(|r| {
        let r = r.as_bytes();
        r.starts_with(portal.as_bytes()) || r == launcher.as_bytes()
    });
    is("sec-fetch-mode", b"navigate")
        && is("sec-fetch-dest", b"document")
        && is("sec-fetch-user", b"?1")
        && (is("sec-fetch-site", b"none") || (is("sec-fetch-site", b"same-origin") && from_portal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_path_and_verb_has_one_row() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                let same = a.path == b.path && a.verb == b.verb && a.prefix == b.prefix;
                assert!(!same || (a.on != b.on && a.on != Any && b.on != Any), "{} twice", a.path);
            }
        }
    }

    #[test]
    fn changing_factors_needs_a_fresh_proof_and_an_own_action() {
        use Page::*;
        for r in ROUTES {
            if r.own_action {
                assert_eq!((r.page, r.input), (r.page, Form), "a person's own action is a form post");
            }
            let changes = matches!(
                r.page,
                TotpBegin
                    | TotpRemove
                    | RecoveryCodes
                    | PasskeyRemove
                    | PasskeyRegisterStart
                    | SshKeyAdd
                    | SshKeyRemove
            );
            if changes {
                assert_eq!((r.page, r.guard), (r.page, Fresh));
                assert!(r.own_action, "{:?}", r.page);
            }
            if matches!(r.page, DeviceDecide) {
                assert!(r.own_action && r.guard == Session);
            }
            if matches!(r.page, Tunnel) {
                assert_eq!(r.guard, CliSession);
            }
            if matches!(r.page, DeviceCode | DeviceToken | DeviceLogout) {
                assert_eq!(r.guard, Cli);
            }
            if r.guard == Admin && r.verb == Post {
                assert!(r.own_action && r.input == Form, "{:?}: an admin action is a person's own form post", r.page);
            }
            if r.path.starts_with("/.poort/admin") {
                assert_eq!((r.page, r.guard), (r.page, Admin), "every admin console row is guarded as one");
            }
            if r.verb == Post && matches!(r.guard, Session | Fresh | Admin) {
                assert!(matches!(r.input, Form | Json), "{:?}: a signed-in post without CSRF", r.page);
            }
        }
    }

    /// docs/architecture.md lists exactly the routes that answer before login.
    #[test]
    fn the_documented_pre_login_routes_are_the_table() {
        let doc = include_str!("../../docs/architecture.md");
        let section = doc
            .split("<!-- pre-login routes: begin -->")
            .nth(1)
            .and_then(|s| s.split("<!-- pre-login routes: end -->").next())
            .expect("docs/architecture.md has the pre-login route list");
        let mut documented: Vec<String> = section
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .map(str::to_string)
            .collect();
        documented.sort();
        let mut table: Vec<String> = ROUTES
            .iter()
            .filter(|r| matches!(r.guard, Anyone | Cli))
            .map(|r| {
                let verb = if r.verb == Get { "GET" } else { "POST" };
                format!("{verb} {}{}", r.path, if r.prefix { "*" } else { "" })
            })
            .collect();
        table.sort();
        table.dedup();
        assert_eq!(documented, table);
    }
}
