//! The admin console at `/.poort/admin`: users, sessions across the deployment, the audit
//! log, mitigation and lockdown, and who may use which app, for members of `[mitigate]
//! admin_group`. The route table's `Admin` guard (`admit` here) decides who reaches a page;
//! every change is recorded in the audit log before it is made, with the administrator, the
//! session and the address, as the command line records its own.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use askama::Template;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use super::routes::{Call, Route, Verb};
use super::{csrf_for_page, query_param, with_csrf_cookie};
use crate::audit::{self, Event, Record};
use crate::body::Body;
use crate::clock::format_minutes;
use crate::names::valid_user_name;
use crate::policy::{self, Decision, Resource, Subject};
use crate::respond::{error_page, html, page, redirect};
use crate::session::Session;
use crate::state::{Ctx, State};
use crate::store::Store;

/// The guard of an `Admin` row, after the dispatcher found a browser session: None to go on.
pub(super) async fn admit(st: &State, ctx: &Ctx, s: &Session, route: &Route, h: &HeaderMap) -> Option<Response<Body>> {
    if !is_admin(st, s).await {
        tracing::warn!(request = %ctx.id, client = %ctx.client, user = %s.identity.user, "Refused: the admin console is for the admin group");
        refused(st, ctx, s, "not in the admin group");
        return Some(error_page(StatusCode::FORBIDDEN, ctx.id));
    }
    if route.verb == Verb::Get && !super::routes::navigated(st, h) {
        tracing::warn!(request = %ctx.id, client = %ctx.client, "Refused: an admin page not opened by the person");
        refused(st, ctx, s, "a page not opened by the person");
        // The administrator is allowed in, just not this way: say how.
        let message = "Admin pages open only from the portal: follow a link on a portal page, or type the address. Links from other sites, e-mail or chat are refused, so that nothing but you can open them.";
        let body = crate::respond::render_error(403, "Open the console from the portal", message, &ctx.id.to_string());
        return Some(page(StatusCode::FORBIDDEN, "text/html; charset=utf-8", Body::from(body)));
    }
    let origin = &st.cfg.server.external_origin;
    // Back to the console page the person was on (a post's Referer), else the overview.
    let from = h
        .get(header::REFERER)
        .and_then(|r| r.to_str().ok())
        .and_then(|r| r.strip_prefix(origin.as_str()))
        .filter(|p| p.starts_with("/.poort/admin") && crate::request::Target::parse(p).is_ok())
        .unwrap_or("/.poort/admin");
    let back = form_urlencoded::Serializer::new(String::new()).append_pair("next", from).finish();
    if !s.mfa() {
        // Set one up, or prove it: the console is never open on a password alone.
        return Some(redirect(StatusCode::SEE_OTHER, &format!("{origin}/.poort/mfa?{back}")));
    }
    if route.verb == Verb::Post && !super::routes::fresh(st, s).await {
        return Some(redirect(StatusCode::SEE_OTHER, &format!("{origin}/.poort/confirm?{back}")));
    }
    None
}

/// Whether the user of `s` is in the admin group now: as the store has them (enabled, with
/// the group), not only as the session began.
async fn is_admin(st: &State, s: &Session) -> bool {
    let group = st.mitigation.admin_group.clone();
    if !s.identity.groups.contains(&group) {
        return false;
    }
    let name = s.identity.user.clone();
    // A store that cannot be read fails closed.
    matches!(st.store.run(move |c| Store::identity(c, &name)).await, Ok(Some(who)) if who.groups.contains(&group))
}

/// Runs an admin page's handler.
pub(super) async fn serve(st: &State, page_: super::Page, call: Call) -> Response<Body> {
    use super::Page::*;
    if call.head.method == http::Method::POST && !token_ok(st, &call) {
        tracing::warn!(request = %call.ctx.id, client = %call.ctx.client, "Refused: an admin action without the console's token");
        refused(st, &call.ctx, call.session(), "an action without the console's token");
        return error_page(StatusCode::FORBIDDEN, call.ctx.id);
    }
    let mut resp = match page_ {
        AdminHome => home(st, &call).await,
        AdminUsers => users(st, &call, None).await,
        AdminUser => user(st, &call).await,
        AdminUserAct => user_act(st, &call).await,
        AdminSessions => sessions(st, &call, None).await,
        AdminSessionsAct => sessions_act(st, &call).await,
        AdminAudit => audit_page(st, &call).await,
        AdminAuditExport => audit_export(st, &call).await,
        AdminMitigation => mitigation(st, &call, None).await,
        AdminMitigationAct => mitigation_act(st, &call).await,
        AdminAccess => access(st, &call).await,
        AdminReport => report(st, &call).await,
        AdminRecordings => recordings(st, &call).await,
        AdminRecording => recording(st, &call).await,
        _ => error_page(StatusCode::NOT_FOUND, call.ctx.id),
    };
    // What an administrator sees stays out of caches and frames.
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

/// The console's token for this session: what only a console page carries, so that an
/// action comes from one. The portal's CSRF token stops other sites; it does not stop a
/// script on an app that shares the portal's origin (apps routed by path), which can read
/// other portal pages and even make its page's address look like a portal page's. That
/// script reads no console page (`navigated`), so it never holds this token. Keyed with the
/// gateway's shared secret: every node makes and checks the same one.
fn token(st: &State, call: &Call) -> String {
    st.signins.sealer.keyed("admin console", &call.session().id)
}

fn token_ok(st: &State, call: &Call) -> bool {
    use subtle::ConstantTimeEq;
    let want = token(st, call);
    bool::from(want.as_bytes().ct_eq(call.field("admin").as_bytes()))
}

/// Records an attempt at the console that its guard or token refused (counted per minute,
/// as every refusal is).
fn refused(st: &State, ctx: &Ctx, s: &Session, why: &str) {
    let ev = Event::AccessDenied {
        user: s.identity.user.clone(),
        session: s.id.clone(),
        app: "admin console".into(),
        reason: why.into(),
        client: ctx.client,
    };
    st.audit.refusal("admin_console", &s.identity.user, ctx.client, why, ev);
}

/// Records an administrator's action before it is made: an action that cannot be audited is
/// not made.
async fn record(st: &State, call: &Call, command: &str, target: &str, detail: &str) -> bool {
    let s = call.session();
    let ev = Event::Admin {
        command: format!("console: {command}"),
        target: target.into(),
        detail: detail.into(),
        by: Some(s.identity.user.clone()),
        session: Some(s.id.clone()),
        client: Some(call.ctx.client),
    };
    match st.audit.record(ev).await {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(error = %e, "Recording an admin action failed; the action was not made");
            false
        }
    }
}

/// Runs `f` on the store off the async threads.
async fn blocking<R: Send + 'static>(
    st: &State,
    f: impl FnOnce(Store) -> anyhow::Result<R> + Send + 'static,
) -> Option<R> {
    let store = st.store.clone();
    match tokio::task::spawn_blocking(move || f(store)).await {
        Ok(Ok(r)) => Some(r),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "Admin console: the store failed");
            None
        }
        Err(_) => None,
    }
}

fn unavailable(call: &Call) -> Response<Body> {
    error_page(StatusCode::SERVICE_UNAVAILABLE, call.ctx.id)
}

// ---- recordings ---------------------------------------------------------------------------

struct RecordingLine {
    seq: i64,
    at: String,
    user: String,
    target: String,
    principal: String,
    what: String,
    live: bool,
    /// The file is on this node.
    here: bool,
    state: String,
}

#[derive(Template)]
#[template(path = "admin_recordings.html")]
struct RecordingsPage<'a> {
    user: &'a str,
    csrf: &'a str,
    lines: Vec<RecordingLine>,
}

/// The newest recorded channels (`ssh_channel_opened` records with a recording).
async fn recordings(st: &State, call: &Call) -> Response<Body> {
    let rows = blocking(st, |store| {
        store.with(|c| {
            c.query_map(
                "SELECT seq, at, detail FROM audit WHERE kind = 'ssh_channel_opened' ORDER BY seq DESC LIMIT 200",
                crate::db::params![],
                |r| Ok((r.get::<i64>(0)?, r.get::<i64>(1)?, r.get::<String>(2)?)),
            )
        })
    })
    .await;
    let Some(rows) = rows else { return unavailable(call) };
    let folder = audit::recording::folder(&st.cfg.data_dir);
    let lines = rows
        .into_iter()
        .filter_map(|(seq, at, detail)| {
            let d: serde_json::Value = serde_json::from_str(&detail).ok()?;
            let name = audit::field(&d, "recording");
            if !audit::recording::valid_name(&name) {
                return None;
            }
            let live = audit::recording::is_open(&name);
            let here = folder.join(&name).is_file();
            let state = if here { "ended" } else { "on another node, or removed" };
            Some(RecordingLine {
                seq,
                at: format_minutes(at),
                user: audit::field(&d, "user"),
                target: audit::field(&d, "target"),
                principal: audit::field(&d, "principal"),
                what: audit::field(&d, "what"),
                live,
                here,
                state: state.into(),
            })
        })
        .collect();
    let (csrf, new) = csrf_for_page(call.headers());
    let p = RecordingsPage { user: &call.session().identity.user, csrf: &csrf, lines };
    with_csrf_cookie(html(StatusCode::OK, &p), &csrf, new)
}

/// Largest recording a page shows.
const RECORDING_SHOWN: u64 = 16 << 20;

/// One recording, replayed; or, while it is being made on this node, watched as it goes.
/// Watching someone's session is an administrator's action: it is audited first.
async fn recording(st: &State, call: &Call) -> Response<Body> {
    let seq: i64 = query_param(call, "seq").and_then(|s| s.parse().ok()).unwrap_or(-1);
    let row = blocking(st, move |store| {
        store.with(|c| {
            use crate::db::OptionalExtension;
            c.query_row(
                "SELECT detail FROM audit WHERE seq = ?1 AND kind = 'ssh_channel_opened'",
                crate::db::params![seq],
                |r| r.get::<String>(0),
            )
            .optional()
        })
    })
    .await;
    let Some(row) = row else { return unavailable(call) };
    let Some(d) = row.and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok()) else {
        return error_page(StatusCode::NOT_FOUND, call.ctx.id);
    };
    // The file's name comes from the audit record, never from the request, and must still
    // look like one a recorder made.
    let name = audit::field(&d, "recording");
    let path = audit::recording::folder(&st.cfg.data_dir).join(&name);
    if !audit::recording::valid_name(&name) || !path.is_file() {
        return error_page(StatusCode::NOT_FOUND, call.ctx.id);
    }
    let (user, target, what) = (audit::field(&d, "user"), audit::field(&d, "target"), audit::field(&d, "what"));
    let live = audit::recording::is_open(&name);
    let verb = if live { "recording watch" } else { "recording replay" };
    if !record(st, call, verb, &user, &format!("{what} on {target} ({name})")).await {
        return unavailable(call);
    }
    let session = audit::field(&d, "session");
    let heading = format!("{user} on {target} as {}", audit::field(&d, "principal"));
    let about = format!("{what}: {}", if live { "live, as it happens" } else { "a recording" });
    let (csrf, new) = csrf_for_page(call.headers());
    let token = token(st, call);
    let p = crate::respond::TerminalPage {
        user: &call.session().identity.user,
        csrf: &csrf,
        heading: &heading,
        about: &about,
        mode: if live { "live" } else { "replay" },
        socket: "",
        admin: true,
        token: &token,
        end_session: live.then_some(session.as_str()),
    };
    let Some((before, after)) = crate::respond::terminal_parts(&p) else {
        return error_page(StatusCode::INTERNAL_SERVER_ERROR, call.ctx.id);
    };
    let stream = audit::recording::page_stream(
        before,
        after,
        path,
        name,
        RECORDING_SHOWN,
        std::time::Duration::from_secs(4 * 3600),
    );
    // Ends when the administrator's own session does.
    let body = Body::watched(Body::Stream(stream), call.session().lifeline());
    with_csrf_cookie(crate::respond::terminal_page(StatusCode::OK, body), &csrf, new)
}

// ---- overview -----------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "admin_home.html")]
struct HomePage<'a> {
    user: &'a str,
    csrf: &'a str,
    users: usize,
    disabled: usize,
    sessions: usize,
    lockdown: bool,
    rules: usize,
    rules_error: Option<String>,
    records: i64,
}

async fn home(st: &State, call: &Call) -> Response<Body> {
    let counts = blocking(st, |store| {
        let users = store.list_users()?;
        let sessions = store.list_sessions(None)?.len();
        let records = store.with(|c| c.query_row("SELECT COALESCE(MAX(seq), 0) FROM audit", (), |r| r.get(0)))?;
        Ok((users.len(), users.iter().filter(|u| u.disabled).count(), sessions, records))
    })
    .await;
    let Some((users, disabled, sessions, records)) = counts else { return unavailable(call) };
    let status = st.mitigation.status();
    let (csrf, new) = csrf_for_page(call.headers());
    let p = HomePage {
        user: &call.session().identity.user,
        csrf: &csrf,
        users,
        disabled,
        sessions,
        lockdown: st.mitigation.lockdown(),
        rules: st.mitigation.rule_count(),
        rules_error: status.last_error,
        records,
    };
    with_csrf_cookie(html(StatusCode::OK, &p), &csrf, new)
}

// ---- users --------------------------------------------------------------------------------

struct UserLine {
    name: String,
    email: String,
    source: String,
    groups: String,
    disabled: bool,
}

#[derive(Template)]
#[template(path = "admin_users.html")]
struct UsersPage<'a> {
    user: &'a str,
    csrf: &'a str,
    /// This session's console token (`token`), for the page's forms.
    token: String,
    q: &'a str,
    users: Vec<UserLine>,
    /// What the last action did, or why it was not done.
    done: Option<String>,
    /// A password made for a new user, shown this once.
    password: Option<String>,
}

async fn users(st: &State, call: &Call, done: Option<(String, Option<String>)>) -> Response<Body> {
    let q = query_param(call, "q").unwrap_or_default();
    let needle = q.to_lowercase();
    let Some(all) = blocking(st, |store| store.list_users()).await else { return unavailable(call) };
    let users = all
        .into_iter()
        .filter(|u| {
            needle.is_empty()
                || u.name.to_lowercase().contains(&needle)
                || u.email.as_deref().is_some_and(|e| e.to_lowercase().contains(&needle))
                || u.groups.iter().any(|g| g.to_lowercase() == needle)
        })
        .map(|u| UserLine {
            email: u.email.unwrap_or_default(),
            groups: u.groups.join(", "),
            name: u.name,
            source: u.source,
            disabled: u.disabled,
        })
        .collect();
    let (done, password) = done.map_or((None, None), |(d, p)| (Some(d), p));
    let (csrf, new) = csrf_for_page(call.headers());
    let p = UsersPage {
        user: &call.session().identity.user,
        csrf: &csrf,
        token: token(st, call),
        q: &q,
        users,
        done,
        password,
    };
    with_csrf_cookie(html(StatusCode::OK, &p), &csrf, new)
}

struct SignInLine {
    at: String,
    what: String,
    client: String,
}

#[derive(Template)]
#[template(path = "admin_user.html")]
struct UserPage<'a> {
    user: &'a str,
    csrf: &'a str,
    /// This session's console token (`token`), for the page's forms.
    token: String,
    name: &'a str,
    email: String,
    source: String,
    groups: String,
    disabled: bool,
    totp: bool,
    passkeys: usize,
    recovery_left: usize,
    /// The SSH keys registered: type, fingerprint and name.
    ssh_keys: Vec<(String, String, String)>,
    /// The page shows the administrator's own account, or another administrator's: the
    /// actions the console refuses for them are not offered.
    is_self: bool,
    is_admin: bool,
    locked: Vec<String>,
    signins: Vec<SignInLine>,
    sessions: Vec<SessionLine>,
}

async fn user(st: &State, call: &Call) -> Response<Body> {
    let name = query_param(call, "name").unwrap_or_default();
    if !valid_user_name(&name) {
        return error_page(StatusCode::NOT_FOUND, call.ctx.id);
    }
    let now = st.clock.now();
    let wanted = name.clone();
    let found = blocking(st, move |store| {
        let Some(u) = store.list_users()?.into_iter().find(|u| u.name == wanted) else { return Ok(None) };
        let (f, locks, ssh) = store.with(|c| {
            Ok((
                crate::identity::mfa::factors(c, &wanted)?,
                crate::identity::mfa::lock_state(c, &wanted)?,
                crate::ssh::keys(c, &wanted)?,
            ))
        })?;
        let filter = Filter { user: wanted.clone(), ..Filter::default() };
        let kinds = ["login_succeeded", "login_failed", "logout"];
        let signins = store.with(|c| search(c, &filter, 20, |r| kinds.contains(&r.kind.as_str())))?;
        let sessions = store.list_sessions(Some(&wanted))?;
        Ok(Some((u, f, locks, ssh, signins, sessions)))
    })
    .await;
    let Some(found) = found else { return unavailable(call) };
    let Some((u, f, locks, ssh, signins, sessions)) = found else {
        return error_page(StatusCode::NOT_FOUND, call.ctx.id);
    };
    let locked = locks
        .into_iter()
        .filter(|(_, _, until)| *until > now)
        .map(|(lock, n, until)| format!("{} until {} ({n} failures)", lock.as_str(), format_minutes(until)))
        .collect();
    let signins = signins
        .into_iter()
        .map(|(r, d)| SignInLine {
            at: format_minutes(r.at),
            what: r.kind.replace('_', " "),
            client: audit::field(&d, "client"),
        })
        .collect();
    let (csrf, new) = csrf_for_page(call.headers());
    let p = UserPage {
        user: &call.session().identity.user,
        csrf: &csrf,
        token: token(st, call),
        name: &name,
        email: u.email.clone().unwrap_or_default(),
        source: u.source.clone(),
        groups: u.groups.join(", "),
        disabled: u.disabled,
        totp: f.totp,
        passkeys: f.passkeys,
        recovery_left: f.recovery_left,
        ssh_keys: ssh.into_iter().map(|k| (k.algo, k.fingerprint, k.name)).collect(),
        is_self: name == call.session().identity.user,
        is_admin: u.groups.contains(&st.mitigation.admin_group),
        locked,
        signins,
        sessions: sessions.into_iter().map(|r| session_line(r, &call.session().id)).collect(),
    };
    with_csrf_cookie(html(StatusCode::OK, &p), &csrf, new)
}

/// A list of group names from a form field: comma or space separated.
fn group_list(field: &str) -> Vec<String> {
    field.split([',', ' ']).map(str::trim).filter(|g| !g.is_empty()).map(String::from).collect()
}

async fn user_act(st: &State, call: &Call) -> Response<Body> {
    let me = call.session().identity.user.clone();
    let admins = st.mitigation.admin_group.clone();
    let name = call.field("name").trim().to_string();
    let op = call.field("op").to_string();
    let now = st.clock.now();
    let said = |s: String| Some((s, None));
    // The names an action takes in, checked as the command line checks them.
    let (groups, add, remove) =
        (group_list(call.field("groups")), group_list(call.field("add")), group_list(call.field("remove")));
    let email = Some(call.field("email").trim().to_string()).filter(|e| !e.is_empty());
    let taken_in: Vec<String> = groups.iter().chain(&add).cloned().collect();
    if let Some(why) = crate::names::account_problem(&name, &taken_in, email.as_deref()) {
        return users(st, call, said(why)).await;
    }
    // Every change but an addition is to a user who exists: nothing is recorded for one who
    // does not.
    let wanted = name.clone();
    let Some(found) = blocking(st, move |store| Ok(store.list_users()?.into_iter().find(|u| u.name == wanted))).await
    else {
        return unavailable(call);
    };
    let found = match (found, op.as_str()) {
        (_, "add") => None,
        (Some(u), _) => Some(u),
        (None, _) => return users(st, call, said(format!("No user {name}."))).await,
    };
    let current: Vec<String> = found.as_ref().map(|u| u.groups.clone()).unwrap_or_default();
    let outcome = match op.as_str() {
        "add" => {
            let wanted = name.clone();
            if blocking(st, move |store| store.name_taken(&wanted)).await != Some(false) {
                let why =
                    format!("The name {name} is taken: a user of that name exists, perhaps in other letter case.");
                return users(st, call, said(why)).await;
            }
            let detail = format!("groups: {}; email: {}", groups.join(","), email.as_deref().unwrap_or("none"));
            if !record(st, call, "user add", &name, &detail).await {
                return unavailable(call);
            }
            let pw = crate::identity::password::random_password();
            let Ok(hash) = crate::identity::password::hash(&pw) else { return unavailable(call) };
            let wanted = name.clone();
            let added = blocking(st, move |store| store.add_user(&wanted, email.as_deref(), &hash, &groups, now)).await;
            if added.is_none() {
                return unavailable(call);
            }
            return users(st, call, Some((format!("Added user {name}."), Some(pw)))).await;
        }
        "disable" | "enable" => {
            let off = op == "disable";
            if off && name == me {
                return users(st, call, said("You cannot disable yourself here: ask another administrator, or use poort user disable on the gateway.".into())).await;
            }
            let detail = if off { "disabled; sessions ended" } else { "enabled" };
            if !record(st, call, &format!("user {op}"), &name, detail).await {
                return unavailable(call);
            }
            let wanted = name.clone();
            match blocking(st, move |store| store.set_disabled(&wanted, off, now)).await {
                Some(_) => format!("{} {name}.", if off { "Disabled" } else { "Enabled" }),
                None => return unavailable(call),
            }
        }
        "unlock" => {
            if !record(st, call, "user unlock", &name, "failures cleared").await {
                return unavailable(call);
            }
            let wanted = name.clone();
            let done = blocking(st, move |store| {
                use crate::identity::mfa::{Lock, unlock};
                store.with(|c| Ok(unlock(c, &wanted, Lock::Password)? | unlock(c, &wanted, Lock::Factor)?))
            })
            .await;
            match done {
                Some(_) => format!("{name} can sign in again."),
                None => return unavailable(call),
            }
        }
        "mfa-reset" => {
            if name == me {
                return users(
                    st,
                    call,
                    said("You cannot remove your own second factors here: do it on your Security page.".into()),
                )
                .await;
            }
            if current.contains(&admins) {
                // Without factors, an administrator is one password away from this console.
                let why = format!(
                    "{name} is an administrator: remove their factors on the gateway (poort user mfa-reset), or take them out of {admins} first."
                );
                return users(st, call, said(why)).await;
            }
            if !record(st, call, "user mfa-reset", &name, "all second factors and SSH keys removed").await {
                return unavailable(call);
            }
            let wanted = name.clone();
            let now = st.clock.now();
            let reset = move |store: Store| {
                store.with(|c| crate::identity::mfa::reset(c, &wanted))?;
                store.with(|c| crate::ssh::end_sessions(c, &wanted, now))
            };
            match blocking(st, reset).await {
                Some(_) => {
                    format!(
                        "Removed every second factor and SSH key of {name}; they set up new ones at their next sign-in."
                    )
                }
                None => return unavailable(call),
            }
        }
        "groups" => {
            if name == me && remove.contains(&admins) {
                return users(
                    st,
                    call,
                    said(format!("You cannot take yourself out of {admins} here: ask another administrator.")),
                )
                .await;
            }
            // What changes: groups the user is not in yet, and groups they are in.
            let add: Vec<String> = add.into_iter().filter(|g| !current.contains(g)).collect();
            let remove: Vec<String> = remove.into_iter().filter(|g| current.contains(g)).collect();
            if add.is_empty() && remove.is_empty() {
                let why = format!("Nothing to change: {name} is in {}.", current.join(", "));
                return users(st, call, said(why)).await;
            }
            let detail = [("added", &add), ("removed", &remove)]
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(what, v)| format!("{what}: {}", v.join(",")))
                .collect::<Vec<_>>()
                .join("; ");
            if !record(st, call, "user groups", &name, &detail).await {
                return unavailable(call);
            }
            let wanted = name.clone();
            match blocking(st, move |store| store.change_groups(&wanted, &add, &remove, now)).await {
                Some(()) => format!("Changed the groups of {name} ({detail})."),
                None => return unavailable(call),
            }
        }
        _ => return error_page(StatusCode::BAD_REQUEST, call.ctx.id),
    };
    users(st, call, said(outcome)).await
}

// ---- sessions -----------------------------------------------------------------------------

struct SessionLine {
    id: String,
    user: String,
    kind: String,
    /// Apps this session opened, and tunnels it holds open (from the audit log).
    apps: String,
    tunnels: String,
    created: String,
    last_seen: String,
    client_addr: String,
    browser: String,
    current: bool,
}

fn session_line(r: crate::store::SessionRow, current: &str) -> SessionLine {
    SessionLine {
        apps: String::new(),
        tunnels: String::new(),
        current: r.id == current,
        browser: super::browser_of(&r.user_agent),
        created: format_minutes(r.created_at),
        last_seen: format_minutes(r.last_seen),
        id: r.id,
        user: r.user,
        kind: r.kind,
        client_addr: r.client_addr,
    }
}

#[derive(Template)]
#[template(path = "admin_sessions.html")]
struct SessionsPage<'a> {
    user: &'a str,
    csrf: &'a str,
    /// This session's console token (`token`), for the page's forms.
    token: String,
    sessions: Vec<SessionLine>,
    done: Option<String>,
}

/// What one session did, from the audit log.
#[derive(Default)]
struct Activity {
    /// Apps it opened (since it last signed in or stepped up: a renewal is a new session).
    apps: BTreeSet<String>,
    /// Tunnels opened less tunnels closed, by name.
    tunnels: BTreeMap<String, i64>,
}

/// What sessions did since `since`, by session.
fn activity(conn: &crate::db::Conn, since: crate::clock::UnixTime) -> crate::db::Result<HashMap<String, Activity>> {
    let rows = conn.query_map(
        "SELECT kind, detail FROM audit WHERE at >= ?1 AND kind IN ('access_allowed', 'tunnel_opened', 'tunnel_closed') \
         ORDER BY seq DESC LIMIT 50000",
        crate::db::params![since],
        |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)),
    )?;
    let mut out: HashMap<String, Activity> = HashMap::new();
    for (kind, detail) in rows {
        let Ok(d) = serde_json::from_str::<serde_json::Value>(&detail) else { continue };
        let session = audit::field(&d, "session");
        if session.is_empty() {
            continue;
        }
        let entry = out.entry(session).or_default();
        match kind.as_str() {
            "access_allowed" => {
                entry.apps.insert(audit::field(&d, "app"));
            }
            "tunnel_opened" => *entry.tunnels.entry(audit::field(&d, "tunnel")).or_default() += 1,
            _ => *entry.tunnels.entry(audit::field(&d, "tunnel")).or_default() -= 1,
        }
    }
    Ok(out)
}

async fn sessions(st: &State, call: &Call, done: Option<String>) -> Response<Body> {
    let found = blocking(st, |store| {
        let rows = store.list_sessions(None)?;
        let since = rows.iter().map(|r| r.created_at).min().unwrap_or(i64::MAX);
        let did = store.with(|c| activity(c, since))?;
        Ok((rows, did))
    })
    .await;
    let Some((rows, mut did)) = found else { return unavailable(call) };
    let current = &call.session().id;
    let sessions = rows
        .into_iter()
        .map(|r| {
            let did = did.remove(&r.id).unwrap_or_default();
            let mut line = session_line(r, current);
            line.apps = did.apps.into_iter().collect::<Vec<_>>().join(", ");
            line.tunnels = did
                .tunnels
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(t, n)| if n == 1 { t } else { format!("{t} ({n})") })
                .collect::<Vec<_>>()
                .join(", ");
            line
        })
        .collect();
    let (csrf, new) = csrf_for_page(call.headers());
    let p = SessionsPage { user: &call.session().identity.user, csrf: &csrf, token: token(st, call), sessions, done };
    with_csrf_cookie(html(StatusCode::OK, &p), &csrf, new)
}

async fn sessions_act(st: &State, call: &Call) -> Response<Body> {
    let own = call.session().id.clone();
    let now = st.clock.now();
    let done = match call.field("op") {
        "end" => {
            let id = call.field("id").to_string();
            let wanted = id.clone();
            let Some(rows) = blocking(st, |store| store.list_sessions(None)).await else { return unavailable(call) };
            let Some(row) = rows.into_iter().find(|r| r.id == wanted) else {
                return sessions(st, call, Some("That session has ended already.".into())).await;
            };
            if !record(st, call, "session end", &row.user, &format!("session {id}")).await {
                return unavailable(call);
            }
            let _ = st.sessions.end(&id).await;
            let ev =
                Event::SessionEnded { user: row.user.clone(), session: id, by: call.session().identity.user.clone() };
            st.audit.note(ev).await;
            if row.id == own {
                return super::to_login(st);
            }
            format!("Ended a session of {}.", row.user)
        }
        "end-user" => {
            let user = call.field("user").to_string();
            if !valid_user_name(&user) {
                return error_page(StatusCode::BAD_REQUEST, call.ctx.id);
            }
            let wanted = user.clone();
            if blocking(st, move |store| store.user_exists(&wanted)).await != Some(true) {
                return sessions(st, call, Some(format!("No user {user}."))).await;
            }
            let detail = if user == call.session().identity.user {
                "every session of the user but this one"
            } else {
                "every session of the user"
            };
            if !record(st, call, "session end-user", &user, detail).await {
                return unavailable(call);
            }
            let Some(ended) = end_many(st, Some(user.clone()), own, now).await else { return unavailable(call) };
            format!("Ended {ended} session(s) of {user}.")
        }
        "end-all" => {
            if call.field("confirm") != "yes" {
                return sessions(st, call, Some("Tick the box to confirm ending every session.".into())).await;
            }
            if !record(st, call, "session end-all", "all", "every session but the administrator's own").await {
                return unavailable(call);
            }
            let Some(ended) = end_many(st, None, own, now).await else { return unavailable(call) };
            format!("Ended {ended} session(s); yours stays open.")
        }
        _ => return error_page(StatusCode::BAD_REQUEST, call.ctx.id),
    };
    sessions(st, call, Some(done)).await
}

/// Ends every session of `user` (or of everyone) but `keep`, on every node; how many.
async fn end_many(st: &State, user: Option<String>, keep: String, now: crate::clock::UnixTime) -> Option<usize> {
    let ended = blocking(st, move |store| {
        let rows = store.list_sessions(user.as_deref())?;
        let ids: Vec<String> = rows.into_iter().map(|r| r.id).filter(|id| *id != keep).collect();
        for id in &ids {
            store.revoke_session(id, now)?;
        }
        Ok(ids.len())
    })
    .await?;
    // This node at once; the others within a second.
    let _ = st.sessions.poll_revocations().await;
    Some(ended)
}

// ---- audit --------------------------------------------------------------------------------

/// What the audit page filters on; empty fields match everything.
#[derive(Debug, Default, Clone)]
struct Filter {
    kind: String,
    user: String,
    app: String,
    client: String,
    /// Dates (YYYY-MM-DD, UTC), inclusive.
    since: String,
    until: String,
}

impl Filter {
    fn from(call: &Call) -> Filter {
        let q = |n| query_param(call, n).unwrap_or_default().trim().to_string();
        Filter {
            kind: q("kind"),
            user: q("user"),
            app: q("app"),
            client: q("client"),
            since: q("since"),
            until: q("until"),
        }
    }

    /// Why the filter cannot be used, if it cannot.
    fn problem(&self) -> Option<String> {
        if !self.kind.is_empty() && !audit::KINDS.contains(&self.kind.as_str()) {
            return Some(format!("Kind: {:?} is not a kind of record.", self.kind));
        }
        [("From", &self.since), ("To", &self.until)]
            .into_iter()
            .find(|(_, d)| !d.is_empty() && crate::clock::parse_day(d).is_none())
            .map(|(what, d)| format!("{what}: {d:?} is not a date; write it as YYYY-MM-DD."))
    }

    fn query(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs([
                ("kind", &self.kind),
                ("user", &self.user),
                ("app", &self.app),
                ("client", &self.client),
                ("since", &self.since),
                ("until", &self.until),
            ])
            .finish()
    }

    fn matches(&self, r: &Record, d: &serde_json::Value) -> bool {
        let field = |k: &str, want: &str| want.is_empty() || audit::field(d, k) == want;
        // A user is in a record as its user, or as the administrator who acted or their target.
        let user = self.user.is_empty() || ["user", "by", "target"].iter().any(|k| audit::field(d, k) == self.user);
        (self.kind.is_empty() || r.kind == self.kind)
            && user
            && field("app", &self.app)
            && field("client", &self.client)
    }
}

/// The newest records that match `filter` and `also`, at most `limit`, newest first; looks at
/// no more than `SCAN` records.
fn search(
    conn: &crate::db::Conn,
    filter: &Filter,
    limit: usize,
    also: impl Fn(&Record) -> bool,
) -> crate::db::Result<Vec<(Record, serde_json::Value)>> {
    const PAGE: i64 = 2000;
    const SCAN: usize = 200_000;
    let since = crate::clock::parse_day(&filter.since).unwrap_or(i64::MIN);
    let until = crate::clock::parse_day(&filter.until).map_or(i64::MAX, |t| t + 86_400);
    let mut before = i64::MAX;
    let (mut out, mut seen) = (Vec::new(), 0usize);
    while out.len() < limit && seen < SCAN {
        let page = conn.query_map(
            "SELECT seq, at, kind, detail, hash FROM audit WHERE seq < ?1 AND at >= ?2 AND at < ?3 ORDER BY seq DESC LIMIT ?4",
            crate::db::params![before, since, until, PAGE],
            |r| Ok(Record { seq: r.get(0)?, at: r.get(1)?, kind: r.get(2)?, detail: r.get(3)?, hash: r.get(4)? }),
        )?;
        let Some(last) = page.last() else { break };
        before = last.seq;
        seen += page.len();
        for r in page {
            let d: serde_json::Value = serde_json::from_str(&r.detail).unwrap_or(serde_json::Value::Null);
            if filter.matches(&r, &d) && also(&r) {
                out.push((r, d));
                if out.len() == limit {
                    break;
                }
            }
        }
    }
    Ok(out)
}

struct AuditLine {
    seq: i64,
    at: String,
    kind: String,
    user: String,
    client: String,
    detail: String,
}

#[derive(Template)]
#[template(path = "admin_audit.html")]
struct AuditPage<'a> {
    user: &'a str,
    csrf: &'a str,
    f: &'a Filter,
    query: String,
    kinds: Vec<&'static str>,
    lines: Vec<AuditLine>,
    /// The chain verification, when asked for.
    verdict: Option<(bool, String)>,
    /// Why the filter was not applied.
    problem: Option<String>,
}

const SHOWN: usize = 200;

async fn audit_page(st: &State, call: &Call) -> Response<Body> {
    let f = Filter::from(call);
    let problem = f.problem();
    if problem.is_some() {
        // Nothing is shown for a filter that cannot be applied, rather than everything.
        let (csrf, new) = csrf_for_page(call.headers());
        let kinds = audit::KINDS.to_vec();
        let p = AuditPage {
            user: &call.session().identity.user,
            csrf: &csrf,
            query: f.query(),
            f: &f,
            kinds,
            lines: Vec::new(),
            verdict: None,
            problem,
        };
        return with_csrf_cookie(html(StatusCode::BAD_REQUEST, &p), &csrf, new);
    }
    let verify = query_param(call, "verify").is_some_and(|v| v == "1");
    let filter = f.clone();
    let found = blocking(st, move |store| {
        store.with(|c| {
            let lines = search(c, &filter, SHOWN, |_| true)?;
            let verdict = if verify { Some(audit::verify(c)?) } else { None };
            Ok((lines, verdict))
        })
    })
    .await;
    let Some((lines, verdict)) = found else { return unavailable(call) };
    let lines = lines
        .into_iter()
        .map(|(r, d)| AuditLine {
            seq: r.seq,
            at: format_minutes(r.at),
            kind: r.kind,
            user: audit::field(&d, "user"),
            client: audit::field(&d, "client"),
            detail: r.detail,
        })
        .collect();
    let verdict = verdict.map(|v| match v {
        audit::Verdict::Intact { records, head } => (true, format!("intact: {records} records, head {head}")),
        audit::Verdict::Broken { seq, why } => (false, format!("broken at record {seq}: {why}")),
    });
    let (csrf, new) = csrf_for_page(call.headers());
    let p = AuditPage {
        user: &call.session().identity.user,
        csrf: &csrf,
        query: f.query(),
        f: &f,
        kinds: audit::KINDS.to_vec(),
        lines,
        verdict,
        problem: None,
    };
    with_csrf_cookie(html(StatusCode::OK, &p), &csrf, new)
}

/// The filtered records as JSON lines (seq, at, event, hash), as `poort audit tail --json`
/// prints them, to download.
async fn audit_export(st: &State, call: &Call) -> Response<Body> {
    let f = Filter::from(call);
    if let Some(why) = f.problem() {
        return page(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", Body::from(format!("{why}\n")));
    }
    if !record(st, call, "audit export", "audit", &f.query()).await {
        return unavailable(call);
    }
    let found = blocking(st, move |store| store.with(|c| search(c, &f, 100_000, |_| true))).await;
    let Some(mut lines) = found else { return unavailable(call) };
    lines.reverse();
    let mut out = String::new();
    for (r, d) in lines {
        let line = serde_json::json!({"seq": r.seq, "at": crate::clock::format_utc(r.at), "event": d, "hash": crate::secret::hex(&r.hash)});
        out.push_str(&line.to_string());
        out.push('\n');
    }
    let mut resp = page(StatusCode::OK, "application/x-ndjson", Body::from(out));
    resp.headers_mut()
        .insert(header::CONTENT_DISPOSITION, HeaderValue::from_static("attachment; filename=\"poort-audit.jsonl\""));
    resp
}

// ---- mitigation ---------------------------------------------------------------------------

struct RuleLine {
    id: String,
    action: String,
    reason: String,
    /// Requests it matched on this node since the rules were loaded or the node started.
    hits: u64,
}

#[derive(Template)]
#[template(path = "admin_mitigation.html")]
struct MitigationPage<'a> {
    user: &'a str,
    csrf: &'a str,
    /// This session's console token (`token`), for the page's forms.
    token: String,
    file: String,
    rules: usize,
    version: String,
    loaded_at: String,
    sha256: String,
    last_error: Option<String>,
    rule_lines: Vec<RuleLine>,
    lockdown: bool,
    lockdown_config: bool,
    admin_group: &'a str,
    done: Option<String>,
}

async fn mitigation(st: &State, call: &Call, done: Option<String>) -> Response<Body> {
    mitigation_as(st, call, done, None).await
}

/// The mitigation page; `switched` is the lockdown switch just set (every node, this one
/// included, takes it up within a second: the page shows it at once).
async fn mitigation_as(st: &State, call: &Call, done: Option<String>, switched: Option<bool>) -> Response<Body> {
    let status = st.mitigation.status();
    let rule_lines = st
        .mitigation
        .rule_list()
        .into_iter()
        .map(|(id, action, reason)| RuleLine { hits: status.hits.get(&id).copied().unwrap_or(0), id, action, reason })
        .collect();
    let (csrf, new) = csrf_for_page(call.headers());
    let p = MitigationPage {
        user: &call.session().identity.user,
        csrf: &csrf,
        token: token(st, call),
        file: status.file.unwrap_or_else(|| "none configured".into()),
        rules: st.mitigation.rule_count(),
        version: status.version.map(|v| v.to_string()).unwrap_or_default(),
        loaded_at: status.loaded_at.unwrap_or_default(),
        sha256: status.sha256.unwrap_or_default(),
        last_error: status.last_error,
        rule_lines,
        lockdown: switched.map_or(st.mitigation.lockdown(), |on| on || st.cfg.mitigate.lockdown),
        lockdown_config: st.cfg.mitigate.lockdown,
        admin_group: &st.mitigation.admin_group,
        done,
    };
    with_csrf_cookie(html(StatusCode::OK, &p), &csrf, new)
}

async fn mitigation_act(st: &State, call: &Call) -> Response<Body> {
    let state = match call.field("lockdown") {
        "on" => "on",
        "off" => "off",
        _ => return error_page(StatusCode::BAD_REQUEST, call.ctx.id),
    };
    if call.field("confirm") != "yes" {
        return mitigation(st, call, Some("Tick the box to confirm.".into())).await;
    }
    let detail = if state == "on" {
        format!("only group {} may sign in", st.mitigation.admin_group)
    } else {
        "everyone may sign in again".to_string()
    };
    if !record(st, call, "lockdown", state, &detail).await {
        return unavailable(call);
    }
    let value = state.to_string();
    if blocking(st, move |store| store.set_setting("lockdown", &value)).await.is_none() {
        return unavailable(call);
    }
    // Every node reads the switch within a second (server::poll_store), this one included.
    let said = if state == "on" {
        format!(
            "Lockdown is on: within a second only {} can sign in or reach apps, on every node.",
            st.mitigation.admin_group
        )
    } else if st.cfg.mitigate.lockdown {
        "The switch is off, but the config keeps lockdown on ([mitigate] lockdown = true).".into()
    } else {
        "Lockdown is off: within a second everyone can sign in again, on every node.".into()
    };
    mitigation_as(st, call, Some(said), Some(state == "on")).await
}

// ---- who may use what ---------------------------------------------------------------------

struct AccessLine {
    kind: &'static str,
    name: String,
    title: String,
    rule: String,
    verdict: String,
    allowed: bool,
}

#[derive(Template)]
#[template(path = "admin_access.html")]
struct AccessPage<'a> {
    user: &'a str,
    csrf: &'a str,
    who: &'a str,
    /// What is known of `who`: groups, or why nothing is decided.
    about: String,
    lines: Vec<AccessLine>,
}

/// How a resource's access is declared, in a line.
fn describe(access: &policy::Access, mfa: bool) -> String {
    let base = match access {
        policy::Access::Public => "public".to_string(),
        policy::Access::Authenticated => "any signed-in user".to_string(),
        policy::Access::Rules(rules) => rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let effect = if r.effect == policy::Effect::Allow { "allow" } else { "deny" };
                let mut who: Vec<String> = r.users.iter().map(|u| format!("user {u}")).collect();
                who.extend(r.groups.iter().map(|g| format!("group {g}")));
                format!("rule {}: {effect} {}", i + 1, who.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; "),
    };
    if mfa { format!("{base}; second factor required") } else { base }
}

async fn access(st: &State, call: &Call) -> Response<Body> {
    let who = query_param(call, "user").unwrap_or_default().trim().to_string();
    let mut lines = Vec::new();
    let mut about = String::new();
    let identity = if who.is_empty() {
        None
    } else if !valid_user_name(&who) {
        about = "Not a valid user name".into();
        None
    } else {
        let name = who.clone();
        match st.store.run(move |c| Store::identity(c, &name)).await {
            Ok(Some(id)) => Some(id),
            Ok(None) => {
                about = format!("{who} is not a user here, or is disabled: nothing is open to them");
                None
            }
            Err(_) => return unavailable(call),
        }
    };
    if let Some(id) = &identity {
        about =
            format!("{who} is in: {}", if id.groups.is_empty() { "no groups".into() } else { id.groups.join(", ") });
        if st.mitigation.lockdown() && !id.groups.contains(&st.mitigation.admin_group) {
            about.push_str(". Lockdown is on: they cannot sign in now, whatever the rules below say");
        }
    }
    let verdict = |resource: Resource<'_>, access: &policy::Access, mfa: bool| -> (String, bool) {
        let Some(id) = &identity else { return (String::new(), false) };
        let with = |m| policy::evaluate(resource, access, mfa, Some(Subject { identity: id, mfa: m }));
        match (with(false), with(true)) {
            (Decision::Allow(_), _) => ("allowed".into(), true),
            (_, Decision::Allow(_)) => ("allowed after a second factor".into(), true),
            (Decision::Deny(policy::DenyReason::DenyRule(i)), _) => {
                (format!("denied: deny rule {} matches", i + 1), false)
            }
            (Decision::Deny(_), _) => ("denied: no allow rule matches".into(), false),
            _ => ("denied".into(), false),
        }
    };
    for app in &st.cfg.apps {
        let (v, ok) = verdict(Resource::App(&app.name), &app.access, app.mfa);
        lines.push(AccessLine {
            kind: "app",
            name: app.name.clone(),
            title: app.title.clone(),
            rule: describe(&app.access, app.mfa),
            verdict: v,
            allowed: ok,
        });
    }
    for t in &st.cfg.tunnels {
        let (v, ok) = verdict(Resource::Tunnel(&t.name), &t.access, t.mfa);
        lines.push(AccessLine {
            kind: "tunnel",
            name: t.name.clone(),
            title: t.title.clone(),
            rule: describe(&t.access, t.mfa),
            verdict: v,
            allowed: ok,
        });
    }
    for t in &st.cfg.ssh_targets {
        let (mut v, ok) = verdict(Resource::Ssh(&t.name), &t.access, t.mfa);
        if ok && let Some(identity) = &identity {
            let accounts = t.principals_for(identity);
            v = if accounts.is_empty() { "no account on it".into() } else { format!("{v} as {}", accounts.join(", ")) };
        }
        lines.push(AccessLine {
            kind: "ssh",
            name: t.name.clone(),
            title: t.title.clone(),
            rule: describe(&t.access, t.mfa),
            verdict: v,
            allowed: ok,
        });
    }
    let (csrf, new) = csrf_for_page(call.headers());
    let p = AccessPage { user: &call.session().identity.user, csrf: &csrf, who: &who, about, lines };
    with_csrf_cookie(html(StatusCode::OK, &p), &csrf, new)
}

// ---- were we breached? ----------------------------------------------------------------------

/// One bar of the timeline, placed in the chart's coordinates.
struct Bar {
    x: String,
    y: String,
    width: String,
    height: String,
    fill: &'static str,
}

#[derive(Template)]
#[template(path = "admin_report.html")]
struct ReportPage<'a> {
    user: &'a str,
    csrf: &'a str,
    since: String,
    until: String,
    problem: Option<String>,
    r: audit::report::Report,
    bars: Vec<Bar>,
    /// The highest hourly count, the chart's scale.
    top: u64,
}

impl ReportPage<'_> {
    fn when(&self, t: &i64) -> String {
        format_minutes(*t)
    }
}

/// Bars for the hourly counts: refused requests, failed sign-ins and sign-ins side by side.
fn bars(hours: &[audit::report::Hour], since: i64, until: i64) -> (Vec<Bar>, u64) {
    const WIDTH: f64 = 900.0;
    const HEIGHT: f64 = 160.0;
    let top = hours.iter().map(|h| h.refused.max(h.failed_sign_ins).max(h.sign_ins)).max().unwrap_or(0).max(1);
    let slots = ((until - since) / 3600).max(1) as f64;
    let slot = WIDTH / slots;
    let mut out = Vec::new();
    for h in hours {
        let x0 = (h.start - since) as f64 / 3600.0 * slot;
        for (i, (n, fill)) in
            [(h.refused, "#b3261e"), (h.failed_sign_ins, "#b86e00"), (h.sign_ins, "#1f5fbf")].into_iter().enumerate()
        {
            if n == 0 {
                continue;
            }
            let height = (n as f64 / top as f64 * HEIGHT).max(1.0);
            out.push(Bar {
                x: format!("{:.2}", x0 + i as f64 * slot / 3.0),
                y: format!("{:.2}", HEIGHT - height),
                width: format!("{:.2}", (slot / 3.0).max(0.5)),
                height: format!("{height:.2}"),
                fill,
            });
        }
    }
    (out, top)
}

async fn report(st: &State, call: &Call) -> Response<Body> {
    let now = st.clock.now();
    let today = crate::clock::format_utc(now)[..10].to_string();
    let week_ago = crate::clock::format_utc(now - 6 * 86_400)[..10].to_string();
    let since = query_param(call, "since").map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).unwrap_or(week_ago);
    let until = query_param(call, "until").map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).unwrap_or(today);
    let (from, to) = (crate::clock::parse_day(&since), crate::clock::parse_day(&until).map(|t| t + 86_400));
    let (csrf, new) = csrf_for_page(call.headers());
    let user = &call.session().identity.user;
    let (Some(from), Some(to)) = (from, to) else {
        let problem = Some("Write the dates as YYYY-MM-DD.".to_string());
        let p =
            ReportPage { user, csrf: &csrf, since, until, problem, r: Default::default(), bars: Vec::new(), top: 0 };
        return with_csrf_cookie(html(StatusCode::BAD_REQUEST, &p), &csrf, new);
    };
    let to = to.min(now + 1);
    let reasons: HashMap<String, String> =
        st.mitigation.rule_list().into_iter().map(|(id, _, why)| (id, why)).collect();
    let built =
        blocking(st, move |store| store.with(|c| audit::report::build(c, from, to, |rule| reasons.get(rule).cloned())))
            .await;
    let Some(r) = built else { return unavailable(call) };
    let (bars, top) = bars(&r.timeline, from, to);
    let p = ReportPage { user, csrf: &csrf, since, until, problem: None, r, bars, top };
    with_csrf_cookie(html(StatusCode::OK, &p), &csrf, new)
}
