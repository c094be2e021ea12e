//! Audit export (`[[audit.export]]`): every record, as it is committed, to a SIEM as RFC 5424
//! syslog over TLS (RFC 5425, octet-counted), or as JSON lines to a file or standard output.
//! Each record carries its sequence number, the previous record's hash and its own, so the
//! receiver can check the chain (`docs/operations.md` gives the recipe).
//!
//! Nothing is dropped: the spool is the audit log itself, which is already on disk. Each
//! export keeps in the store how far it has delivered (`audit_export:NAME`) and reads on from
//! there, in order; a receiver that is down or slow only makes the export fall behind. A
//! syslog batch counts as delivered once the connection is seen still open a second after it
//! was written (a receiver that closes sooner gets it again, so a record may arrive twice
//! when a receiver fails, never not at all; its sequence number tells the copies apart). A
//! file counts it once it is written and synced; at start the file's last line says where it
//! ended, so a crash between the two repeats nothing.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::{AuditExport, ExportTo};
use crate::db::{self, Conn, OptionalExtension, params};
use crate::metrics::{ExportLabels, Metrics};
use crate::store::Store;

/// Records read and sent at a time.
const BATCH: usize = 500;
/// How long a syslog connection must stay open after a batch for the batch to count as
/// delivered.
const CONFIRM_AFTER: Duration = Duration::from_secs(1);
/// A receiver that has not taken a batch for this long (it stopped reading) is given up on,
/// and what it was sent goes again on the next connection.
const STALL: Duration = Duration::from_secs(30);
/// Waits between attempts to reach a receiver: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MOST: Duration = Duration::from_secs(10);

/// One record as exported.
#[derive(Debug, Clone)]
pub struct Exported {
    pub seq: i64,
    pub at: i64,
    pub kind: String,
    /// The event's JSON, exactly the bytes that were hashed.
    pub detail: String,
    pub prev: Vec<u8>,
    pub hash: Vec<u8>,
}

/// Holds the log in `conn` against `export`, the JSON lines an export wrote (kept where an
/// intruder on the gateway cannot reach): Ok(records compared), or Err(where the log differs
/// from what was exported: a record changed, missing, or the log cut short).
pub fn held_against(conn: &Conn, export: &str) -> db::Result<Result<usize, String>> {
    let mut compared = 0usize;
    for (n, line) in export.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            return Ok(Err(format!("line {} of the export is not a record", n + 1)));
        };
        let (Some(seq), Some(hash)) = (v["seq"].as_i64(), v["hash"].as_str()) else {
            return Ok(Err(format!("line {} of the export has no seq and hash", n + 1)));
        };
        let stored: Option<Vec<u8>> =
            conn.query_row("SELECT hash FROM audit WHERE seq = ?1", params![seq], |r| r.get(0)).optional()?;
        match stored {
            None => {
                return Ok(Err(format!(
                    "record {seq} was exported but is not in the log (removed, or the log cut short)"
                )));
            }
            Some(h) if crate::secret::hex(&h) != hash => {
                return Ok(Err(format!(
                    "record {seq} differs from what was exported (changed, with the hashes after it made again)"
                )));
            }
            Some(_) => {}
        }
        compared += 1;
    }
    Ok(Ok(compared))
}

/// Up to `n` records after `seq`, in order.
pub fn records_after(conn: &Conn, seq: i64, n: usize) -> db::Result<Vec<Exported>> {
    conn.query_map(
        "SELECT seq, at, kind, detail, prev_hash, hash FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        params![seq, n as i64],
        |r| {
            Ok(Exported {
                seq: r.get(0)?,
                at: r.get(1)?,
                kind: r.get(2)?,
                detail: r.get(3)?,
                prev: r.get(4)?,
                hash: r.get(5)?,
            })
        },
    )
}

fn rfc3339(at: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(at.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Exported {
    /// One JSON object: the event parsed (`event`, for searching) and as hashed (`detail`).
    pub fn json(&self) -> String {
        // `detail` is JSON written by poort: it goes in as it is.
        format!(
            "{{\"seq\":{},\"at\":{},\"time\":\"{}\",\"kind\":{},\"event\":{},\"detail\":{},\"prev\":\"{}\",\"hash\":\"{}\"}}",
            self.seq,
            self.at,
            rfc3339(self.at),
            serde_json::Value::String(self.kind.clone()),
            self.detail,
            serde_json::Value::String(self.detail.clone()),
            crate::secret::hex(&self.prev),
            crate::secret::hex(&self.hash),
        )
    }

    /// The syslog severity: warning for refusals and failures, notice for changes an
    /// administrator made, informational for the rest.
    fn severity(&self) -> u8 {
        match self.kind.as_str() {
            "login_failed" | "mfa_failed" | "account_locked" | "access_denied" | "request_rejected"
            | "rate_limited" | "mitigation_matched" | "rules_refused" | "config_refused" | "handoff_refused"
            | "locked_down" | "refusals_counted" | "tunnel_failed" | "ssh_failed" => 4,
            "admin" | "factor_changed" | "recovery_code_used" | "rules_loaded" | "config_reloaded"
            | "gateway_started" | "session_ended" | "ssh_host_key_kept" => 5,
            _ => 6,
        }
    }

    /// An RFC 5424 message, octet-counted (RFC 6587 section 3.4.1, as RFC 5425 requires):
    /// facility authpriv, the record's kind as MSGID, its sequence number and hashes as
    /// structured data, and the JSON object as the message.
    pub fn syslog(&self, host: &str) -> Vec<u8> {
        const AUTHPRIV: u8 = 10;
        let msg = format!(
            "<{}>1 {} {} poort {} {} [poort@32473 seq=\"{}\" prev=\"{}\" hash=\"{}\"] {}",
            AUTHPRIV * 8 + self.severity(),
            rfc3339(self.at),
            host,
            std::process::id(),
            self.kind,
            self.seq,
            crate::secret::hex(&self.prev),
            crate::secret::hex(&self.hash),
            self.json(),
        );
        let mut out = format!("{} ", msg.len()).into_bytes();
        out.extend_from_slice(msg.as_bytes());
        out
    }
}

/// This machine's name for syslog's HOSTNAME field ("-" if unknown).
fn hostname() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let h: String = h.trim().chars().filter(|c| c.is_ascii_graphic()).take(255).collect();
    if h.is_empty() { "-".into() } else { h }
}

/// Where an export's progress is kept in the store.
pub fn cursor_key(name: &str) -> String {
    format!("audit_export:{name}")
}

/// The sequence number of the last record in a JSON-lines file, if any.
fn last_in_file(path: &Path) -> Option<i64> {
    use std::io::{Read, Seek, SeekFrom};
    // Only a regular file is read: opening a FIFO would wait for a writer.
    if !std::fs::metadata(path).ok()?.is_file() {
        return None;
    }
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let start = len.saturating_sub(256 * 1024);
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    text.lines().rev().find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("seq")?.as_i64())
}

/// A TCP connection with a small send buffer: records wait in the audit log, not in a
/// kernel buffer where a receiver that stops reading would hold them unseen.
async fn connect(address: &str) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::other("no address");
    for addr in tokio::net::lookup_host(address).await? {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_send_buffer_size(16 * 1024)?;
        match socket.connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A connection or file records are written to.
enum Sink {
    Syslog(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// None while a write is under way off the event loop.
    File(Option<std::fs::File>),
    Stdout,
}

impl Sink {
    async fn open(to: &ExportTo) -> anyhow::Result<Sink> {
        match to {
            ExportTo::Syslog { address, server_name, tls } => {
                let tcp = tokio::time::timeout(Duration::from_secs(10), connect(address))
                    .await
                    .context("connecting timed out")?
                    .context("connecting")?;
                let _ = tcp.set_nodelay(true);
                let tls = tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio_rustls::TlsConnector::from(tls.clone()).connect(server_name.clone(), tcp),
                )
                .await
                .context("the TLS handshake timed out")?
                .context("the TLS handshake")?;
                Ok(Sink::Syslog(Box::new(tls)))
            }
            ExportTo::File(path) => {
                // Opened off the event loop, without waiting for a reader (a FIFO), and only
                // if it is a regular file: a hung mount or a pipe must not stall the gateway.
                let path = path.clone();
                let file = tokio::task::spawn_blocking(move || -> anyhow::Result<std::fs::File> {
                    use std::os::unix::fs::OpenOptionsExt;
                    let f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(&path)
                        .with_context(|| format!("opening {}", path.display()))?;
                    anyhow::ensure!(f.metadata()?.is_file(), "{} is not a regular file", path.display());
                    Ok(f)
                })
                .await
                .context("opening the export file")??;
                Ok(Sink::File(Some(file)))
            }
            ExportTo::Stdout => Ok(Sink::Stdout),
        }
    }

    /// Whether the receiver has not closed the connection (a file is always open).
    fn open_still(&mut self) -> bool {
        let Sink::Syslog(s) = self else { return true };
        let mut buf = [0u8; 512];
        // A syslog receiver sends nothing: a read that completes at once is its close (or
        // an error); one that would wait means the connection is up.
        loop {
            match s.read(&mut buf).now_or_never() {
                None => return true,
                Some(Ok(0) | Err(_)) => return false,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Writes `records`; Ok(true) if they are delivered now, Ok(false) if they need
    /// confirming (`CONFIRM_AFTER`).
    async fn write(&mut self, records: &[Exported], host: &str) -> anyhow::Result<bool> {
        match self {
            Sink::Syslog(s) => {
                let mut out = Vec::new();
                for r in records {
                    out.extend_from_slice(&r.syslog(host));
                }
                tokio::time::timeout(Duration::from_secs(30), async {
                    s.write_all(&out).await?;
                    s.flush().await
                })
                .await
                .context("writing timed out")?
                .context("writing")?;
                Ok(false)
            }
            Sink::File(slot) => {
                let mut out = String::new();
                for r in records {
                    out.push_str(&r.json());
                    out.push('\n');
                }
                let mut f = slot.take().context("the export file is not open")?;
                // Off the event loop; a write that fails is taken back, so no half line stays.
                let (f, result) = tokio::task::spawn_blocking(move || {
                    let result = (|| -> anyhow::Result<()> {
                        let before = f.metadata()?.len();
                        if let Err(e) = f.write_all(out.as_bytes()).and_then(|()| f.sync_data()) {
                            let _ = f.set_len(before);
                            return Err(e).context("writing");
                        }
                        Ok(())
                    })();
                    (f, result)
                })
                .await
                .context("writing the export file")?;
                *slot = Some(f);
                result.map(|()| true)
            }
            Sink::Stdout => {
                let mut out = String::new();
                for r in records {
                    out.push_str(&r.json());
                    out.push('\n');
                }
                let mut stdout = tokio::io::stdout();
                stdout.write_all(out.as_bytes()).await.context("writing")?;
                stdout.flush().await.context("writing")?;
                Ok(true)
            }
        }
    }
}

/// Sends every record after the export's cursor, in order, until `stop`; follows new records
/// as they are committed (`committed`).
pub async fn run(
    export: AuditExport,
    store: Store,
    mut committed: watch::Receiver<i64>,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let key = cursor_key(&export.name);
    let labels = ExportLabels { export: export.name.clone() };
    let pending = metrics.audit_export_pending.get_or_create(&labels).clone();
    let failures = metrics.audit_export_failures.get_or_create(&labels).clone();
    let host = hostname();
    let k = key.clone();
    let mut delivered = match store.run(move |c| Store::setting(c, &k)).await {
        Ok(v) => v.and_then(|v| v.parse::<i64>().ok()).unwrap_or(0),
        Err(e) => {
            tracing::error!(export = %export.name, error = %e, "Reading where the audit export stands failed; it does not run");
            return;
        }
    };
    if let ExportTo::File(path) = &export.to {
        // Off the event loop: the file may be on a mount that hangs.
        let path = path.clone();
        let last = tokio::task::spawn_blocking(move || last_in_file(&path)).await.ok().flatten();
        delivered = delivered.max(last.unwrap_or(0));
    }
    let mut sink: Option<Sink> = None;
    // Batches written but not yet confirmed: (up to, when), oldest first.
    let mut unconfirmed: std::collections::VecDeque<(i64, std::time::Instant)> = Default::default();
    let mut retry = RETRY_FIRST;
    let mut failing = false;
    let rewind_key = rewind_key(&export.name);
    loop {
        // `poort audit resend`: start again from the record it names.
        let k = rewind_key.clone();
        if let Ok(Some(from)) = store.run(move |c| take_rewind(c, &k)).await {
            tracing::info!(export = %export.name, from, "Audit export sends again from the record asked for");
            delivered = from - 1;
            unconfirmed.clear();
            save(&store, &key, delivered).await;
        }
        // Confirms what was written once the connection has stayed open long enough; gives
        // up on a receiver that has not taken a batch for `STALL`.
        if let (false, Some(s)) = (unconfirmed.is_empty(), sink.as_mut()) {
            let now = crate::clock::instant();
            let stalled = unconfirmed.front().is_some_and(|(_, at)| now.saturating_duration_since(*at) >= STALL);
            if s.open_still() && !stalled {
                let mut confirmed = None;
                while let Some(&(upto, at)) = unconfirmed.front() {
                    if now.saturating_duration_since(at) < CONFIRM_AFTER {
                        break;
                    }
                    confirmed = Some(upto);
                    unconfirmed.pop_front();
                }
                if let Some(upto) = confirmed {
                    delivered = upto;
                    delivered_again(&store, &key, &export.name, upto, &mut failing, &mut retry).await;
                }
            } else {
                failures.inc();
                tracing::warn!(export = %export.name, stalled, "The audit receiver closed the connection or stopped taking records; sending again from record {}", delivered + 1);
                sink = None;
                unconfirmed.clear();
                failing = true;
                if backoff(&mut retry, &mut stop).await {
                    return;
                }
                continue;
            }
        }
        pending.set((*committed.borrow_and_update() - delivered).max(0));
        // A receiver that has not confirmed a few batches gets no more for now.
        let after = unconfirmed.back().map_or(delivered, |(upto, _)| *upto);
        let batch = if unconfirmed.len() >= 4 {
            Vec::new()
        } else {
            match store.run(move |c| records_after(c, after, BATCH)).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(export = %export.name, error = %e, "Reading audit records to export failed");
                    Vec::new()
                }
            }
        };
        if batch.is_empty() {
            let wait = if unconfirmed.is_empty() { Duration::from_secs(5) } else { Duration::from_millis(200) };
            tokio::select! {
                _ = committed.changed() => {}
                () = tokio::time::sleep(wait) => {}
                () = &mut stop => return,
            }
            continue;
        }
        if sink.is_none() {
            match Sink::open(&export.to).await {
                Ok(s) => sink = Some(s),
                Err(e) => {
                    failures.inc();
                    if !failing {
                        tracing::warn!(export = %export.name, error = %format!("{e:#}"), "Audit export cannot reach its receiver; records wait in the audit log");
                    }
                    failing = true;
                    if backoff(&mut retry, &mut stop).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let Some(s) = sink.as_mut() else { continue };
        if !s.open_still() {
            sink = None;
            unconfirmed.clear();
            continue;
        }
        let upto = batch.last().map_or(after, |r| r.seq);
        match s.write(&batch, &host).await {
            Ok(true) => {
                delivered = upto;
                delivered_again(&store, &key, &export.name, upto, &mut failing, &mut retry).await;
            }
            Ok(false) => unconfirmed.push_back((upto, crate::clock::instant())),
            Err(e) => {
                failures.inc();
                if !failing {
                    tracing::warn!(export = %export.name, error = %format!("{e:#}"), "Audit export failed; records wait in the audit log and are sent again from record {}", delivered + 1);
                }
                sink = None;
                unconfirmed.clear();
                failing = true;
                if backoff(&mut retry, &mut stop).await {
                    return;
                }
            }
        }
    }
}

/// Records that the export got up to `upto`, and ends a run of failures.
async fn delivered_again(store: &Store, key: &str, name: &str, upto: i64, failing: &mut bool, retry: &mut Duration) {
    save(store, key, upto).await;
    if *failing {
        tracing::info!(export = %name, upto, "Audit export delivers again");
    }
    *failing = false;
    *retry = RETRY_FIRST;
}

/// Waits `retry` (doubled for next time, up to `RETRY_MOST`); true if `stop` came first.
async fn backoff(retry: &mut Duration, stop: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>) -> bool {
    let wait = *retry;
    *retry = (*retry * 2).min(RETRY_MOST);
    tokio::select! {
        () = tokio::time::sleep(wait) => false,
        () = stop.as_mut() => true,
    }
}

/// Where `poort audit resend` asks an export to start again.
pub fn rewind_key(name: &str) -> String {
    format!("audit_export_resend:{name}")
}

/// The record an export was asked to start again from, taken (asked once, done once).
fn take_rewind(c: &mut Conn, key: &str) -> db::Result<Option<i64>> {
    let from = Store::setting(c, key)?.and_then(|v| v.parse::<i64>().ok());
    if from.is_some() {
        c.execute("DELETE FROM settings WHERE key = ?1", [key])?;
    }
    Ok(from.filter(|f| *f >= 1))
}

async fn save(store: &Store, key: &str, delivered: i64) {
    let key = key.to_string();
    if let Err(e) = store.run(move |c| Store::put_setting(c, &key, &delivered.to_string())).await {
        tracing::error!(error = %e, "Recording how far the audit export got failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Exported {
        Exported {
            seq: 7,
            at: 1_800_000_000,
            kind: "login_failed".into(),
            detail: r#"{"kind":"login_failed","user":"a\"b"}"#.into(),
            prev: vec![1; 32],
            hash: vec![2; 32],
        }
    }

    #[test]
    fn a_json_line_carries_the_hashed_bytes_and_the_parsed_event() {
        let line = record().json();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["detail"], r#"{"kind":"login_failed","user":"a\"b"}"#);
        assert_eq!(v["event"]["user"], "a\"b");
        assert_eq!(v["time"], "2027-01-15T08:00:00Z");
        assert_eq!(v["hash"], "02".repeat(32));
    }

    #[test]
    fn a_syslog_message_is_octet_counted_rfc_5424() {
        let bytes = record().syslog("gate");
        let text = String::from_utf8(bytes).unwrap();
        let (len, msg) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), msg.len());
        // authpriv (10) * 8 + warning (4)
        assert!(msg.starts_with("<84>1 2027-01-15T08:00:00Z gate poort "), "{msg}");
        assert!(msg.contains(" login_failed [poort@32473 seq=\"7\" prev=\""), "{msg}");
    }
}
