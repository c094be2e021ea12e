//! The `poort` binary: parse the command line, set up logging, run, map errors to exit codes.

use clap::Parser;

// mimalloc instead of the system allocator: the request path allocates small buffers on
// every request, and glibc malloc showed up at about a tenth of the gateway's CPU time in the
// profile (bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// rustls warns about every client that sends an IP address as SNI (curl and wrk to an IP do):
/// noise, not news, for an operator.
const DEFAULT_LOG: &str = "info,rustls=error";

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("POORT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let cli = poort::cli::Cli::parse();
    match poort::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("poort: {e:#}");
            std::process::exit(1);
        }
    }
}
