//! OpenID Connect single sign-on (docs/identity.md): the authorization code flow with PKCE,
//! `state` and `nonce`, provider discovery, ID token validation by the openidconnect crate
//! (signature, issuer, audience, expiry, nonce), and claims mapped to a poort user. Logins in
//! flight are kept in memory for ten minutes and can be completed once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use openidconnect::core::{
    CoreAuthDisplay, CoreAuthenticationFlow, CoreClaimName, CoreClaimType, CoreClient, CoreClientAuthMethod,
    CoreGrantType, CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm, CoreResponseMode,
    CoreResponseType, CoreSubjectIdentifierType,
};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndSessionUrl, EndpointMaybeSet, EndpointNotSet, EndpointSet,
    IssuerUrl, Nonce, PkceCodeChallenge, PkceCodeVerifier, ProviderMetadata, RedirectUrl, Scope, TokenResponse,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::config::auth::Oidc as Settings;
use crate::identity::ldap::map_groups;

/// What discovery adds to the standard metadata: where RP-initiated logout goes.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct LogoutMetadata {
    end_session_endpoint: Option<EndSessionUrl>,
}
impl openidconnect::AdditionalProviderMetadata for LogoutMetadata {}

type Metadata = ProviderMetadata<
    LogoutMetadata,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// Metadata and keys are fetched again after this long (key rotation).
const REDISCOVER_AFTER: Duration = Duration::from_secs(3600);
/// A login must come back from the provider within this many seconds.
pub const PENDING_FOR: i64 = 600;
/// The largest response poort reads from a provider.
const MAX_RESPONSE: usize = 1 << 20;

/// A provider user whose ID token checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderUser {
    /// The name the provider suggests (`username_claim`); the subject decides who it is.
    pub name: String,
    /// `sub`: the provider's stable identifier of the account.
    pub subject: String,
    pub email: Option<String>,
    pub groups: Vec<String>,
    /// The provider says the user gave a second factor, and the config trusts it.
    pub mfa: bool,
    /// Where to send the browser to end the provider's session too, if it supports that.
    pub logout_url: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("the provider could not be reached or answered badly: {0}")]
    Provider(String),
    #[error("unknown, used or expired sign-in state")]
    State,
    #[error("the sign-in started in another browser")]
    Browser,
    #[error("the provider refused: {0}")]
    Refused(String),
    #[error("the ID token is not valid: {0}")]
    Token(String),
    #[error("the provider did not name the user in a usable way")]
    NoName,
    #[error("the user is not allowed to sign in through this provider")]
    NotAllowed,
    #[error("too many sign-ins in flight")]
    Busy,
}

/// A login at its provider, kept by the caller under its `state` until the provider sends the
/// browser back (to any node of a cluster: the portal keeps it in the store).
#[derive(Serialize, Deserialize)]
pub struct Pending {
    provider: String,
    nonce: String,
    verifier: String,
    next: String,
    /// SHA-256 of the browser cookie set when the login started.
    browser: [u8; 32],
}

pub struct Providers {
    list: Vec<Provider>,
    origin: String,
}

struct Provider {
    settings: Settings,
    tls: Arc<rustls::ClientConfig>,
    discovered: tokio::sync::Mutex<Option<(Metadata, Instant)>>,
    /// When keys were last fetched again because a token named a key poort did not know.
    refetched: Mutex<Option<Instant>>,
}

/// At most one fetch of a provider's keys for an unknown key id per this long.
const REFETCH_EVERY: Duration = Duration::from_secs(60);

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.list.iter().map(|p| &p.settings.name)).finish()
    }
}

/// The start of a login: where to send the browser, and the cookie that ties the login to it.
#[derive(Debug)]
pub struct Start {
    pub authorize_url: String,
    pub browser_cookie: String,
    /// The `state` the provider sends back, and what to keep under it until then.
    pub state: String,
    pub pending: Pending,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pending")
    }
}

impl Providers {
    pub fn new(settings: &[Settings], origin: &str) -> anyhow::Result<Providers> {
        let list = settings
            .iter()
            .map(|s| {
                Ok(Provider {
                    tls: crate::identity::client_tls(s.ca_file.as_deref())?,
                    settings: s.clone(),
                    discovered: tokio::sync::Mutex::new(None),
                    refetched: Mutex::new(None),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Providers { list, origin: origin.to_string() })
    }

    /// Fetches every provider's discovery document and keys now (for `poort check --live`).
    pub async fn discover_all(&self) -> Vec<(String, Result<(), Failure>)> {
        let mut out = Vec::new();
        for p in &self.list {
            out.push((p.settings.name.clone(), p.metadata().await.map(|_| ())));
        }
        out
    }

    /// (name, title) of each provider, for the login page.
    pub fn buttons(&self) -> Vec<(String, String)> {
        self.list.iter().map(|p| (p.settings.name.clone(), p.settings.title.clone())).collect()
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|p| p.settings.name == name)
    }

    fn redirect_url(&self, name: &str) -> String {
        format!("{}/.poort/oidc/{name}/callback", self.origin)
    }

    /// Starts a login with provider `name` for `client`; `next` is where the user goes
    /// afterwards.
    pub async fn start(&self, name: &str, next: &str) -> Result<Option<Start>, Failure> {
        let Some(i) = self.find(name) else { return Ok(None) };
        let p = &self.list[i];
        let meta = p.metadata().await?;
        let client = p
            .client(meta)
            .set_redirect_uri(RedirectUrl::new(self.redirect_url(name)).map_err(|e| Failure::Provider(e.to_string()))?);
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut req =
            client.authorize_url(CoreAuthenticationFlow::AuthorizationCode, CsrfToken::new_random, Nonce::new_random);
        for s in p.settings.scopes.iter().filter(|s| *s != "openid") {
            req = req.add_scope(Scope::new(s.clone()));
        }
        let (url, state, nonce) = req.set_pkce_challenge(challenge).url();
        let browser_cookie = crate::secret::b64(&crate::secret::random_bytes::<32>());
        let pending = Pending {
            provider: name.to_string(),
            nonce: nonce.secret().clone(),
            verifier: verifier.secret().clone(),
            next: next.to_string(),
            browser: crate::secret::sha256(browser_cookie.as_bytes()),
        };
        Ok(Some(Start { authorize_url: url.to_string(), browser_cookie, state: state.secret().clone(), pending }))
    }

    /// Completes a login: the state must be one this gateway issued, unused, to this browser;
    /// the code is exchanged (with the PKCE verifier) and the ID token validated. Returns the
    /// user and where they wanted to go.
    pub async fn finish(
        &self,
        name: &str,
        code: &str,
        pending: Pending,
        browser_cookie: Option<&str>,
    ) -> Result<(ProviderUser, String), Failure> {
        // Taken out whatever happens next: a state works once.
        let i = self.find(name).ok_or(Failure::State)?;
        if pending.provider != name {
            return Err(Failure::State);
        }
        let (verifier, nonce) = (PkceCodeVerifier::new(pending.verifier), Nonce::new(pending.nonce));
        let cookie_ok = browser_cookie.is_some_and(|c| {
            subtle::ConstantTimeEq::ct_eq(&crate::secret::sha256(c.as_bytes())[..], &pending.browser[..]).into()
        });
        if !cookie_ok {
            return Err(Failure::Browser);
        }
        let p = &self.list[i];
        let meta = p.metadata().await?;
        let end_session = meta.additional_metadata().end_session_endpoint.clone();
        let client = p
            .client(meta)
            .set_redirect_uri(RedirectUrl::new(self.redirect_url(name)).map_err(|e| Failure::Provider(e.to_string()))?);
        let http = |req| fetch(req, p.tls.clone(), p.settings.timeout);
        let token = client
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .map_err(|e| Failure::Provider(e.to_string()))?
            .set_pkce_verifier(verifier)
            .request_async(&http)
            .await
            .map_err(|e| Failure::Refused(e.to_string()))?;
        let id_token = token.id_token().ok_or_else(|| Failure::Token("the token response has no ID token".into()))?;
        // Signature, issuer, audience, expiry and nonce.
        if let Err(e) = id_token.claims(&client.id_token_verifier(), &nonce) {
            use openidconnect::{ClaimsVerificationError, SignatureVerificationError};
            let unknown_key =
                matches!(e, ClaimsVerificationError::SignatureVerification(SignatureVerificationError::NoMatchingKey));
            if !(unknown_key && p.may_refetch()) {
                return Err(Failure::Token(e.to_string()));
            }
            // The provider rotated its keys since poort fetched them: fetch them once more.
            tracing::info!(provider = name, "An ID token names an unknown key; fetching the provider's keys again");
            let meta = p.rediscover().await?;
            let again = p.client(meta);
            id_token.claims(&again.id_token_verifier(), &nonce).map_err(|e| Failure::Token(e.to_string()))?;
        }
        let raw = id_token.to_string();
        let claims = payload(&raw).ok_or_else(|| Failure::Token("unreadable claims".into()))?;
        let mut user = p.user(&claims)?;
        if p.settings.logout {
            user.logout_url = end_session.map(|url| {
                let mut u = url.url().clone();
                u.query_pairs_mut()
                    .append_pair("id_token_hint", &raw)
                    .append_pair("client_id", &p.settings.client_id)
                    .append_pair("post_logout_redirect_uri", &format!("{}/.poort/login", self.origin));
                u.to_string()
            });
        }
        Ok((user, pending.next))
    }
}

/// A client made from a provider's metadata.
type Client =
    CoreClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointMaybeSet, EndpointMaybeSet>;

impl Provider {
    /// A client of this provider, as `meta` describes it.
    fn client(&self, meta: Metadata) -> Client {
        CoreClient::from_provider_metadata(
            meta,
            ClientId::new(self.settings.client_id.clone()),
            Some(ClientSecret::new(self.settings.client_secret.clone())),
        )
    }

    /// Whether an unknown key id may trigger a fetch of the keys now (rate-limited, so that
    /// tokens with made-up key ids cannot make poort hammer the provider).
    fn may_refetch(&self) -> bool {
        let mut last = self.refetched.lock();
        if last.is_some_and(|t| t.elapsed() < REFETCH_EVERY) {
            return false;
        }
        *last = Some(crate::clock::instant());
        true
    }

    /// Fetches metadata and keys now, whatever is cached.
    async fn rediscover(&self) -> Result<Metadata, Failure> {
        *self.discovered.lock().await = None;
        self.metadata().await
    }

    async fn metadata(&self) -> Result<Metadata, Failure> {
        let mut slot = self.discovered.lock().await;
        if let Some((m, at)) = slot.as_ref()
            && at.elapsed() < REDISCOVER_AFTER
        {
            return Ok(m.clone());
        }
        let issuer = IssuerUrl::new(self.settings.issuer.clone()).map_err(|e| Failure::Provider(e.to_string()))?;
        let http = |req| fetch(req, self.tls.clone(), self.settings.timeout);
        let m = Metadata::discover_async(issuer, &http).await.map_err(|e| Failure::Provider(e.to_string()))?;
        *slot = Some((m.clone(), crate::clock::instant()));
        Ok(m)
    }

    /// The poort user the validated claims describe, if this provider lets them in.
    fn user(&self, claims: &serde_json::Value) -> Result<ProviderUser, Failure> {
        let s = &self.settings;
        let text = |name: &str| claims.get(name).and_then(|v| v.as_str()).map(str::to_string);
        // ASCII only, folded as ASCII: a Unicode fold would make U+212A (Kelvin) a `k`.
        let name = text(&s.username_claim)
            .filter(|n| n.is_ascii())
            .map(|n| n.to_ascii_lowercase())
            .filter(|n| crate::names::valid_user_name(n));
        let name = name.ok_or(Failure::NoName)?;
        let subject = text("sub").filter(|s| !s.is_empty() && s.len() <= 255).ok_or(Failure::NoName)?;
        let verified = claims.get("email_verified").and_then(|v| v.as_bool()).unwrap_or(true);
        let email = text(&s.email_claim).filter(|_| verified);
        let groups: Vec<String> = match claims.get(&s.groups_claim) {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            Some(serde_json::Value::String(g)) => vec![g.clone()],
            _ => Vec::new(),
        };
        let groups = map_groups(&s.group_map, &groups);
        let by_group = !s.allowed_groups.is_empty() && groups.iter().any(|g| s.allowed_groups.contains(g));
        let domain = email.as_deref().and_then(|e| e.rsplit_once('@')).map(|(_, d)| d.to_lowercase());
        let by_domain = domain.is_some_and(|d| s.allowed_email_domains.contains(&d));
        let open = s.allowed_groups.is_empty() && s.allowed_email_domains.is_empty();
        if !(open || by_group || by_domain) {
            return Err(Failure::NotAllowed);
        }
        let amr: Vec<&str> = match claims.get("amr") {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
            _ => Vec::new(),
        };
        let acr = claims.get("acr").and_then(|v| v.as_str());
        let mfa = s.trust_mfa
            && (amr.iter().any(|a| s.mfa_amr.iter().any(|m| m == a))
                || acr.is_some_and(|a| s.mfa_acr.iter().any(|m| m == a)));
        Ok(ProviderUser { name, subject, email, groups, mfa, logout_url: None })
    }
}

/// The claims of a compact JWT (only after its signature has been checked).
fn payload(jwt: &str) -> Option<serde_json::Value> {
    let middle = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(middle).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HttpError(String);

/// One HTTP/1.1 request to a provider, over TLS for https URLs, with a time limit and a size
/// limit on the answer.
async fn fetch(
    req: openidconnect::HttpRequest,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<openidconnect::HttpResponse, HttpError> {
    tokio::time::timeout(timeout, fetch_inner(req, tls))
        .await
        .map_err(|_| HttpError("the provider did not answer in time".into()))?
}

async fn fetch_inner(
    req: openidconnect::HttpRequest,
    tls: Arc<rustls::ClientConfig>,
) -> Result<openidconnect::HttpResponse, HttpError> {
    crate::tls_client::exchange(req, tls, MAX_RESPONSE).await.map_err(HttpError)
}
