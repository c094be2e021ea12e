//! How poort learns and checks who a person is: passwords (argon2id), the directory (LDAP),
//! single sign-on (OpenID Connect), second factors (TOTP, recovery codes, passkeys), the
//! sealing of factor secrets, and the signed assertion apps receive about them.

pub mod assertion;
pub mod ldap;
pub mod mfa;
pub mod oidc;
pub mod passkey;
pub mod password;
pub mod seal;
pub mod totp;

pub use crate::names::Identity;

/// TLS settings for poort as a client of a directory or an identity provider: the operator's
/// CA file, or the public roots.
pub fn client_tls(ca_file: Option<&std::path::Path>) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    use anyhow::Context;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path).with_context(|| format!("reading {}", path.display()))? {
                roots.add(cert.with_context(|| format!("parsing {}", path.display()))?)?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(cfg))
}
