//! `poort rules`: test, sign and check emergency rules files.

use super::*;

#[derive(Debug, Subcommand)]
pub enum RulesCmd {
    /// Show which rule a request would meet, without a running gateway.
    Test {
        #[arg(long, default_value = "GET")]
        method: String,
        /// The request target as sent, for example '/vpn/../vpns/cfg/smb.conf'.
        #[arg(long, required_unless_present = "raw")]
        target: Option<String>,
        /// A header, 'Name: value' (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// The client address.
        #[arg(long, default_value = "192.0.2.1")]
        client: std::net::IpAddr,
        /// A file with a raw request head (request line and headers) instead.
        #[arg(long, conflicts_with = "target")]
        raw: Option<PathBuf>,
        /// Test this rules file (or feed file's rules) instead of the gateway's rules file and
        /// feed; works without a gateway config, as on a publisher's machine.
        #[arg(long, value_name = "FILE")]
        rules: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// What the running gateway loaded, and why it refused the newest file if it did.
    Status {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Make an Ed25519 key pair for signing rule files; prints the public key for the config.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a rules file: writes FILE.sig.
    Sign {
        #[arg(long)]
        key: PathBuf,
        file: PathBuf,
    },
    /// Write a signed, versioned feed file from a rules file, for every gateway whose
    /// [mitigate] feed names where it is served.
    Publish {
        /// The private key from `poort rules keygen`.
        #[arg(long)]
        key: PathBuf,
        /// The feed file to write (atomically, so that a server never sends half of it).
        #[arg(long)]
        out: PathBuf,
        /// The version; default: one more than the feed file at --out, or 1.
        #[arg(long)]
        version: Option<u64>,
        /// How long gateways may take the file: after that it is refused as a replay.
        #[arg(long, default_value = "7d")]
        valid_for: String,
        /// The rules file.
        rules: PathBuf,
    },
    /// Check FILE.sig against a public key.
    Verify {
        #[arg(long)]
        public_key: String,
        file: PathBuf,
    },
}

pub(super) fn run(cmd: RulesCmd) -> anyhow::Result<i32> {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use ring::signature::{Ed25519KeyPair, KeyPair};
    match cmd {
        RulesCmd::Test { method, target, headers, client, raw, rules, config } => {
            // With a rules file of its own, a config is optional: it only names the apps.
            let cfg = match (&rules, load(&config.config)) {
                (_, Ok(cfg)) => Some(cfg),
                (Some(_), Err(_)) => None,
                (None, Err(e)) => return Err(e),
            };
            let (method, target, headers) = match raw {
                Some(path) => {
                    parse_raw_head(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)?
                }
                None => {
                    let headers = headers.iter().map(|h| h.as_bytes().to_vec()).collect();
                    (method, target.unwrap_or_default(), headers)
                }
            };
            let request = TestRequest { method: &method, target: &target, headers: &headers, client };
            rules_test(cfg.as_ref(), rules.as_deref(), &request)
        }
        RulesCmd::Status { config } => {
            let cfg = load(&config.config)?;
            match crate::mitigate::read_status(&cfg.data_dir) {
                None => println!("No status yet: the gateway has not run with this data directory."),
                Some(s) => {
                    match &s.file {
                        None => println!("file:      (no local rules file)"),
                        Some(file) => {
                            println!("file:      {file}");
                            let loaded = s.loaded_at.as_deref().unwrap_or("never");
                            println!("rules:     {} from the file, loaded {loaded}", s.rules);
                            println!("sha256:    {}", s.sha256.as_deref().unwrap_or("-"));
                            println!("version:   {}", s.version.map_or("-".to_string(), |v| v.to_string()));
                            match &s.last_error {
                                Some(e) => println!("REFUSED:   the newest file was not loaded: {e}"),
                                None => println!("newest file: loaded"),
                            }
                        }
                    }
                    if let Some(f) = &s.feed {
                        print_feed(f);
                    }
                    let mut hits: Vec<_> = s.hits.iter().collect();
                    hits.sort();
                    for (rule, n) in hits {
                        println!("hits:      {rule}: {n}");
                    }
                    let feed_trouble = s.feed.as_ref().is_some_and(|f| f.refused.is_some() || f.unreachable.is_some());
                    if s.last_error.is_some() || feed_trouble {
                        return Ok(1);
                    }
                }
            }
            Ok(0)
        }
        RulesCmd::Keygen { out } => {
            let rng = ring::rand::SystemRandom::new();
            let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| anyhow::anyhow!("key generation failed"))?;
            let pair =
                Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| anyhow::anyhow!("key generation failed"))?;
            crate::secret::write_private(&out, doc.as_ref())?;
            println!("Wrote the private key to {} (keep it away from the gateway).", out.display());
            println!(
                "Public key for the gateway's [mitigate] public_key (signed rules files) or feed_public_key (a feed):\n\n    {}",
                STANDARD.encode(pair.public_key().as_ref())
            );
            Ok(0)
        }
        RulesCmd::Sign { key, file } => {
            let pkcs8 = std::fs::read(&key).with_context(|| format!("reading {}", key.display()))?;
            let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
                .map_err(|_| anyhow::anyhow!("{} is not an Ed25519 key", key.display()))?;
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            match crate::mitigate::rules::compile(&String::from_utf8_lossy(&bytes)) {
                Err(problems) => bail!("refusing to sign a rules file with problems:\n  {}", problems.join("\n  ")),
                Ok(r) if r.version.is_none() => bail!(
                    "refusing to sign a rules file without a version: gateways never go back to a lower version, so each file needs one (hint: version = 1 at the top, one higher in every new file)"
                ),
                Ok(_) => {}
            }
            let sig_path = crate::mitigate::signature_path(&file);
            std::fs::write(&sig_path, format!("{}\n", STANDARD.encode(pair.sign(&bytes).as_ref())))?;
            println!("Wrote {}", sig_path.display());
            Ok(0)
        }
        RulesCmd::Publish { key, out, version, valid_for, rules } => publish(&key, &out, version, &valid_for, &rules),
        RulesCmd::Verify { public_key, file } => {
            let key = STANDARD.decode(public_key.trim()).context("the public key is not base64")?;
            match crate::mitigate::load_file(&file, Some(&key), SystemClock.now()) {
                Ok((rules, digest)) => {
                    println!("signature good; {} rules; sha256 {digest}", rules.rules.len());
                    Ok(0)
                }
                Err(problems) => {
                    println!("NOT good: {}", problems.join("; "));
                    Ok(1)
                }
            }
        }
    }
}

fn publish(key: &Path, out: &Path, version: Option<u64>, valid_for: &str, rules: &Path) -> anyhow::Result<i32> {
    use ring::signature::Ed25519KeyPair;
    let pkcs8 = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
    let pair =
        Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| anyhow::anyhow!("{} is not an Ed25519 key", key.display()))?;
    let text = std::fs::read_to_string(rules).with_context(|| format!("reading {}", rules.display()))?;
    if let Err(problems) = crate::mitigate::rules::compile(&text) {
        bail!("refusing to publish a rules file with problems:\n  {}", problems.join("\n  "));
    }
    // Gateways never take an earlier expiry than the file in force's: a file valid for years
    // would hold every later one to years too.
    const LONGEST: u64 = 366 * 24 * 3600;
    // Versions stay exact as JSON numbers and metrics.
    const HIGHEST: u64 = 1 << 53;
    let valid_for =
        humantime::parse_duration(valid_for).ok().filter(|d| !d.is_zero() && d.as_secs() <= LONGEST).with_context(
            || format!("--valid-for {valid_for:?} is not a duration of at most a year (for example 7d or 12h)"),
        )?;
    let before = std::fs::read(out).ok().and_then(|b| crate::mitigate::feed::header_of(&b));
    let version = match (version, before) {
        (Some(v), Some((b, _))) if v <= b => {
            bail!(
                "version {v} does not follow version {b} in {}: gateways refuse it (hint: leave out --version)",
                out.display()
            )
        }
        (Some(v), _) => v,
        (None, Some((b, _))) => b.saturating_add(1),
        (None, None) => 1,
    };
    if version > HIGHEST {
        bail!(
            "version {version} is too high: gateways could take no file after it (hint: number files from 1, one higher each time)"
        );
    }
    let expires = SystemClock.now() + valid_for.as_secs() as i64;
    if let Some((_, e)) = before.filter(|(_, e)| *e > expires) {
        bail!(
            "the file in {} expires at {}, later than this one would ({}): gateways refuse an expiry that goes back (hint: a longer --valid-for)",
            out.display(),
            crate::clock::format_utc(e),
            crate::clock::format_utc(expires)
        );
    }
    let feed = crate::mitigate::feed::write(&pair, version, expires, &text);
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, feed).with_context(|| format!("writing {}", PathBuf::from(&tmp).display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("moving the new file to {}", out.display()))?;
    println!(
        "Wrote {}: version {version}, valid until {}. Gateways polling it take it at their next check.",
        out.display(),
        crate::clock::format_utc(expires)
    );
    Ok(0)
}

fn print_feed(f: &crate::mitigate::FeedStatus) {
    let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!("feed:      {}", f.url);
    println!("  signer:  {}", f.signer);
    match f.version {
        Some(v) => {
            println!("  version: {v}, {} rules, expires {}, applied {}", f.rules, or(&f.expires), or(&f.applied_at))
        }
        None => println!("  version: none yet: no file from the feed has been taken"),
    }
    let expired = f.expires.as_deref().and_then(|t| humantime::parse_rfc3339(t).ok()).is_some_and(|t| {
        t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64) <= SystemClock.now()
    });
    if expired {
        println!("  EXPIRED: the publisher has sent no newer file; the rules of this one stay in force");
    }
    println!("  sha256:  {}", or(&f.sha256));
    println!("  fetched: {} (last answer); next check {}", or(&f.fetched_at), or(&f.next_check));
    if let Some(e) = &f.refused {
        println!("  REFUSED: the newest file served was not taken: {e}");
    }
    if let Some(e) = &f.unreachable {
        println!("  UNREACHABLE since {}: {e}; the file in force stays", or(&f.unreachable_since));
    }
}

/// A raw request head: `METHOD TARGET HTTP/1.1`, then `Name: value` lines. Header values are
/// taken as bytes: a captured request may carry values that are not UTF-8.
fn parse_raw_head(raw: &[u8]) -> anyhow::Result<(String, String, Vec<Vec<u8>>)> {
    let mut lines = raw.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let first =
        std::str::from_utf8(lines.next().context("the file is empty")?).context("the request line is not text")?;
    let mut parts = first.split(' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        bail!("the first line is not METHOD TARGET HTTP/1.1")
    };
    let headers = lines.take_while(|l| !l.trim_ascii().is_empty()).map(<[u8]>::to_vec).collect();
    Ok((method.to_string(), target.to_string(), headers))
}

/// The request `poort rules test` is asked about.
struct TestRequest<'a> {
    method: &'a str,
    target: &'a str,
    headers: &'a [Vec<u8>],
    client: std::net::IpAddr,
}

/// The rules a gateway would check, in order: its rules file's, then the feed file in force
/// (from its database); or the file given on its own.
fn rules_to_test(cfg: Option<&Config>, file: Option<&Path>) -> Result<crate::mitigate::Rules, String> {
    let now = SystemClock.now();
    if let Some(path) = file {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // A feed file tests as the rules it carries (its signature is not checked here).
        if let Some(text) = std::str::from_utf8(&bytes).ok().and_then(crate::mitigate::feed::rules_text_of) {
            return crate::mitigate::rules::compile(&text).map_err(|p| p.join("\n  "));
        }
        return crate::mitigate::rules::compile(&String::from_utf8_lossy(&bytes)).map_err(|p| p.join("\n  "));
    }
    let cfg = cfg.expect("invariant: a config when no file is given");
    let mut rules = match &cfg.mitigate.rules_file {
        Some(path) => {
            crate::mitigate::load_file(path, cfg.mitigate.public_key.as_deref(), now)
                .map_err(|p| {
                    format!("the rules file would be refused (the running rules stay):\n  {}", p.join("\n  "))
                })?
                .0
        }
        None => crate::mitigate::Rules::default(),
    };
    if let Some(feed) = &cfg.mitigate.feed {
        let record =
            Store::open(&cfg.database).ok().and_then(|s| s.with(|c| crate::mitigate::feed::kept(c)).ok().flatten());
        match record.map(|r| crate::mitigate::feed::open(r.text.as_bytes(), &feed.public_key)) {
            Some(Ok(opened)) => rules.rules.extend(opened.rules.rules),
            Some(Err(e)) => {
                println!("the feed file kept in the database does not open ({}): its rules are left out", e.why)
            }
            None => println!("no file from the feed has been taken yet: only the local rules are checked"),
        }
    }
    Ok(rules)
}

fn rules_test(cfg: Option<&Config>, file: Option<&Path>, req: &TestRequest<'_>) -> anyhow::Result<i32> {
    let (method, target, client) = (req.method, req.target, req.client);
    let portal_host = cfg.map_or("localhost", |c| c.server.portal_host.as_str());
    let mut map = http::HeaderMap::new();
    for h in req.headers {
        let colon = h.iter().position(|b| *b == b':');
        let Some(colon) = colon else { bail!("{:?} is not 'Name: value'", String::from_utf8_lossy(h)) };
        let (k, v) = (h[..colon].trim_ascii(), h[colon + 1..].trim_ascii());
        map.append(http::HeaderName::from_bytes(k)?, http::HeaderValue::from_bytes(v)?);
    }
    if !map.contains_key(http::header::HOST) {
        map.insert(http::header::HOST, http::HeaderValue::from_str(portal_host)?);
    }
    let method: http::Method = method.parse().context("not an HTTP method")?;
    let front = match target.parse::<http::Uri>() {
        Err(_) => {
            println!("front door: refused with 400 (the target does not parse); no rule is consulted");
            return Ok(0);
        }
        Ok(uri) => crate::request::check(&method, &uri, http::Version::HTTP_11, &map),
    };
    let front = match front {
        Ok(f) => f,
        Err(r) => {
            println!("front door: refused with {} ({}); no rule is consulted", r.status().as_u16(), r.code());
            return Ok(0);
        }
    };
    let apps = cfg.map_or(&[][..], |c| c.apps.as_slice());
    let routes = crate::route::Routes::new(portal_host, apps);
    let app = match routes.find_target(&front.host, &front.target) {
        crate::route::Found::App(i) | crate::route::Found::AddSlash(i) => Some(apps[i].name.as_str()),
        _ => None,
    };
    println!("canonical path: {}", front.target.path());
    println!("app: {}", app.unwrap_or("(none: portal or not found)"));
    if file.is_none() && cfg.is_some_and(|c| c.mitigate.rules_file.is_none() && c.mitigate.feed.is_none()) {
        println!("no rules file or feed is configured: the request goes on to the session check");
        return Ok(0);
    }
    let rules = match rules_to_test(cfg, file) {
        Ok(r) => r,
        Err(problems) => {
            println!("{problems}");
            return Ok(1);
        }
    };
    let facts = crate::mitigate::Facts::of(method.as_str(), &front.target, target, &map, client, app);
    match rules.check(&facts) {
        None => println!("no rule matches: the request goes on to the session check"),
        Some((_, r)) => {
            let what = match r.action {
                crate::mitigate::Action::Deny => "deny: 403".to_string(),
                crate::mitigate::Action::Log => "log: audited, then the request goes on".to_string(),
                crate::mitigate::Action::Throttle { count, per_secs } => {
                    format!("throttle: 429 above {count} requests per {per_secs} s from one address")
                }
            };
            println!("rule {} matches: {what}", r.id);
            if !r.reason.is_empty() {
                println!("reason: {}", r.reason);
            }
        }
    }
    Ok(0)
}
