//! The `poort` binary: parse the command line, set up logging, run, map errors to exit codes.

use clap::Parser;

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("POORT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
