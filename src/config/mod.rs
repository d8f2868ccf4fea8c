//! Settings, read once from the environment and validated before anything starts,
//! so that a typo is one clear line and exit code 2 instead of a running exporter
//! that silently reports nothing.
//!
//! The files, each below its users (no file needs a file that needs it):
//! `settings` (the table of variables, `Config`) reads each value with `parse`
//! and `collectors`, the active profile with `profiles` (handing it the table's
//! profile keys) and the proxy with `proxy`; all of them report an
//! `error::ConfigError`.

mod collectors;
mod error;
mod parse;
mod profiles;
mod proxy;
mod settings;

// `crate::config::Collectors` is the type's path for the rest of the crate (the
// collect groups read it through `Config::collectors` today).
#[allow(unused_imports)]
pub use collectors::Collectors;
pub use error::ConfigError;
pub use proxy::mask_userinfo;
pub use settings::*;
