//! Certificates from an ACME CA (RFC 8555; Let's Encrypt and others): one per host poort
//! serves (the portal's and each host-routed app's), proved by HTTP-01 on the plain-HTTP
//! listener, kept in the data folder and renewed before they expire, and served to new
//! connections as soon as they arrive (`certs::Certs::install`). Until a host has its
//! certificate, it gets the default one.
//!
//! The ACME conversation is the `instant-acme` crate's; its HTTPS goes through poort's own
//! TLS client (`tls_client`), so that a private ACME CA can be trusted by a CA file.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType, HttpClient,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use parking_lot::RwLock;

use crate::certs::Certs;
use crate::clock::{Clock, UnixTime};
use crate::config::AcmeSettings;

/// HTTP-01 answers waiting for the CA: token to key authorization. The plain-HTTP listener
/// serves them at `/.well-known/acme-challenge/TOKEN`.
#[derive(Debug, Default)]
pub struct Challenges(RwLock<HashMap<String, String>>);

impl Challenges {
    /// The answer for `token`, while an order waits for it.
    pub fn answer(&self, token: &str) -> Option<String> {
        self.0.read().get(token).cloned()
    }
}

/// Where the HTTP-01 answers are asked for.
pub const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// How often to look whether a certificate is due, and how long to wait after a failure (a
/// public CA allows about five failed checks of a name per hour).
const CHECK_EVERY: Duration = Duration::from_secs(3600);
const RETRY_AFTER: Duration = Duration::from_secs(900);

pub struct Acme {
    settings: AcmeSettings,
    /// The hosts to hold certificates for.
    names: Vec<String>,
    /// `DATA_DIR/acme`: the account, and NAME.pem, NAME.key per host.
    dir: PathBuf,
    certs: Arc<Certs>,
    challenges: Arc<Challenges>,
    clock: Arc<dyn Clock>,
}

impl Acme {
    pub fn new(
        settings: AcmeSettings,
        names: Vec<String>,
        data_dir: &std::path::Path,
        certs: Arc<Certs>,
        challenges: Arc<Challenges>,
        clock: Arc<dyn Clock>,
    ) -> Acme {
        Acme { settings, names, dir: data_dir.join("acme"), certs, challenges, clock }
    }

    fn files(&self, name: &str) -> (PathBuf, PathBuf) {
        (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}.key")))
    }

    /// Serves the certificates obtained before (in the data folder) that still load.
    pub fn load_existing(&self) {
        for name in &self.names {
            let (cert, key) = self.files(name);
            let read =
                |p: &std::path::Path| crate::tls_client::read_pem(p).map(|b| String::from_utf8_lossy(&b).into_owned());
            let (Ok(chain), Ok(key)) = (read(&cert), read(&key)) else {
                continue;
            };
            if let Err(e) = self.certs.install(name, &chain, &key) {
                tracing::warn!(host = %name, error = %format!("{e:#}"), "A stored ACME certificate does not load; a new one will be ordered");
            }
        }
    }

    /// Obtains and renews certificates until `stop` resolves.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut account = None;
        loop {
            let mut failed = false;
            for name in &self.names {
                if !self.due(name) {
                    continue;
                }
                let result = async {
                    if account.is_none() {
                        account = Some(self.account().await?);
                    }
                    let account = account.as_ref().context("invariant: the account was just made")?;
                    self.obtain(account, name).await
                };
                match result.await {
                    Ok(()) => tracing::info!(host = %name, "Obtained a certificate by ACME; new connections get it"),
                    Err(e) => {
                        failed = true;
                        tracing::error!(host = %name, error = %format!("{e:#}"), "Obtaining a certificate by ACME failed; trying again later");
                    }
                }
            }
            let wait = if failed { RETRY_AFTER } else { CHECK_EVERY };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = &mut stop => return,
            }
        }
    }

    /// Whether `name` needs a certificate: none stored, or one that ends within `renew_before`.
    fn due(&self, name: &str) -> bool {
        let (cert, _) = self.files(name);
        let Ok(pem) = crate::tls_client::read_pem(&cert) else { return true };
        let Some((start, end)) = validity(&pem) else { return true };
        // Renewed `renew_before` ahead of its end, or at two thirds of its life when that is
        // shorter (a short-lived certificate would otherwise be due from the start).
        let ahead = (self.settings.renew_before.as_secs() as i64).min((end - start) / 3);
        end - self.clock.now() < ahead
    }

    /// The ACME account: the one stored for this CA, or a new one.
    async fn account(&self) -> anyhow::Result<Account> {
        {
            use std::os::unix::fs::DirBuilderExt;
            let made = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir);
            made.with_context(|| format!("creating {}", self.dir.display()))?;
        }
        let path = self.dir.join("account.json");
        let http = || -> anyhow::Result<Box<dyn HttpClient>> { Ok(Box::new(Https::new(&self.settings)?)) };
        if let Ok(text) = std::fs::read(&path)
            && let Ok(stored) = serde_json::from_slice::<Stored>(&text)
            && stored.directory == self.settings.directory
        {
            let account = Account::builder_with_http(http()?).from_credentials(stored.credentials).await;
            match account {
                Ok(a) => return Ok(a),
                Err(e) => tracing::warn!(error = %e, "The stored ACME account is not usable; making a new one"),
            }
        }
        let contact: Vec<String> = self.settings.email.iter().map(|e| format!("mailto:{e}")).collect();
        let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
        let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
        let (account, credentials) = Account::builder_with_http(http()?)
            .create(&new, self.settings.directory.clone(), None)
            .await
            .with_context(|| format!("registering with the ACME CA at {}", self.settings.directory))?;
        let stored = Stored { directory: self.settings.directory.clone(), credentials };
        crate::secret::replace_private(&path, serde_json::to_string(&stored)?.as_bytes())?;
        Ok(account)
    }

    /// Orders a certificate for `name`, answers its HTTP-01 challenge, stores and serves it.
    async fn obtain(&self, account: &Account, name: &str) -> anyhow::Result<()> {
        let ids = [Identifier::Dns(name.to_string())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await.context("placing the order")?;
        let mut tokens = Vec::new();
        let answered = async {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz.context("reading the order's authorization")?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => bail!("the CA's authorization is {other:?}"),
                }
                let mut challenge =
                    authz.challenge(ChallengeType::Http01).context("the CA offers no HTTP-01 challenge")?;
                let answer = challenge.key_authorization().as_str().to_string();
                self.challenges.0.write().insert(challenge.token.clone(), answer);
                tokens.push(challenge.token.clone());
                challenge.set_ready().await.context("telling the CA the challenge is ready")?;
            }
            let retry = RetryPolicy::default().timeout(Duration::from_secs(60));
            let status = order.poll_ready(&retry).await.context("waiting for the CA to check the challenge")?;
            if status != OrderStatus::Ready {
                bail!("the CA did not accept the challenge (order {status:?})");
            }
            let key = order.finalize().await.context("finalizing the order")?;
            let chain = order.poll_certificate(&retry).await.context("fetching the certificate")?;
            Ok((chain, key))
        }
        .await;
        {
            let mut pending = self.challenges.0.write();
            for t in &tokens {
                pending.remove(t);
            }
        }
        let (chain, key) = answered?;
        if !names(&chain, name) {
            bail!("the CA's certificate does not name {name}");
        }
        self.certs.install(name, &chain, &key).context("the CA's certificate does not load")?;
        // Key first, then the certificate: a crash between them leaves a certificate that does
        // not fit its key, which is not loaded at the next start and so ordered again.
        let (cert_path, key_path) = self.files(name);
        crate::secret::replace_private(&key_path, key.as_bytes())?;
        crate::secret::replace_private(&cert_path, chain.as_bytes())?;
        Ok(())
    }
}

/// The account as kept on disk, with the CA it belongs to.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    directory: String,
    credentials: AccountCredentials,
}

/// When the first certificate of a PEM chain begins and ends, in Unix seconds.
fn validity(pem: &[u8]) -> Option<(UnixTime, UnixTime)> {
    use rustls::pki_types::pem::PemObject;
    use x509_cert::der::Decode;
    let der = rustls::pki_types::CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    let cert = x509_cert::Certificate::from_der(&der).ok()?;
    let v = cert.tbs_certificate().validity();
    let secs = |t: &x509_cert::time::Time| t.to_unix_duration().as_secs() as UnixTime;
    Some((secs(&v.not_before), secs(&v.not_after)))
}

/// Whether the leaf of `chain` (PEM) names `name` exactly: a CA's answer is checked against
/// what was ordered.
fn names(chain: &str, name: &str) -> bool {
    use rustls::pki_types::pem::PemObject;
    let Some(Ok(der)) = rustls::pki_types::CertificateDer::pem_slice_iter(chain.as_bytes()).next() else {
        return false;
    };
    webpki::EndEntityCert::try_from(&der).is_ok_and(|c| c.valid_dns_names().any(|n| n.eq_ignore_ascii_case(name)))
}

/// The ACME client's HTTPS, over poort's TLS client: one connection per request, bounded.
struct Https {
    tls: Arc<rustls::ClientConfig>,
}

impl Https {
    fn new(settings: &AcmeSettings) -> anyhow::Result<Https> {
        use crate::tls_client::{Trust, config};
        let trust = settings.ca_file.clone().map_or(Trust::SystemRoots, Trust::CaFile);
        Ok(Https { tls: config(&trust, None, &[b"http/1.1"])? })
    }
}

type Boxed = Box<dyn std::error::Error + Send + Sync>;

impl HttpClient for Https {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let tls = self.tls.clone();
        Box::pin(async move { send(tls, req).await.map_err(instant_acme::Error::Other) })
    }
}

async fn send(tls: Arc<rustls::ClientConfig>, req: Request<BodyWrapper<Bytes>>) -> Result<BytesResponse, Boxed> {
    let limit = Duration::from_secs(30);
    let (mut parts, body) = req.into_parts();
    if parts.uri.scheme_str() != Some("https") {
        return Err(format!("the ACME CA must be reached over https, not {}", parts.uri).into());
    }
    let host = parts.uri.host().ok_or("an ACME URL without a host")?.to_string();
    let port = parts.uri.port_u16().unwrap_or(443);
    let authority = parts.uri.authority().ok_or("an ACME URL without a host")?.as_str().to_string();
    let tcp = tokio::time::timeout(limit, tokio::net::TcpStream::connect((host.as_str(), port))).await??;
    let name = crate::tls_client::server_name(&host)?;
    let stream = tokio::time::timeout(limit, tokio_rustls::TlsConnector::from(tls).connect(name, tcp)).await??;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    parts.uri = parts.uri.path_and_query().map_or("/", |p| p.as_str()).parse()?;
    parts.headers.insert(http::header::HOST, authority.parse()?);
    let resp = tokio::time::timeout(limit, sender.send_request(Request::from_parts(parts, body))).await??;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(limit, Limited::new(body, 1 << 20).collect()).await?.map_err(|e| e as Boxed)?;
    Ok(BytesResponse { parts, body: Box::new(body.to_bytes()) })
}

/// The hosts `cfg` serves over TLS that a public CA can certify: the portal's and each
/// host-routed app's, without addresses, single-label names and `localhost` names.
pub fn hosts(cfg: &crate::config::Config) -> Vec<String> {
    let apps = cfg.apps.iter().filter_map(|a| match &a.route {
        crate::config::Route::Host(h) => Some(h),
        _ => None,
    });
    let mut out: Vec<String> = Vec::new();
    for h in std::iter::once(&cfg.server.portal_host).chain(apps) {
        // A public name ends in a label with a letter that is not a hex number: `10.1` and
        // `0x7f.1` are addresses to a browser.
        let last = h.rsplit('.').next().unwrap_or_default();
        let certifiable = h.contains('.')
            && last.bytes().any(|b| b.is_ascii_alphabetic())
            && !last.starts_with("0x")
            && h.parse::<std::net::IpAddr>().is_err()
            && !h.starts_with('[')
            && h != "localhost"
            && !h.ends_with(".localhost");
        if certifiable && !out.contains(h) {
            out.push(h.clone());
        }
    }
    out
}
