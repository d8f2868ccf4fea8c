//! The configuration error: at the bottom of `config`, so that every file that
//! reports one (profiles, proxy, the parsing of each variable) needs nothing
//! that needs it.

use std::fmt;

#[derive(Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// A variable holds a value the exporter cannot use.
    Invalid {
        var: &'static str,
        /// Already masked when the variable is a secret.
        value: String,
        expected: &'static str,
    },
    /// A command-line argument the exporter does not know.
    UnknownArgument(String),
    /// The profiles file cannot be used.
    Profile { path: String, detail: String },
    /// A bad value that came from the profiles file, not the environment.
    FromProfile {
        error: Box<ConfigError>,
        profile: String,
        path: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Invalid {
                var,
                value,
                expected,
            } => write!(f, "{var}={value}: {expected}"),
            ConfigError::UnknownArgument(arg) => {
                write!(
                    f,
                    "unknown argument {arg}: settings come from the environment, see --help"
                )
            }
            ConfigError::Profile { path, detail } => {
                write!(f, "Prefect profiles file {path}: {detail}")
            }
            ConfigError::FromProfile {
                error,
                profile,
                path,
            } => write!(f, "{error} (set in profile {profile:?} of {path})"),
        }
    }
}

impl std::error::Error for ConfigError {}

pub(super) fn invalid(var: &'static str, value: String, expected: &'static str) -> ConfigError {
    ConfigError::Invalid {
        var,
        value,
        expected,
    }
}
