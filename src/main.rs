//! The `poort` binary: parse the command line, set up logging, run, map errors to exit codes.

use clap::Parser;

// mimalloc instead of the system allocator: the request path allocates small buffers on
// every request, and glibc malloc showed up at about a tenth of the gateway's CPU time in the
// profile (bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = poort::cli::Cli::parse();
    match poort::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("poort: {e:#}");
            std::process::exit(1);
        }
    }
}
