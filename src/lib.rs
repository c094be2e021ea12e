//! poort: a secure remote-access gateway.
//!
//! The modules follow one request through the gateway (docs/architecture.md), then the
//! supporting ones. `gateway::Gateway::stages` reads like the list below.

// Request stages, in order.
pub mod listen;
pub mod gateway;
pub mod request;
pub mod route;
pub mod mitigate;
pub mod session;
pub mod portal;
pub mod tunnel;
pub mod sshd;
pub mod policy;
pub mod proxy;
pub mod audit;
pub mod respond;

// Supporting modules.
pub mod acme;
pub mod admin;
pub mod body;
pub mod certs;
pub mod cli;
pub mod clock;
pub mod config;
pub mod db;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod names;
pub mod secret;
pub mod server;
pub mod ssh;
pub mod state;
pub mod store;
pub mod tls_client;
pub mod upstream;
pub mod whoami;
