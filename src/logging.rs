//! Where poort's log goes and in what form: standard error, as text (with colours only when
//! it is a terminal and `NO_COLOR` is not set) or as one JSON object per line. `POORT_LOG`
//! chooses what is logged (docs/operations.md).

use std::io::IsTerminal;

use crate::config::LogSettings;

/// Without `POORT_LOG`: information and up. rustls warns about every client that sends an IP
/// address as SNI (curl and wrk to an IP do): noise, not news, for an operator.
const DEFAULT_FILTER: &str = "info,rustls=error";

/// Starts logging as `settings` say; a second call changes nothing.
pub fn init(settings: LogSettings) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("POORT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if settings.json {
        builder.json().with_current_span(false).with_span_list(false).try_init()
    } else {
        builder.with_ansi(colours()).try_init()
    };
}

/// Colours only for a person at a terminal who has not asked for none (no-color.org).
fn colours() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
