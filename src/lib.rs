//! The exporter as a library: `main.rs` wires these modules into the binary, and
//! the integration tests use them directly instead of including source files.
//!
//! Data flows one way: `config` (the environment) -> `prefect` (the client) ->
//! `collect` (one module per group, each owning its families) -> `metrics` (the
//! rendered text) -> `server` (HTTP). `rfc3339` and `process` sit below all of
//! them.

pub mod collect;
pub mod collector;
pub mod config;
pub mod metrics;
pub mod prefect;
pub mod process;
pub mod rfc3339;
pub mod server;
