//! `poort quickstart`: a working gateway in a fresh folder.

use super::*;
pub use crate::identity::password::random_password;

const QUICKSTART_CONFIG: &str = r#"# Written by `poort quickstart`. Edit it, check it with
#   poort check --config @CONFIG@
# and serve it with
#   poort serve --config @CONFIG@
# A running gateway reads this file again when it changes (or: poort reload --config @CONFIG@).
# Every key is described in docs/configuration.md.

[server]
# Loopback only unless quickstart was told otherwise. To serve others, listen on
# 0.0.0.0:443 and set external_url to the name users type, with a certificate for that
# name below.
listen = "@LISTEN@"
external_url = "@EXTERNAL_URL@"

[admin]
# Prometheus metrics (/metrics) and health checks (/healthz, /readyz), plain HTTP, loopback.
listen = "@ADMIN_LISTEN@"

[store]
# Relative paths are taken from the folder this file is in.
data_dir = "."

[tls]
cert_file = "tls/cert.pem"
key_file = "tls/key.pem"

[[app]]
name = "whoami"
title = "Who am I"
description = "Demo app: shows the request poort forwarded, identity headers included"
upstream = "builtin:whoami"
path = "/whoami/"
strip_prefix = true
access = "authenticated"

[[app]]
name = "whoami-mfa"
title = "Who am I, with a second factor"
description = "The same demo app behind a second factor: opening it asks for one, or to set one up"
upstream = "builtin:whoami"
path = "/secure/"
strip_prefix = true
access = "authenticated"
mfa = "required"

# A TCP service (SSH, RDP, a database) reached with `poort connect` (docs/tunnels.md).
# Uncomment to reach this machine's SSH server through the gateway:
# [[tunnel]]
# name = "ssh"
# title = "This machine over SSH"
# target = "127.0.0.1:22"
# access = "authenticated"
"#;

/// Creates what is missing in `data_dir` and returns the resolved config. A new config
/// listens on `listen` and is reached at `external_url` (default: localhost on that port).
pub fn quickstart(
    data_dir: &Path,
    listen: std::net::SocketAddr,
    external_url: Option<&str>,
    admin_listen: &str,
    no_serve: bool,
) -> anyhow::Result<Config> {
    let external = match external_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None if listen.port() == 443 => "https://localhost".to_string(),
        None => format!("https://localhost:{}", listen.port()),
    };
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let config_path = data_dir.join("poort.toml");
    if !config_path.exists() {
        let text = QUICKSTART_CONFIG
            .replace("@LISTEN@", &listen.to_string())
            .replace("@EXTERNAL_URL@", &external)
            .replace("@ADMIN_LISTEN@", admin_listen)
            .replace("@CONFIG@", &config_path.display().to_string());
        std::fs::write(&config_path, text).with_context(|| format!("writing {}", config_path.display()))?;
        println!("Wrote {}", config_path.display());
    } else if listen.to_string() != "127.0.0.1:8443" || external_url.is_some() || admin_listen != "127.0.0.1:9464" {
        println!(
            "{} exists: it keeps its own listen and external_url (edit them there, or start in a new folder)",
            config_path.display()
        );
    }
    let cfg = match config::load(&config_path) {
        Ok(c) => c,
        Err(problems) => {
            eprint!("{problems}");
            bail!("{} has problems; fix them or move the file away to start afresh", config_path.display());
        }
    };
    if !cfg.tls.cert_file.exists() {
        let mut names = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
        if !names.contains(&cfg.server.portal_host) {
            names.push(cfg.server.portal_host.clone());
        }
        crate::certs::make_self_signed(&names, &cfg.tls.files()[0])?;
        println!("Made a self-signed certificate for {}: {}", names.join(", "), cfg.tls.cert_file.display());
    }
    if let Ok(pem) = std::fs::read(&cfg.tls.cert_file) {
        use rustls::pki_types::pem::PemObject;
        if let Some(Ok(der)) = rustls::pki_types::CertificateDer::pem_slice_iter(&pem).next() {
            let fp = ring::digest::digest(&ring::digest::SHA256, &der);
            let hex: Vec<String> = fp.as_ref().iter().map(|b| format!("{b:02X}")).collect();
            println!("Certificate SHA-256 fingerprint: {}", hex.join(":"));
        }
    }
    // The keys now rather than at the first start, so that a copy of this folder (a second
    // node of a cluster, docs/cluster.md) has the same ones.
    crate::identity::seal::Sealer::load_or_create(&server::sealing_key_path(&cfg))?;
    crate::identity::assertion::Signer::load_or_create(&server::signing_key_path(&cfg), &cfg.server.external_origin)?;
    if !crate::audit::seal::key_path(&cfg.data_dir).exists() {
        let key = crate::audit::seal::init(&cfg.data_dir)?;
        println!(
            "Sealed the audit log. Its verification key, shown only this once: keep it off this machine\n(poort audit verify --verification-key KEY proves the log was not rewritten):\n\n    {key}\n"
        );
    }
    let store = Store::open(&cfg.database)?;
    if store.user_exists("admin")? {
        println!("User admin exists already (reset its password with `poort user passwd admin`).");
    } else {
        let pw = random_password();
        let now = SystemClock.now();
        store.add_user("admin", None, &password::hash(&pw)?, &["admins".to_string()], now)?;
        record_admin(&cfg, "quickstart", "admin", "created user admin in group admins")?;
        println!("Created user admin (group admins). Its password, shown only this once:\n\n    {pw}\n");
    }
    println!("Open {}/ and sign in as admin.", cfg.server.external_origin);
    if no_serve {
        println!("Serve it with: poort serve --config {}", config_path.display());
    }
    Ok(cfg)
}
