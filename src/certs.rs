//! The gateway's certificates, chosen per connection by the name the client sends (SNI): one
//! obtained for exactly that name by ACME (`acme`), else a configured certificate whose names
//! hold it exactly, else one with a wildcard for it (`*.example.com` covers one label), else
//! the first one configured. The files are read again when they
//! change on disk (`reload_if_changed`), so a renewed certificate is served to new connections
//! without a restart; a file that does not load leaves the certificates in use as they are.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use parking_lot::RwLock;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

pub use crate::config::CertFiles;

/// The certificates in use and where they came from.
#[derive(Debug)]
pub struct Certs {
    files: RwLock<Vec<CertFiles>>,
    loaded: RwLock<Arc<Loaded>>,
    /// The file times of a reading that failed: not tried again until they change.
    failed: RwLock<Vec<Option<SystemTime>>>,
    /// Certificates obtained by ACME, by the one name each is for.
    managed: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

/// Certificates of a changed config, loaded and waiting to be used.
#[derive(Debug)]
pub struct Staged(Vec<CertFiles>, Loaded);

#[derive(Debug)]
struct Loaded {
    /// In configured order; the first is served when nothing else fits.
    keys: Vec<Arc<CertifiedKey>>,
    /// Lower-case DNS names, to the index of the first certificate holding them.
    exact: HashMap<String, usize>,
    /// `example.com` for `*.example.com`, likewise.
    wildcard: HashMap<String, usize>,
    /// When each file was last changed, as read.
    stamps: Vec<Option<SystemTime>>,
}

impl Certs {
    /// Loads every certificate; an error names the file at fault.
    pub fn load(files: Vec<CertFiles>) -> anyhow::Result<Certs> {
        anyhow::ensure!(!files.is_empty(), "no certificate is configured");
        let loaded = load_all(&files)?;
        Ok(Certs {
            files: RwLock::new(files),
            loaded: RwLock::new(Arc::new(loaded)),
            failed: RwLock::default(),
            managed: RwLock::default(),
        })
    }

    /// Reads the files again if any changed since they were read. Ok(true) if the new ones
    /// are in use; an error leaves the old ones in use.
    pub fn reload_if_changed(&self) -> anyhow::Result<bool> {
        let files = self.files.read().clone();
        let now = stamps(&files);
        if now == self.loaded.read().stamps || now == *self.failed.read() {
            return Ok(false);
        }
        match load_all(&files) {
            Ok(loaded) => {
                *self.loaded.write() = Arc::new(loaded);
                Ok(true)
            }
            Err(e) => {
                *self.failed.write() = now;
                Err(e)
            }
        }
    }

    /// Loads the certificates of a changed config without using them yet: None if they are
    /// the files in use (unless `again`: read them anyway); an error names the file at fault.
    pub fn stage(&self, files: Vec<CertFiles>, again: bool) -> anyhow::Result<Option<Staged>> {
        if *self.files.read() == files && !again {
            return Ok(None);
        }
        anyhow::ensure!(!files.is_empty(), "no certificate is configured");
        let loaded = load_all(&files)?;
        Ok(Some(Staged(files, loaded)))
    }

    /// Serves staged certificates to new connections from now on.
    pub fn use_staged(&self, Staged(files, loaded): Staged) {
        *self.files.write() = files;
        *self.loaded.write() = Arc::new(loaded);
        self.failed.write().clear();
    }

    /// Serves `chain` (PEM, leaf first) with `key` (PEM) to connections naming `name`, in
    /// place of any certificate it had; an error if they do not load or do not fit.
    pub fn install(&self, name: &str, chain: &str, key: &str) -> anyhow::Result<()> {
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the certificate chain")?;
        anyhow::ensure!(!certs.is_empty(), "the chain holds no certificate");
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).context("parsing the private key")?;
        let certified = CertifiedKey::from_der(certs, key, &rustls::crypto::ring::default_provider())
            .context("the certificate and key do not fit together")?;
        self.managed.write().insert(name.to_ascii_lowercase(), Arc::new(certified));
        Ok(())
    }

    /// Whether some certificate names `name` (a lower-case DNS name).
    pub fn covers(&self, name: &str) -> bool {
        self.managed.read().contains_key(name) || self.loaded.read().index_for(name).is_some()
    }

    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let sni = sni.map(str::to_ascii_lowercase);
        if let Some(k) = sni.as_ref().and_then(|n| self.managed.read().get(n).cloned()) {
            return k;
        }
        let loaded = self.loaded.read();
        let i = sni.and_then(|n| loaded.index_for(&n)).unwrap_or(0);
        loaded.keys[i].clone()
    }
}

impl Loaded {
    fn index_for(&self, name: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(name) {
            return Some(i);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).copied()
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// Writes a self-signed certificate for `names` and its key (owner-only) to `files`, making
/// their folder if needed.
pub fn make_self_signed(names: &[String], files: &CertFiles) -> anyhow::Result<()> {
    let ck = rcgen::generate_simple_self_signed(names.to_vec()).context("making a self-signed certificate")?;
    if let Some(dir) = files.cert.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::secret::write_private(&files.key, ck.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(&files.cert, ck.cert.pem()).with_context(|| format!("writing {}", files.cert.display()))?;
    Ok(())
}

fn stamps(files: &[CertFiles]) -> Vec<Option<SystemTime>> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    files.iter().flat_map(|f| [modified(&f.cert), modified(&f.key)]).collect()
}

fn load_all(files: &[CertFiles]) -> anyhow::Result<Loaded> {
    // Read before the files, so that a change while reading is seen at the next check.
    let stamps = stamps(files);
    let provider = rustls::crypto::ring::default_provider();
    let mut loaded = Loaded { keys: Vec::new(), exact: HashMap::new(), wildcard: HashMap::new(), stamps };
    for (i, f) in files.iter().enumerate() {
        let chain = crate::tls_client::read_certs(&f.cert)?;
        let key = crate::tls_client::read_key(&f.key)?;
        let names: Vec<String> = {
            let leaf = webpki::EndEntityCert::try_from(&chain[0])
                .map_err(|e| anyhow::anyhow!("{}: the first certificate does not parse: {e}", f.cert.display()))?;
            leaf.valid_dns_names().map(str::to_ascii_lowercase).collect()
        };
        let certified = CertifiedKey::from_der(chain, key, &provider)
            .with_context(|| format!("{} and {} do not fit together", f.cert.display(), f.key.display()))?;
        for name in names {
            match name.strip_prefix("*.") {
                Some(parent) => loaded.wildcard.entry(parent.to_string()).or_insert(i),
                None => loaded.exact.entry(name).or_insert(i),
            };
        }
        loaded.keys.push(Arc::new(certified));
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, names: &[&str]) -> CertFiles {
        let ck = rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        CertFiles { cert, key }
    }

    fn leaf(k: &CertifiedKey) -> Vec<u8> {
        k.cert[0].to_vec()
    }

    #[test]
    fn the_name_picks_the_certificate() {
        let dir = std::env::temp_dir()
            .join(format!("poort-certs-{}", crate::secret::hex(&crate::secret::random_bytes::<6>())));
        std::fs::create_dir_all(&dir).unwrap();
        let files = vec![
            write(&dir, "portal", &["gate.example.com"]),
            write(&dir, "apps", &["*.apps.example.com", "wiki.example.com"]),
        ];
        let certs = Certs::load(files.clone()).unwrap();
        let portal = leaf(&certs.pick(Some("gate.example.com")));
        let apps = leaf(&certs.pick(Some("wiki.example.com")));
        assert_ne!(portal, apps);
        assert_eq!(leaf(&certs.pick(Some("GIT.apps.example.com"))), apps);
        // One label only; and anything else gets the first.
        assert_eq!(leaf(&certs.pick(Some("a.b.apps.example.com"))), portal);
        assert_eq!(leaf(&certs.pick(None)), portal);
        assert!(certs.covers("x.apps.example.com") && !certs.covers("apps.example.com"));

        // A renewed file is used once it changed; a broken one changes nothing.
        assert!(!certs.reload_if_changed().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
        write(&dir, "apps", &["wiki.example.com"]);
        assert!(certs.reload_if_changed().unwrap());
        let renewed = leaf(&certs.pick(Some("wiki.example.com")));
        assert_ne!(renewed, apps);
        assert!(!certs.covers("x.apps.example.com"));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&files[1].key, "not a key").unwrap();
        assert!(certs.reload_if_changed().is_err());
        assert!(!certs.reload_if_changed().unwrap(), "a file that failed is not read again until it changes");
        assert_eq!(leaf(&certs.pick(Some("wiki.example.com"))), renewed);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
