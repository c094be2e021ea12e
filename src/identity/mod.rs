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
    use crate::tls_client::{Trust, config};
    config(&ca_file.map_or(Trust::PublicRoots, |p| Trust::CaFile(p.to_path_buf())), None, &[])
}
