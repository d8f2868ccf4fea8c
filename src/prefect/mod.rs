//! The Prefect REST client: one place that knows how to talk to Prefect safely
//! (auth, JSON content type, timeouts bounded by the collection's deadline,
//! retries, CSRF), so the collect groups only say *what* to ask.
//!
//! Files, each below its users: `client` (the `Client`) uses `http` (one
//! request, its answer, transport errors), `retry`, `csrf`, `resolver` (the name
//! cache) and `error` (`ApiError`).

mod client;
mod csrf;
mod error;
mod http;
mod resolver;
mod retry;

pub use client::Client;
pub use error::ApiError;
