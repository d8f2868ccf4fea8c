//! The one integration-test binary (`cargo test --test it`): one module per promise,
//! all sharing one harness ([`support`]) and one seeded Prefect server
//! ([`support::PrefectServer::shared`]). Run one module or test with
//! `cargo test --test it -- <module>::` or `-- <module>::<test>`.

mod support;

mod breakdowns;
mod client_settings;
mod config_errors;
mod container;
mod demo;
mod deploy;
mod exactness;
mod faults;
mod golden_render;
mod hostile_clients;
mod monitoring;
mod operators;
mod prometheus_e2e;
mod request_cost;
mod secrets;
mod seed_metrics;
mod self_metrics;
mod shutdown;
mod state_changes;
mod stub_faults;
mod tls;
