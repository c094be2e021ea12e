//! poort: a secure remote-access gateway.
//!
//! The modules follow one request through the gateway (docs/architecture.md), then the
//! supporting ones. `gateway::Gateway::handle` reads like the list below.

// Request stages, in order.
pub mod listen;
pub mod request;
pub mod mitigate;
pub mod session;
pub mod route;
pub mod policy;
pub mod portal;
pub mod proxy;
pub mod tunnel;
pub mod audit;

// Supporting modules.
pub mod body;
pub mod cli;
pub mod clock;
pub mod config;
pub mod gateway;
pub mod identity;
pub mod names;
pub mod respond;
pub mod secret;
pub mod server;
pub mod state;
pub mod store;
pub mod upstream;
pub mod whoami;
