//! "Were we breached?": what an incident responder asks of the audit log first, for a time
//! range. Read from the records themselves (one pass over the range, one over earlier
//! sign-ins), so it works the same on every node and after a restore.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::field;
use crate::clock::{UnixTime, format_minutes};
use crate::db::{self, Conn, params};

/// A count of one thing.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Count {
    pub key: String,
    /// The CVE the thing is about, where its name or reason gives one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cve: Option<String>,
    pub count: u64,
}

/// One record worth a line of its own.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Line {
    pub at: UnixTime,
    pub user: String,
    pub what: String,
    pub client: String,
}

/// One hour of the range: the counts the timeline draws.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Hour {
    pub start: UnixTime,
    pub refused: u64,
    pub failed_sign_ins: u64,
    pub sign_ins: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub since: UnixTime,
    pub until: UnixTime,
    pub records: u64,
    /// Whether the hash chain is whole, and what verification said.
    pub chain_intact: bool,
    pub chain: String,
    /// Requests that matched mitigation rules, by rule.
    pub mitigation: Vec<Count>,
    /// Requests the front door refused, by refusal class.
    pub refused: Vec<Count>,
    /// Sign-ins from an address never seen before for that user.
    pub new_addresses: Vec<Line>,
    /// Failed sign-ins, by client address.
    pub failed_sign_ins: Vec<Count>,
    pub accounts_locked: Vec<Line>,
    pub factor_changes: Vec<Line>,
    pub recovery_codes_used: Vec<Line>,
    pub admin_commands: Vec<Line>,
    pub sessions_ended: Vec<Line>,
    /// Lockdown switched on or off, and requests refused while it was on.
    pub lockdown: Vec<Line>,
    pub locked_out_requests: u64,
    pub tunnels_opened: Vec<Line>,
    /// Rules files and feed files applied or refused (a rolled-back or forged feed shows here).
    pub rules_changes: Vec<Line>,
    /// Seals of the chain in the range, and when the last one was made (a gap of more than
    /// the seal interval means sealing stopped).
    pub seals: u64,
    pub last_seal: Option<UnixTime>,
    /// The longest time between two seals in the range, in seconds.
    pub longest_seal_gap: Option<i64>,
    pub timeline: Vec<Hour>,
}

/// The first `CVE-YYYY-NNNN` in `text`, upper-cased.
pub fn cve_in(text: &str) -> Option<String> {
    let upper = text.to_ascii_uppercase();
    let b = upper.as_bytes();
    let mut from = 0;
    while let Some(i) = upper[from..].find("CVE-") {
        let at = from + i + 4;
        let year = b.get(at..at + 4).filter(|y| y.iter().all(u8::is_ascii_digit));
        let digits = b[at.min(b.len())..].iter().skip(5).take_while(|c| c.is_ascii_digit()).count();
        if year.is_some() && b.get(at + 4) == Some(&b'-') && digits >= 4 {
            return Some(upper[from + i..at + 5 + digits].to_string());
        }
        from = at;
    }
    None
}

/// Builds the report of `[since, until)`; `reason_of` gives a mitigation rule's reason (from
/// the rules in force), to find the CVE it is about.
pub fn build(
    conn: &Conn,
    since: UnixTime,
    until: UnixTime,
    reason_of: impl Fn(&str) -> Option<String>,
) -> db::Result<Report> {
    let mut r = Report { since, until, ..Report::default() };
    // Addresses each user signed in from before the range.
    let mut seen: HashMap<String, HashSet<String>> = HashMap::new();
    let before =
        conn.query_map("SELECT detail FROM audit WHERE kind = 'login_succeeded' AND at < ?1", params![since], |row| {
            row.get::<String>(0)
        })?;
    for d in before.iter().filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok()) {
        seen.entry(field(&d, "user")).or_default().insert(field(&d, "client"));
    }
    let mut mitigation: BTreeMap<String, u64> = BTreeMap::new();
    let mut refused: BTreeMap<String, u64> = BTreeMap::new();
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    let mut hours: BTreeMap<UnixTime, Hour> = BTreeMap::new();
    let mut after = 0i64;
    loop {
        let page = conn.query_map(
            "SELECT seq, at, kind, detail FROM audit WHERE seq > ?1 AND at >= ?2 AND at < ?3 ORDER BY seq LIMIT 5000",
            params![after, since, until],
            |row| Ok((row.get::<i64>(0)?, row.get::<i64>(1)?, row.get::<String>(2)?, row.get::<String>(3)?)),
        )?;
        let Some(last) = page.last() else { break };
        after = last.0;
        for (_, at, kind, detail) in page {
            r.records += 1;
            let Ok(d) = serde_json::from_str::<serde_json::Value>(&detail) else { continue };
            let hour = hours
                .entry(at.div_euclid(3600) * 3600)
                .or_insert_with(|| Hour { start: at.div_euclid(3600) * 3600, ..Hour::default() });
            let line = |what: String| Line { at, user: field(&d, "user"), what, client: field(&d, "client") };
            match kind.as_str() {
                "mitigation_matched" => {
                    *mitigation.entry(field(&d, "rule")).or_default() += 1;
                    hour.refused += 1;
                }
                "request_rejected" => {
                    *refused.entry(field(&d, "code")).or_default() += 1;
                    hour.refused += 1;
                }
                "refusals_counted" => {
                    let n = d.get("count").and_then(serde_json::Value::as_u64).unwrap_or(0);
                    match field(&d, "refusal").as_str() {
                        "mitigation_matched" => *mitigation.entry(field(&d, "key")).or_default() += n,
                        "request_rejected" => *refused.entry(field(&d, "key")).or_default() += n,
                        "locked_down" => r.locked_out_requests += n,
                        _ => {}
                    }
                    hour.refused += n;
                }
                "login_succeeded" => {
                    hour.sign_ins += 1;
                    let (user, client) = (field(&d, "user"), field(&d, "client"));
                    if seen.entry(user).or_default().insert(client) {
                        r.new_addresses.push(line("first sign-in from this address".into()));
                    }
                }
                "login_failed" | "mfa_failed" => {
                    hour.failed_sign_ins += 1;
                    *failed.entry(field(&d, "client")).or_default() += 1;
                }
                "account_locked" => r.accounts_locked.push(line(format!("{} locked", field(&d, "lock")))),
                "factor_changed" => {
                    r.factor_changes.push(line(format!("{} (proved by: {})", field(&d, "change"), field(&d, "proof"))))
                }
                "recovery_code_used" => {
                    r.recovery_codes_used.push(line(format!("{} codes left", field(&d, "remaining"))))
                }
                "admin" => {
                    let by = field(&d, "by");
                    let what = format!("{} {}: {}", field(&d, "command"), field(&d, "target"), field(&d, "detail"));
                    let who = if by.is_empty() { "(command line)".to_string() } else { by };
                    r.admin_commands.push(Line { at, user: who.clone(), what, client: field(&d, "client") });
                    if field(&d, "command").ends_with("lockdown") {
                        let what = format!("lockdown {}", field(&d, "target"));
                        r.lockdown.push(Line { at, user: who, what, client: field(&d, "client") });
                    }
                }
                "session_ended" => r.sessions_ended.push(line(format!("ended by {}", field(&d, "by")))),
                "locked_down" => r.locked_out_requests += 1,
                "tunnel_opened" => r.tunnels_opened.push(line(format!("tunnel {}", field(&d, "tunnel")))),
                "rules_loaded" => {
                    let what = format!(
                        "applied {} version {} ({} rules)",
                        field(&d, "file"),
                        field(&d, "version"),
                        field(&d, "rules")
                    );
                    r.rules_changes.push(Line { at, user: String::new(), what, client: String::new() });
                }
                "rules_refused" => {
                    let what = format!("REFUSED {}: {}", field(&d, "file"), field(&d, "why"));
                    r.rules_changes.push(Line { at, user: String::new(), what, client: String::new() });
                }
                "audit_sealed" => {
                    r.seals += 1;
                    if let Some(before) = r.last_seal {
                        r.longest_seal_gap = Some(r.longest_seal_gap.unwrap_or(0).max(at - before));
                    }
                    r.last_seal = Some(at);
                }
                _ => {}
            }
        }
    }
    let counts = |m: BTreeMap<String, u64>, cve: &dyn Fn(&str) -> Option<String>| {
        let mut v: Vec<Count> = m.into_iter().map(|(key, count)| Count { cve: cve(&key), key, count }).collect();
        v.sort_by(|a, b| b.count.cmp(&a.count).then(a.key.cmp(&b.key)));
        v
    };
    r.mitigation = counts(mitigation, &|rule| cve_in(rule).or_else(|| reason_of(rule).and_then(|why| cve_in(&why))));
    r.refused = counts(refused, &|_| None);
    r.failed_sign_ins = counts(failed, &|_| None);
    r.timeline = hours.into_values().collect();
    match super::verify(conn)? {
        super::Verdict::Intact { records, head } => {
            r.chain_intact = true;
            r.chain = format!("intact: {records} records, head {head}");
        }
        super::Verdict::Broken { seq, why } => r.chain = format!("BROKEN at record {seq}: {why}"),
    }
    Ok(r)
}

impl Report {
    /// The report as text, for a terminal.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(o, "poort audit report, {} to {}", format_minutes(self.since), format_minutes(self.until));
        let _ = writeln!(o, "{} records; hash chain {}", self.records, self.chain);
        let counts = |o: &mut String, title: &str, v: &[Count]| {
            let _ = writeln!(o, "\n{title}: {}", if v.is_empty() { "none" } else { "" });
            for c in v {
                let cve = c.cve.as_deref().map(|c| format!(" ({c})")).unwrap_or_default();
                let _ = writeln!(o, "  {:>8}  {}{cve}", c.count, c.key);
            }
        };
        let lines = |o: &mut String, title: &str, v: &[Line]| {
            let _ = writeln!(o, "\n{title}: {}", if v.is_empty() { "none" } else { "" });
            for l in v {
                let _ = writeln!(o, "  {}  {:<16} {:<15} {}", format_minutes(l.at), l.user, l.client, l.what);
            }
        };
        counts(&mut o, "Requests that matched mitigation rules", &self.mitigation);
        counts(&mut o, "Requests the front door refused, by class", &self.refused);
        lines(&mut o, "Sign-ins from an address not seen before for that user", &self.new_addresses);
        counts(&mut o, "Failed sign-ins and second factors, by address", &self.failed_sign_ins);
        lines(&mut o, "Accounts locked", &self.accounts_locked);
        lines(&mut o, "Changes to second factors", &self.factor_changes);
        lines(&mut o, "Recovery codes used", &self.recovery_codes_used);
        lines(&mut o, "Admin commands", &self.admin_commands);
        lines(&mut o, "Sessions ended", &self.sessions_ended);
        lines(&mut o, "Lockdown switched", &self.lockdown);
        let _ = writeln!(o, "  requests refused by lockdown: {}", self.locked_out_requests);
        lines(&mut o, "Tunnels opened", &self.tunnels_opened);
        lines(&mut o, "Rules files and feed files applied or refused", &self.rules_changes);
        let _ = match self.last_seal {
            Some(t) => writeln!(
                o,
                "\nSeals of the audit log: {} in the range, the last at {}{} (poort audit verify --verification-key checks them)",
                self.seals,
                format_minutes(t),
                self.longest_seal_gap
                    .map(|g| format!("; the longest time between two: {} min", g.div_euclid(60)))
                    .unwrap_or_default()
            ),
            None => writeln!(o, "\nSeals of the audit log: none in the range (poort audit seal-init starts sealing)"),
        };
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cves_are_found_in_names_and_reasons() {
        assert_eq!(cve_in("CVE-2019-19781 target directory").as_deref(), Some("CVE-2019-19781"));
        assert_eq!(cve_in("citrix-bleed cve-2023-4966").as_deref(), Some("CVE-2023-4966"));
        assert_eq!(cve_in("CVE-20-1 then CVE-2024-53704.").as_deref(), Some("CVE-2024-53704"));
        assert_eq!(cve_in("no CVE here, CVE-2019-12"), None);
        assert_eq!(cve_in(""), None);
    }
}
