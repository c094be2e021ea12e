//! poort's side of the connection to a target: the TCP connection, the target's host key
//! checked (pinned, or kept on first use), and the sign-in with a certificate made for this
//! one connection.

use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use russh::keys::ssh_key;
use tokio::net::TcpStream;

use crate::audit::Event;
use crate::config::SshTarget;
use crate::session::Session;
use crate::store::Store;

/// Who goes where, as whom.
pub(crate) struct To<'a> {
    pub session: &'a Session,
    pub target: &'a SshTarget,
    pub principal: &'a str,
    pub client: IpAddr,
}

/// Connects to the target and signs in as `to.principal` with a certificate of `ca` for a key
/// made now; the reason, in words for the person, when it cannot (also audited).
pub(crate) async fn connect(
    st: &super::Parts,
    ca: &crate::ssh::UserCa,
    serial: u64,
    to: &To<'_>,
) -> Result<russh::client::Handle<TargetCheck>, String> {
    let t = to.target;
    let failed = |why: String| {
        let ev = Event::SshFailed {
            user: to.session.identity.user.clone(),
            target: t.name.clone(),
            why: why.clone(),
            client: to.client,
        };
        let audit = st.audit.clone();
        tokio::spawn(async move { audit.note(ev).await });
        tracing::info!(target = %t.name, why = %why, "SSH target failed");
        Err(format!("{} could not be reached: {why}", t.name))
    };
    let tcp = match tokio::time::timeout(st.cfg.ssh.connect_timeout, TcpStream::connect(&t.address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return failed(format!("connect: {e}")),
        Err(_) => return failed("connect timed out".into()),
    };
    let _ = tcp.set_nodelay(true);
    let check = TargetCheck {
        store: st.store.clone(),
        audit: st.audit.clone(),
        target: t.name.clone(),
        // Pinned keys poort cannot read pin nothing: they do not fall back to first use.
        pinned: (!t.host_keys.is_empty())
            .then(|| t.host_keys.iter().filter_map(|k| crate::ssh::parse_host_key(k)).collect()),
        verdict: Arc::default(),
    };
    let verdict = check.verdict.clone();
    // AES-GCM first: the target takes poort's first choice it speaks (see FrontDoor::new).
    let preferred = russh::Preferred {
        cipher: std::borrow::Cow::Borrowed(&[
            russh::cipher::AES_256_GCM,
            russh::cipher::AES_128_GCM,
            russh::cipher::CHACHA20_POLY1305,
        ]),
        ..Default::default()
    };
    let config =
        Arc::new(russh::client::Config { inactivity_timeout: None, nodelay: true, preferred, ..Default::default() });
    let mut handle = match russh::client::connect_stream(config, tcp, check).await {
        Ok(h) => h,
        Err(e) => {
            let why = verdict.lock().take().unwrap_or_else(|| format!("SSH handshake: {e}"));
            return failed(why);
        }
    };
    // A certificate for a key that lives as long as this connection, for one account, valid
    // from a minute ago (clocks differ) for the configured lifetime.
    let key = crate::ssh::ConnectionKey::new();
    let now = st.clock.now().max(0) as u64;
    let lifetime = st.cfg.ssh.certificate_lifetime.as_secs();
    let principals = [to.principal.to_string()];
    let mut extensions = Vec::new();
    if t.allow.shell || t.allow.exec {
        extensions.push("permit-pty");
    }
    if t.allow.forward {
        extensions.push("permit-port-forwarding");
    }
    let key_id = format!("poort:{}:{}", to.session.identity.user, to.session.id);
    let grant = crate::ssh::Grant {
        key_id: &key_id,
        principals: &principals,
        valid_after: now.saturating_sub(60),
        valid_before: now + lifetime,
        serial,
        extensions: &extensions,
        // File transfer only: the target itself runs nothing else, whatever poort is asked.
        force_command: (t.allow.sftp && !t.allow.shell && !t.allow.exec).then_some("internal-sftp"),
    };
    let cert = ca.certify(key.public(), &grant);
    let (Ok(cert), Ok(private)) = (
        ssh_key::Certificate::from_openssh(&cert.line()),
        ssh_key::PrivateKey::from_openssh(key.openssh_private("").as_bytes()),
    ) else {
        return failed("making the certificate failed".into());
    };
    match handle.authenticate_openssh_cert(to.principal.to_string(), Arc::new(private), cert).await {
        Ok(r) if r.success() => Ok(handle),
        Ok(_) => failed(format!(
            "it refused poort's certificate for {:?} (does it trust poort's CA, and is there such an account?)",
            to.principal
        )),
        Err(e) => failed(format!("signing in: {e}")),
    }
}

/// Checks a target's host key: one of the pinned keys, or else the one kept from the first
/// connection (kept and audited then).
pub(crate) struct TargetCheck {
    store: Store,
    audit: crate::audit::Audit,
    target: String,
    /// The config's `host_key` lines; None: trust on first use.
    pinned: Option<Vec<String>>,
    /// Why the key was refused, for the person and the audit record.
    verdict: Arc<Mutex<Option<String>>>,
}

/// The store's setting that holds a target's host key kept on first use.
pub fn kept_key_setting(target: &str) -> String {
    format!("ssh_host_key:{target}")
}

impl russh::client::Handler for TargetCheck {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            *self.verdict.lock() = Some("it showed a host certificate; pin its key with host_key".into());
            return Ok(false);
        };
        let Some(line) = key.to_openssh().ok().and_then(|l| crate::ssh::parse_host_key(&l)) else {
            *self.verdict.lock() = Some("its host key is of a type poort does not take".into());
            return Ok(false);
        };
        if let Some(pinned) = &self.pinned {
            let ok = pinned.contains(&line);
            if !ok {
                *self.verdict.lock() = Some("its host key is not the one pinned in the config (host_key)".into());
            }
            return Ok(ok);
        }
        let (setting, l2) = (kept_key_setting(&self.target), line.clone());
        let kept = self
            .store
            .run(move |c| {
                let kept = Store::setting(c, &setting)?;
                if kept.is_none() {
                    Store::put_setting(c, &setting, &l2)?;
                }
                Ok(kept)
            })
            .await;
        match kept {
            Ok(Some(k)) if k == line => Ok(true),
            Ok(Some(_)) => {
                *self.verdict.lock() = Some(
                    "its host key changed since poort first saw it (poort ssh forget-host-key, if that is expected)"
                        .into(),
                );
                Ok(false)
            }
            Ok(None) => {
                let ev = Event::SshHostKeyKept { target: self.target.clone(), key: line };
                if self.audit.record(ev).await.is_err() {
                    *self.verdict.lock() = Some("the audit log is unavailable".into());
                    return Ok(false);
                }
                Ok(true)
            }
            Err(_) => {
                *self.verdict.lock() = Some("the store is unavailable".into());
                Ok(false)
            }
        }
    }
}
