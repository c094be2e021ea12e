//! What poort counts for Prometheus (the `prometheus-client` crate encodes it), served on the
//! admin listener (`server::admin`), never on the public port. Counters and histograms are
//! updated where things happen; gauges of state that lives elsewhere (open tunnels, the audit
//! queue, idle upstream connections) are read when Prometheus asks.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// An app's name as a label value, shared rather than copied per request.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(pub Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, w: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(w, &self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The app, or "-" for poort's own pages and requests that reached no app.
    pub app: Name,
    /// "2xx" to "5xx".
    pub status: &'static str,
    /// Why poort refused it, or "-".
    pub refused: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabels {
    pub app: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignInLabels {
    /// "ok" or "failed".
    pub result: &'static str,
    /// "first" (a password, a directory, single sign-on or a passwordless passkey), or the
    /// second factor: "otp", "recovery", "passkey".
    pub factor: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: String,
    /// "deny", "throttle" or "log".
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExportLabels {
    pub export: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

type Timing = Family<AppLabels, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    // 0.1 ms to about 6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    /// From the request's head to the answer's head, poort's work and the app's together.
    pub request_seconds: Histogram,
    /// The app's part: from sending the request to its answer's head.
    pub upstream_seconds: Timing,
    pub handshakes: Family<ResultLabels, Counter>,
    pub connections: Gauge,
    pub websockets: Gauge,
    pub tunnels: Gauge,
    pub sign_ins: Family<SignInLabels, Counter>,
    pub lockouts: Counter,
    pub rule_hits: Family<RuleLabels, Counter>,
    pub rule_reloads: Family<ResultLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub audit_queue: Gauge,
    pub audit_export_pending: Family<ExportLabels, Gauge>,
    pub audit_export_failures: Family<ExportLabels, Counter>,
    pub audit_write_seconds: Histogram,
    pub upstream_idle: Gauge,
    pub sessions_cached: Gauge,
    /// The version of the mitigation feed file in force (0: none).
    pub feed_version: Gauge,
    /// When the feed last answered, as a Unix time (0: never).
    pub feed_answered: Gauge,
    /// When the audit log was last sealed and its key moved on, as a Unix time (0: never).
    pub audit_sealed: Gauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("poort");
        let m = Metrics {
            requests: Family::default(),
            request_seconds: seconds(),
            upstream_seconds: Family::new_with_constructor(seconds as fn() -> Histogram),
            handshakes: Family::default(),
            connections: Gauge::default(),
            websockets: Gauge::default(),
            tunnels: Gauge::default(),
            sign_ins: Family::default(),
            lockouts: Counter::default(),
            rule_hits: Family::default(),
            rule_reloads: Family::default(),
            config_reloads: Family::default(),
            audit_queue: Gauge::default(),
            audit_export_pending: Family::default(),
            audit_export_failures: Family::default(),
            audit_write_seconds: seconds(),
            upstream_idle: Gauge::default(),
            sessions_cached: Gauge::default(),
            feed_version: Gauge::default(),
            feed_answered: Gauge::default(),
            audit_sealed: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("requests", "Requests answered, by app, status class and refusal", m.requests.clone());
        r.register("request_duration_seconds", "From a request's head to its answer's head", m.request_seconds.clone());
        r.register(
            "upstream_duration_seconds",
            "From sending a request to an app to the head of its answer",
            m.upstream_seconds.clone(),
        );
        r.register("tls_handshakes", "TLS handshakes with clients, by result", m.handshakes.clone());
        r.register("open_connections", "Client connections open now", m.connections.clone());
        r.register("open_websockets", "WebSockets to apps open now", m.websockets.clone());
        r.register("open_tunnels", "Tunnels open now", m.tunnels.clone());
        r.register("sign_ins", "Sign-in attempts, by result and factor", m.sign_ins.clone());
        r.register("lockouts", "Accounts locked after failed sign-ins", m.lockouts.clone());
        r.register(
            "mitigation_rule_hits",
            "Requests an emergency rule matched, by rule and action",
            m.rule_hits.clone(),
        );
        r.register("mitigation_rule_reloads", "Readings of the rules file, by result", m.rule_reloads.clone());
        r.register(
            "mitigation_feed_version",
            "The version of the feed file in force (0: none)",
            m.feed_version.clone(),
        );
        r.register(
            "mitigation_feed_answered_timestamp_seconds",
            "When the mitigation feed last answered (0: never); an old time means the feed is unreachable",
            m.feed_answered.clone(),
        );
        r.register(
            "audit_sealed_timestamp_seconds",
            "When the audit log was last sealed and its key moved on (0: never); older than a few seal intervals means sealing stopped",
            m.audit_sealed.clone(),
        );
        r.register("config_reloads", "Changed configs read while running, by result", m.config_reloads.clone());
        r.register("audit_queue", "Audit records waiting to be written", m.audit_queue.clone());
        r.register(
            "audit_export_pending",
            "Audit records committed but not yet delivered, by export",
            m.audit_export_pending.clone(),
        );
        r.register(
            "audit_export_failures",
            "Failed attempts to reach or write to an export",
            m.audit_export_failures.clone(),
        );
        r.register("audit_write_duration_seconds", "Writing one batch of audit records", m.audit_write_seconds.clone());
        r.register("upstream_idle_connections", "Idle pooled connections to apps", m.upstream_idle.clone());
        r.register("sessions_cached", "Sessions in the cache of this process", m.sessions_cached.clone());
        let build = Family::<BuildLabels, Gauge>::default();
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION") }).set(1);
        r.register("build_info", "The running poort's version", build);
        Metrics { registry, ..m }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts an answered request.
    pub fn request(&self, app: Option<&Name>, status: u16, refused: Option<&'static str>) {
        let status = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let app = app.cloned().unwrap_or_else(|| Name(Arc::from("-")));
        self.requests.get_or_create(&RequestLabels { app, status, refused: refused.unwrap_or("-") }).inc();
    }

    /// Counts a sign-in attempt: `factor` is "first" or a second factor's name.
    pub fn sign_in(&self, ok: bool, factor: &'static str) {
        self.sign_ins.get_or_create(&SignInLabels { result: if ok { "ok" } else { "failed" }, factor }).inc();
    }

    /// Counts a request an emergency rule matched.
    pub fn rule_hit(&self, rule: &str, action: &'static str) {
        self.rule_hits.get_or_create(&RuleLabels { rule: rule.chars().take(64).collect(), action }).inc();
    }

    /// Counts a reading of the rules file: "loaded" or "refused".
    pub fn rules_read(&self, result: &'static str) {
        self.rule_reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts a reading of a changed config: "loaded" or "refused".
    pub fn config_read(&self, result: &'static str) {
        self.config_reloads.get_or_create(&ResultLabels { result }).inc();
    }
}

/// Keeps a gauge one higher while it lives.
pub struct Held(Gauge<i64, AtomicI64>);

impl Held {
    pub fn new(g: &Gauge<i64, AtomicI64>) -> Held {
        g.inc();
        Held(g.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}
