//! Integration tests: each starts a real gateway on a loopback port with real upstreams.
#![allow(clippy::unwrap_used)]
// Tests measure real time (how soon a connection is cut).
#![allow(clippy::disallowed_methods)]

mod acme;
mod admin_console;
mod audit_export;
mod audit_report;
mod audit_seal;
mod cli;
mod cluster;
mod compat;
mod flow;
mod forward_auth;
mod front_door;
mod harness;
mod layers;
mod logs;
pub mod ldap;
mod metrics;
mod mfa;
mod mitigate;
mod mitigate_feed;
mod oidc;
mod passkey;
mod proxy;
mod reload;
mod routes;
mod security_factors;
mod security_framing;
mod security_headers;
mod security_paths;
mod security_session;
mod security_websockets;
mod ssh_ca;
mod sshd;
mod store;
mod streaming;
mod tls;
mod tunnel;
mod upstream_tls;
