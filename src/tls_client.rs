//! poort as a TLS client: of apps served over HTTPS, of directories and identity providers,
//! and (the command line) of the gateway itself. One place decides what a certificate must be
//! to be trusted: issued under the system's roots, under an operator's CA file, or exactly
//! the certificate whose SHA-256 is pinned. Skipping the check is possible only by name
//! (`Trust::Anything`), and the caller is expected to say so loudly.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// What a server's certificate must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Issued under the operating system's trust store (where an organisation's own CA is
    /// usually installed), for the server's name.
    SystemRoots,
    /// Issued under the roots compiled into poort (the public web PKI), for the server's name.
    PublicRoots,
    /// Issued under one of the CAs in this PEM file, for the server's name.
    CaFile(PathBuf),
    /// Exactly the certificate with this SHA-256 (of its DER form); its name and issuer do
    /// not matter. Handshake signatures are still checked against it.
    Pinned([u8; 32]),
    /// Any certificate at all. Only for an app whose network is trusted anyway.
    Anything,
}

/// A client certificate and key (PEM files), for servers that ask for one (mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS settings for connections that trust by `trust`, present `client` if set, and offer
/// the ALPN protocols `alpn` (none when empty).
pub fn config(trust: &Trust, client: Option<&ClientCert>, alpn: &[&[u8]]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = provider();
    let builder =
        rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match trust {
        Trust::Pinned(digest) => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(Verifier::pinned(*digest, provider)))
        }
        Trust::Anything => builder.dangerous().with_custom_certificate_verifier(Arc::new(Verifier::anything(provider))),
        Trust::SystemRoots | Trust::PublicRoots | Trust::CaFile(_) => builder.with_root_certificates(roots(trust)?),
    };
    let mut cfg = match client {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let certs = read_certs(&c.cert)?;
            let key = read_key(&c.key)?;
            builder.with_client_auth_cert(certs, key).context("the client certificate and key do not fit together")?
        }
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

fn roots(trust: &Trust) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    match trust {
        Trust::CaFile(path) => {
            for cert in read_certs(path)? {
                roots.add(cert).with_context(|| format!("{} holds a certificate that is no CA", path.display()))?;
            }
        }
        Trust::SystemRoots => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                bail!("the system's trust store holds no certificate (install ca-certificates, or name a CA file)");
            }
        }
        _ => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(roots)
}

/// The certificates in a PEM file; an error if it has none.
pub fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(certs)
}

/// The most a certificate, key or CA file may hold.
const MAX_PEM: u64 = 1 << 20;

/// A PEM file an operator names: a regular file of at most 1 MiB.
pub fn read_pem(path: &Path) -> anyhow::Result<Vec<u8>> {
    crate::secret::read_regular(path, MAX_PEM).with_context(|| format!("reading {}", path.display()))
}

/// The private key in a PEM file.
pub fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(&read_pem(path)?)
        .with_context(|| format!("reading the private key from {}", path.display()))
}

/// `AA:BB:...` or plain hex, either case, optionally after `sha256:`, to 32 bytes.
pub fn parse_fingerprint(s: &str) -> anyhow::Result<[u8; 32]> {
    let s = s.strip_prefix("sha256:").or_else(|| s.strip_prefix("SHA256:")).unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.is_ascii() {
        bail!("a certificate fingerprint is the SHA-256 of the certificate: 32 bytes of hex (64 digits)");
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).context("the fingerprint is not hex")?;
    }
    Ok(out)
}

/// The name a server is checked against: a DNS name or an IP address, brackets removed.
/// One HTTP/1.1 request to an http or https URL (TLS by `tls`), with its answer's body cut
/// off at `limit` bytes. The caller bounds the time.
pub async fn exchange(
    req: http::Request<Vec<u8>>,
    tls: Arc<rustls::ClientConfig>,
    limit: usize,
) -> Result<http::Response<Vec<u8>>, String> {
    use http_body_util::{BodyExt, Full, Limited};
    use hyper_util::rt::TokioIo;
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let uri = req.uri().clone();
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("not an http(s) URL".into()),
    };
    let host = uri.host().ok_or("no host")?.trim_matches(['[', ']']).to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| err(&e))?;
    let _ = tcp.set_nodelay(true);
    let (parts, body) = req.into_parts();
    let mut out = http::Request::from_parts(parts, Full::new(bytes::Bytes::from(body)));
    let authority = uri.authority().map(|a| a.as_str().to_string()).unwrap_or_default();
    *out.uri_mut() = uri.path_and_query().map_or("/", |p| p.as_str()).parse().map_err(|e| err(&e))?;
    out.headers_mut().insert(http::header::HOST, http::HeaderValue::from_str(&authority).map_err(|e| err(&e))?);
    async fn send<T>(
        io: T,
        req: http::Request<Full<bytes::Bytes>>,
        limit: usize,
    ) -> Result<http::Response<Vec<u8>>, String>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, limit).collect().await.map_err(|e| e.to_string())?.to_bytes().to_vec();
        Ok(http::Response::from_parts(parts, body))
    }
    if https {
        let name = ServerName::try_from(host).map_err(|e| err(&e))?;
        let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| err(&e))?;
        send(TokioIo::new(stream), out, limit).await
    } else {
        send(TokioIo::new(tcp), out, limit).await
    }
}

pub fn server_name(host: &str) -> anyhow::Result<ServerName<'static>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|_| anyhow::anyhow!("{host:?} is not a DNS name or IP address"))
}

/// A certificate check other than a chain to roots; handshake signatures are always checked
/// against the certificate presented.
#[derive(Debug)]
struct Verifier {
    /// `Some`: exactly the certificate with this SHA-256. `None`: any certificate, which proves
    /// only that the server holds the key of the one it sent.
    pinned: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl Verifier {
    fn pinned(digest: [u8; 32], provider: Arc<CryptoProvider>) -> Verifier {
        Verifier { pinned: Some(digest), provider }
    }

    fn anything(provider: Arc<CryptoProvider>) -> Verifier {
        Verifier { pinned: None, provider }
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use subtle::ConstantTimeEq;
        let Some(pin) = &self.pinned else { return Ok(ServerCertVerified::assertion()) };
        let d = ring::digest::digest(&ring::digest::SHA256, end_entity);
        if bool::from(d.as_ref().ct_eq(pin)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("the certificate does not match the pinned fingerprint".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_read_in_every_usual_spelling() {
        let plain = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        for s in [plain.clone(), colons.clone(), format!("sha256:{plain}"), format!("SHA256:{colons}")] {
            assert_eq!(parse_fingerprint(&s).unwrap(), [0xab; 32], "{s}");
        }
        for bad in ["ab".repeat(31), "zz".repeat(32), format!("md5:{plain}"), "é".repeat(32)] {
            assert!(parse_fingerprint(&bad).is_err(), "{bad}");
        }
    }
}
