//! Single sign-on pages: `/.poort/oidc/NAME/start` sends the browser to the provider,
//! `/.poort/oidc/NAME/callback` takes it back, checks everything (identity::oidc) and opens a
//! session for the user the provider named.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::{Call, SignedIn, open_session};
use crate::audit::Event;
use crate::body::Body;
use crate::identity::oidc::{Failure, PENDING_FOR, Pending, Start};
use crate::respond::{error_page, redirect};
use crate::session::{Factor, Factors, cookie};
use crate::state::{Ctx, State};
use crate::store::{Store, Synced, flows};

/// `/.poort/oidc/NAME/ACTION`.
pub async fn serve(st: &State, call: Call) -> Response<Body> {
    let (ctx, req) = (call.ctx, call.head);
    let Some((name, action)) = call.rest.split_once('/') else {
        return error_page(StatusCode::NOT_FOUND, ctx.id);
    };
    let query: Vec<(String, String)> =
        form_urlencoded::parse(ctx.front.target.query().unwrap_or("").as_bytes()).into_owned().collect();
    let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    match action {
        "start" => start(st, &ctx, name, param("next").unwrap_or("")).await,
        "callback" => {
            let browser =
                cookie::find(req.headers.get_all(header::COOKIE).iter().map(|v| v.as_bytes()), cookie::SSO_COOKIE);
            let browser = browser.map(str::to_string);
            match (param("code"), param("state"), param("error")) {
                (_, _, Some(error)) => {
                    let why = format!("the provider answered {}", error.chars().take(64).collect::<String>());
                    failed(st, &ctx, name, &Failure::Refused(why)).await
                }
                (Some(code), Some(state), None) => {
                    let (code, state) = (code.to_string(), state.to_string());
                    callback(st, ctx, name, &code, &state, browser.as_deref()).await
                }
                _ => failed(st, &ctx, name, &Failure::State).await,
            }
        }
        _ => error_page(StatusCode::NOT_FOUND, ctx.id),
    }
}

/// Logins in flight at most, and logins started per client address and minute. When full,
/// new ones are refused: nobody's login in flight is pushed out by someone else's.
const MAX_PENDING: i64 = 10_000;
const MAX_STARTS_PER_CLIENT: i64 = 16;

async fn start(st: &State, ctx: &Ctx, name: &str, next: &str) -> Response<Body> {
    let started = match st.oidc.start(name, next).await {
        Ok(Some(s)) => keep(st, ctx, s).await,
        other => other,
    };
    match started {
        Ok(Some(s)) => {
            let mut resp = redirect(StatusCode::FOUND, &s.authorize_url);
            if let Ok(v) = HeaderValue::from_str(&cookie::set_sso(&s.browser_cookie)) {
                resp.headers_mut().append(header::SET_COOKIE, v);
            }
            resp
        }
        Ok(None) => error_page(StatusCode::NOT_FOUND, ctx.id),
        Err(e) => failed(st, ctx, name, &e).await,
    }
}

/// Keeps a login at its provider in the store, where any node finds it when the browser comes
/// back; refused when too many are in flight, or this address started too many this minute.
async fn keep(st: &State, ctx: &Ctx, s: Start) -> Result<Option<Start>, Failure> {
    let (now, client) = (st.clock.now(), format!("sso {}", ctx.client));
    let stored = st
        .store
        .run(move |c| {
            if flows::count(c, flows::SSO, now)? >= MAX_PENDING
                || flows::attempt(c, &client, now)? > MAX_STARTS_PER_CLIENT
            {
                return Ok(None);
            }
            Ok(flows::put(c, flows::SSO, &s.state, &s.pending, now + PENDING_FOR)?.then_some(s))
        })
        .await
        .map_err(|e| Failure::Provider(format!("the store did not answer: {e:#}")))?;
    stored.map(Some).ok_or(Failure::Busy)
}

async fn callback(st: &State, ctx: Ctx, name: &str, code: &str, state: &str, browser: Option<&str>) -> Response<Body> {
    // Taken out whatever happens next: a state works once, on whichever node.
    let (key, now) = (state.to_string(), st.clock.now());
    let pending = match st.store.run(move |c| flows::take::<Pending>(c, flows::SSO, &key, now)).await {
        Ok(Some(p)) => p,
        Ok(None) => return failed(st, &ctx, name, &Failure::State).await,
        Err(_) => return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id),
    };
    let (user, next) = match st.oidc.finish(name, code, pending, browser).await {
        Ok(v) => v,
        Err(e) => return failed(st, &ctx, name, &e).await,
    };
    let source = format!("oidc:{name}");
    if !may_claim(st, &source, &user).await {
        tracing::warn!(user = %user.name, provider = name, "A provider user claims a name the directory holds");
        return failed(st, &ctx, name, &Failure::NotAllowed).await;
    }
    let (now, u) = (st.clock.now(), user.clone());
    let synced = st
        .store
        .run(move |c| Store::sync_external(c, &u.name, Some(&u.subject), u.email.as_deref(), &source, &u.groups, now))
        .await;
    let user = match synced {
        Ok(Synced::Yes(poort_name)) => crate::identity::oidc::ProviderUser { name: poort_name, ..user },
        Ok(refused) => {
            tracing::warn!(user = %user.name, provider = name, why = ?refused, "A provider user was refused the name it claims");
            return failed(st, &ctx, name, &Failure::NotAllowed).await;
        }
        Err(e) => {
            tracing::error!(error = %e, "Recording a provider user failed");
            return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
        }
    };
    tracing::info!(user = %user.name, provider = name, mfa = user.mfa, "Single sign-on succeeded");
    let factors = if user.mfa { Factors::of(&[Factor::Ext, Factor::Mfa]) } else { Factors::of(&[Factor::Ext]) };
    let signed_in = SignedIn {
        user: &user.name,
        factors,
        user_agent: format!("sso:{name}"),
        next: &next,
        logout_url: user.logout_url.clone(),
    };
    let mut resp = open_session(st, &ctx, signed_in).await;
    if let Ok(v) = HeaderValue::from_str(&cookie::clear_sso()) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

/// Whether a provider account may take the poort name it claims for the first time: not if
/// the directory knows that name (its user would otherwise be locked out of their own name).
/// An account already recorded keeps its name.
async fn may_claim(st: &State, source: &str, user: &crate::identity::oidc::ProviderUser) -> bool {
    let (src, sub, name) = (source.to_string(), user.subject.clone(), user.name.clone());
    let known = st
        .store
        .run(move |c| Ok(Store::user_by_subject(c, &src, &sub)?.is_some() || Store::user_source(c, &name)?.is_some()))
        .await;
    match (known, &st.directory) {
        (Ok(true), _) | (Ok(false), None) => true,
        (Ok(false), Some(dir)) => match dir.lookup(&user.name).await {
            Err(crate::identity::ldap::Refusal::Wrong) => true,
            // Found, or the directory cannot say: refuse rather than guess.
            _ => false,
        },
        (Err(_), _) => false,
    }
}

/// A failed single sign-on: audited with the reason, a short page for the user.
async fn failed(st: &State, ctx: &Ctx, name: &str, why: &Failure) -> Response<Body> {
    tracing::warn!(provider = name, client = %ctx.client, reason = %why, "Single sign-on failed");
    let ev = Event::LoginFailed {
        user: format!("(oidc:{})", name.chars().take(64).collect::<String>()),
        client: ctx.client,
    };
    st.audit.note(ev).await;
    let (status, message) = match why {
        Failure::Provider(_) => (
            StatusCode::BAD_GATEWAY,
            "The sign-in service could not be reached. Try again in a few minutes, or sign in with a password.",
        ),
        Failure::NotAllowed => (StatusCode::FORBIDDEN, "Your account may not sign in to this gateway."),
        Failure::Busy => {
            (StatusCode::TOO_MANY_REQUESTS, "Too many sign-ins are in progress. Wait a minute and try again.")
        }
        _ => (StatusCode::BAD_REQUEST, "Single sign-on did not complete. Start again from the sign-in page."),
    };
    let html = crate::respond::render_error(status.as_u16(), "Sign-in failed", message, &ctx.id.to_string());
    let mut resp = crate::respond::page(status, "text/html; charset=utf-8", html);
    if let Ok(v) = HeaderValue::from_str(&cookie::clear_sso()) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

/// The provider's logout address for a session that came from single sign-on.
pub async fn logout_url(st: &State, session: &str) -> Option<String> {
    let id = session.to_string();
    st.store.run(move |c| Store::logout_url(c, &id)).await.ok().flatten()
}
