//! Signing in, as every way of signing in shares it: the per-address attempt limit, the
//! password check against the local store or the directory, the per-account lockout that
//! settles each attempt, opening a session (and asking for a second factor where one is
//! required), and renewing one when a factor or the password is proved again. The password
//! form, the second-factor forms, passkeys and single sign-on all go through here.

use std::net::IpAddr;

use http::{Response, StatusCode};

use super::*;
use crate::audit::Event;
use crate::body::Body;
use crate::identity::mfa::{self, Lock};
use crate::identity::password;
use crate::names::valid_user_name;
use crate::session::{Factors, Kind, NewToken, Opening, Proof, Session};
use crate::state::{Ctx, State};
use crate::store::Store;

/// Whether this address may make another sign-in attempt (any factor) now; None when the
/// store, which counts attempts for every node, did not answer.
pub(crate) async fn attempt_allowed(st: &State, client: IpAddr) -> Option<bool> {
    let ok = st.signins.may_try(&st.store, client, st.clock.now()).await;
    if ok == Some(false) {
        tracing::warn!(client = %client, "Sign-in attempts rate-limited");
    }
    ok
}

/// The outcome of a password check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PasswordCheck {
    /// Right; the user's poort name (a directory may spell it differently than typed).
    Right(String),
    /// Wrong password, unknown, locked or disabled user, or not allowed to sign in.
    Wrong,
    /// The directory that holds the user did not answer.
    DirectoryDown,
}

/// As `check_password`, telling a directory outage apart. Local accounts are checked first
/// (by their exact name); a name poort does not know as a local account goes to the
/// directory, if one is configured, which names the account: lockouts count on that name,
/// however the user typed it.
pub(crate) async fn password_check(st: &State, user: &str, pw: &str, client: IpAddr) -> PasswordCheck {
    if !valid_user_name(user) {
        let pw = pw.to_string();
        let _ = tokio::task::spawn_blocking(move || password::verify_dummy(&pw)).await;
        return PasswordCheck::Wrong;
    }
    let now = st.clock.now();
    let name = user.to_string();
    let (locked, hash, source) = st
        .store
        .run(move |c| {
            Ok((
                mfa::locked(c, &name, Lock::Password, now)?,
                Store::password_hash(c, &name)?,
                Store::user_source(c, &name)?,
            ))
        })
        .await
        .unwrap_or((true, None, None));
    let directory_user = match &source {
        None => true,
        Some((s, _)) => s == "ldap",
    };
    let (outcome, counted_on) = match (&st.directory, hash) {
        (Some(dir), None) if directory_user => directory_check(st, dir, user, pw, client).await,
        (_, hash) => {
            let pw = pw.to_string();
            let ok = tokio::task::spawn_blocking(move || match (locked, hash) {
                (false, Some(h)) => password::verify(&pw, &h),
                _ => {
                    password::verify_dummy(&pw);
                    false
                }
            })
            .await
            .unwrap_or(false);
            let outcome = if ok { PasswordCheck::Right(user.to_string()) } else { PasswordCheck::Wrong };
            (outcome, user.to_string())
        }
    };
    // An outage is not the user's fault: it does not count towards a lock.
    if outcome != PasswordCheck::DirectoryDown {
        let right = matches!(outcome, PasswordCheck::Right(_));
        if !settle(st, &counted_on, Lock::Password, right, client).await && right {
            // Locked while this check ran (guesses sent at once with it).
            return PasswordCheck::Wrong;
        }
    }
    outcome
}

/// Records the outcome of one check of a password or a factor (`lock`) for the lockout,
/// auditing a lock. True only for a success that stands: not when the account was locked
/// while the check ran, nor when the store could not record it.
pub(crate) async fn settle(st: &State, user: &str, lock: Lock, ok: bool, client: IpAddr) -> bool {
    let (name, now, policy) = (user.to_string(), st.clock.now(), st.cfg.login.lock);
    let result = st
        .store
        .run(move |c| {
            if ok {
                mfa::succeeded(c, &name, lock, now).map(|stands| (stands, None))
            } else {
                mfa::record_failure(c, policy, &name, lock, now).map(|locked| (false, locked))
            }
        })
        .await;
    match result {
        Ok((_, Some((failures, until)))) => {
            tracing::warn!(user = %user, failures, lock = lock.as_str(), "Account locked");
            let ev =
                Event::AccountLocked { user: user.to_string(), lock: lock.as_str().into(), failures, until, client };
            st.audit.note(ev).await;
            false
        }
        Ok((stands, None)) => stands,
        Err(e) => {
            tracing::error!(error = %e, "Recording a sign-in outcome failed");
            false
        }
    }
}

/// Replaces the session with one that records `proof` and audits it; returns the new session
/// id and cookie value.
pub(crate) async fn renew_session(st: &State, s: &Session, proof: Proof, ctx: &Ctx) -> Option<(String, String)> {
    let (id, token) = match st.sessions.renew(s, proof, &st.cfg.server.portal_host).await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "Renewing a session failed");
            return None;
        }
    };
    let factor = match proof {
        Proof::Factor(f) => f.amr(),
        Proof::Password => Factor::Pwd.amr(),
    };
    let ev = Event::MfaSucceeded {
        user: s.identity.user.clone(),
        session: id.clone(),
        factor: factor.into(),
        client: ctx.client,
    };
    if let Err(e) = st.audit.record(ev).await {
        tracing::error!(error = %e, "Audit unavailable; ending the new session");
        let _ = st.sessions.end(&id).await;
        return None;
    }
    Some((id, token.cookie_value))
}

/// Whether `user` may still sign in during a lockdown (a member of the admin group).
pub(crate) async fn lockdown_admin(st: &State, user: &str) -> bool {
    if !valid_user_name(user) {
        return false;
    }
    let (name, group) = (user.to_string(), st.mitigation.admin_group.clone());
    st.store
        .run(move |c| crate::store::Store::identity(c, &name))
        .await
        .ok()
        .flatten()
        .is_some_and(|id| id.groups.contains(&group))
}

/// Opens the session for a sign-in: a new token (a session the browser already had ends
/// here), audited before it is handed out. None when it could not be made or recorded.
pub(crate) async fn start_session(st: &State, ctx: &Ctx, s: &SignedIn<'_>) -> Option<(String, NewToken)> {
    if let Some(old) = &ctx.session {
        let _ = st.sessions.end(&old.id).await;
    }
    let client = ctx.client;
    let created = st
        .sessions
        .open(Opening {
            user: s.user,
            host: &st.cfg.server.portal_host,
            client_addr: client.to_string(),
            user_agent: s.user_agent.clone(),
            factors: s.factors,
            kind: Kind::Browser,
            approved_by: None,
        })
        .await;
    let (id, token) = match created {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "Creating a session failed");
            return None;
        }
    };
    if let Some(url) = s.logout_url.clone() {
        let sid = id.clone();
        if let Err(e) = st.store.run(move |c| crate::store::Store::set_logout_url(c, &sid, &url)).await {
            tracing::warn!(error = %e, "Recording the provider's logout address failed");
        }
    }
    if let Err(e) =
        st.audit.record(Event::LoginSucceeded { user: s.user.to_string(), session: id.clone(), client }).await
    {
        tracing::error!(error = %e, "Audit unavailable; ending the new session");
        let _ = st.sessions.end(&id).await;
        return None;
    }
    tracing::info!(user = %s.user, session = %id, factors = %s.factors, "Login succeeded");
    Some((id, token))
}

/// Opens the session for a sign-in (`start_session`) and sends the user on; with `[mfa]
/// required`, a user with a second factor on file gives it first, unless the sign-in already
/// included one.
pub(crate) async fn open_session(st: &State, ctx: &Ctx, s: SignedIn<'_>) -> Response<Body> {
    let Some((_, token)) = start_session(st, ctx, &s).await else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
    };
    let ask_factor = !s.factors.second_factor() && st.cfg.mfa.required && {
        let name = s.user.to_string();
        st.store.run(move |c| crate::identity::mfa::factors(c, &name)).await.is_ok_and(|f| f.any())
    };
    let mut resp = if ask_factor {
        let q = form_urlencoded::Serializer::new(String::new()).append_pair("next", s.next).finish();
        redirect(StatusCode::SEE_OTHER, &format!("{}/.poort/mfa?{q}", st.cfg.server.external_origin))
    } else {
        go_to(st, safe_next(s.next, &st.cfg))
    };
    if let Ok(v) = HeaderValue::from_str(&cookie::set_session(&token.cookie_value)) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

/// A sign-in that succeeded: by password, at an identity provider, or with a passkey.
pub(crate) struct SignedIn<'a> {
    pub user: &'a str,
    pub factors: Factors,
    pub user_agent: String,
    pub next: &'a str,
    /// Where signing out also ends the provider's session.
    pub logout_url: Option<String>,
}

/// Checks a password with the lockout applied: a locked or unknown account costs the same
/// hashing work and gets the same `false` as a wrong password. Failures count towards the
/// lock; a success clears the count.
pub(crate) async fn check_password(st: &State, user: &str, pw: &str, client: IpAddr) -> bool {
    matches!(password_check(st, user, pw, client).await, PasswordCheck::Right(_))
}

/// Checks the password in the directory, under the lock of the name the directory gives the
/// account, and records the user as the directory sees them. Returns the outcome and the name
/// the attempt counts on.
async fn directory_check(
    st: &State,
    dir: &crate::identity::ldap::Directory,
    user: &str,
    pw: &str,
    client: IpAddr,
) -> (PasswordCheck, String) {
    use crate::identity::ldap::Refusal;
    let typed = user.to_ascii_lowercase();
    let found = match dir.lookup(user).await {
        Ok(f) => f,
        Err(Refusal::Unavailable(why)) => {
            tracing::error!(error = %why, client = %client, "The directory is unavailable; sign-in refused");
            return (PasswordCheck::DirectoryDown, typed);
        }
        Err(why) => {
            tracing::info!(user = %user, reason = %why, "Directory sign-in refused");
            let pw = pw.to_string();
            let _ = tokio::task::spawn_blocking(move || password::verify_dummy(&pw)).await;
            return (PasswordCheck::Wrong, typed);
        }
    };
    let (now, name) = (st.clock.now(), found.name.clone());
    let state =
        st.store.run(move |c| Ok((mfa::locked(c, &name, Lock::Password, now)?, Store::user_source(c, &name)?))).await;
    let usable = match state {
        Ok((false, None)) => true,
        Ok((false, Some((source, disabled)))) => source == "ldap" && !disabled,
        _ => false,
    };
    if !usable {
        let pw = pw.to_string();
        let _ = tokio::task::spawn_blocking(move || password::verify_dummy(&pw)).await;
        return (PasswordCheck::Wrong, found.name);
    }
    match dir.verify(&found, user, pw).await {
        Ok(du) => {
            let (now, synced) = (st.clock.now(), du.clone());
            let result = st
                .store
                .run(move |c| {
                    Store::sync_external(c, &synced.name, None, synced.email.as_deref(), "ldap", &synced.groups, now)
                })
                .await;
            let outcome = match result {
                Ok(crate::store::Synced::Yes(name)) => PasswordCheck::Right(name),
                Ok(refused) => {
                    tracing::warn!(user = %du.name, why = ?refused, "A directory user was refused its name");
                    PasswordCheck::Wrong
                }
                Err(e) => {
                    tracing::error!(error = %e, "Recording a directory user failed");
                    PasswordCheck::Wrong
                }
            };
            (outcome, found.name)
        }
        Err(Refusal::Unavailable(why)) => {
            tracing::error!(error = %why, client = %client, "The directory is unavailable; sign-in refused");
            (PasswordCheck::DirectoryDown, found.name)
        }
        Err(why) => {
            tracing::info!(user = %user, reason = %why, "Directory sign-in refused");
            (PasswordCheck::Wrong, found.name)
        }
    }
}
