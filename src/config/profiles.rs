//! Prefect's profiles file (`profiles.toml`): where a Prefect user already keeps
//! the URL and credentials of their server, so the exporter can use the same
//! settings without repeating them in its environment.
//!
//! Lookup follows Prefect's client: `PREFECT_PROFILES_PATH`, else
//! `$PREFECT_HOME/profiles.toml`, else `~/.prefect/profiles.toml`; the profile is
//! `PREFECT_PROFILE`, else the file's `active`. Only the Prefect client settings
//! (`keys`: the table's entries that a profile may set) are read from it; the
//! environment always wins.
//!
//! Where Prefect is lenient, the exporter is strict on purpose: a malformed file,
//! or a `PREFECT_PROFILE` that names no profile, stops the start with one line
//! naming the file, instead of silently talking to the default server.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::error::ConfigError;
use super::parse::env_value;

/// Profiles Prefect ships with: naming one that the user's file lacks is valid
/// for Prefect (it falls back to its bundled copy, which sets nothing the
/// exporter reads differently from its defaults), so it is no error here either.
const BUNDLED_PROFILES: &[&str] = &["ephemeral", "local", "test", "cloud"];

/// The active profile: its name, file, and the settings the exporter reads.
/// `Debug` and `Display` show the setting names only: values may be secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub path: PathBuf,
    values: HashMap<String, String>,
}

impl Profile {
    /// The value of a Prefect client setting in this profile, as text.
    pub fn get(&self, name: &str) -> Option<String> {
        self.values.get(name).cloned()
    }

    /// The names of the settings this profile provides, sorted, for the start-up log.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self.values.keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Profile({self})")
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}: {})",
            self.name,
            self.path.display(),
            if self.values.is_empty() {
                "no client settings".to_string()
            } else {
                self.keys().join(",")
            }
        )
    }
}

/// Where the profiles file is, from the environment; `None` when there is no
/// home directory to look in.
pub fn profiles_path(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let get = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let home = get("HOME");
    let expand = |p: String| -> PathBuf {
        match (p.strip_prefix("~/"), &home) {
            (Some(rest), Some(h)) => Path::new(h).join(rest),
            _ if p == "~" && home.is_some() => PathBuf::from(home.clone().unwrap_or_default()),
            _ => PathBuf::from(p),
        }
    };
    if let Some(p) = get("PREFECT_PROFILES_PATH") {
        return Some(expand(p));
    }
    if let Some(h) = get("PREFECT_HOME") {
        return Some(expand(h).join("profiles.toml"));
    }
    home.map(|h| Path::new(&h).join(".prefect").join("profiles.toml"))
}

/// Loads the active profile. `Ok(None)`: no file, or no profile is active.
pub fn load(
    env: &dyn Fn(&str) -> Option<String>,
    keys: &[&str],
) -> Result<Option<Profile>, ConfigError> {
    let Some(path) = profiles_path(env) else {
        return Ok(None);
    };
    let chosen = env("PREFECT_PROFILE").filter(|v| !v.trim().is_empty());
    // Only the default place (under HOME) may be unreachable without a word: in
    // a container HOME often points at a directory the user cannot read.
    let implicit = ["PREFECT_PROFILES_PATH", "PREFECT_HOME"]
        .iter()
        .all(|v| env(v).is_none_or(|x| x.trim().is_empty()));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) || (implicit && e.kind() == std::io::ErrorKind::PermissionDenied) =>
        {
            return match chosen {
                Some(name) if !BUNDLED_PROFILES.contains(&name.trim()) => Err(profile_error(
                    &path,
                    format!("PREFECT_PROFILE={name} names a profile, but this file does not exist"),
                )),
                _ => Ok(None),
            };
        }
        Err(e) => return Err(profile_error(&path, format!("cannot read it: {e}"))),
    };
    parse(&text, &path, chosen.as_deref().map(str::trim), keys)
}

/// Picks and reads the active profile out of the file's text.
fn parse(
    text: &str,
    path: &Path,
    chosen: Option<&str>,
    keys: &[&str],
) -> Result<Option<Profile>, ConfigError> {
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        // The parser's own rendering quotes the offending line, which may hold a
        // key or password: say only where and what.
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let message = e.message().trim().replace('\n', "; ");
        match line {
            Some(l) => profile_error(path, format!("not valid TOML (line {l}: {message})")),
            None => profile_error(path, format!("not valid TOML ({message})")),
        }
    })?;
    let active = match doc.get("active") {
        None => None,
        Some(toml::Value::String(s)) => Some(s.as_str()),
        Some(_) => {
            return Err(profile_error(
                path,
                "`active` must be a string naming a profile".into(),
            ))
        }
    };
    let profiles = match doc.get("profiles") {
        None => None,
        Some(toml::Value::Table(t)) => Some(t),
        Some(_) => {
            return Err(profile_error(
                path,
                "`profiles` must be a table of [profiles.<name>] tables".into(),
            ))
        }
    };
    let (name, from_env) = match (chosen, active) {
        (Some(n), _) => (n, true),
        (None, Some(n)) => (n, false),
        (None, None) => return Ok(None),
    };
    let table = match profiles.and_then(|p| p.get(name)) {
        Some(toml::Value::Table(t)) => t,
        Some(_) => {
            return Err(profile_error(
                path,
                format!("profile {name:?} must be a table ([profiles.{name}])"),
            ))
        }
        None if BUNDLED_PROFILES.contains(&name) => return Ok(None),
        None if from_env => {
            return Err(profile_error(
                path,
                format!(
                    "PREFECT_PROFILE={name} names no profile in this file (profiles: {})",
                    names(profiles)
                ),
            ))
        }
        None => {
            // Prefect falls back to its default profile without a word; a file
            // whose active profile does not exist is broken: say so.
            return Err(profile_error(
                path,
                format!(
                    "active = {name:?} names no profile in this file (profiles: {})",
                    names(profiles)
                ),
            ));
        }
    };
    let mut values = HashMap::new();
    for key in keys {
        let Some(value) = table.get(*key) else {
            continue;
        };
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            // `prefect config set` writes the headers as a JSON string; a TOML
            // table says the same thing and is accepted too.
            toml::Value::Table(t) if *key == "PREFECT_CLIENT_CUSTOM_HEADERS" => {
                serde_json::Value::Object(
                    t.iter()
                        .map(|(k, v)| (k.clone(), to_json(v)))
                        .collect::<serde_json::Map<_, _>>(),
                )
                .to_string()
            }
            _ => {
                return Err(profile_error(
                    path,
                    format!("{key} in profile {name:?}: expected a string, number or boolean"),
                ))
            }
        };
        values.insert((*key).to_string(), text);
    }
    Ok(Some(Profile {
        name: name.to_string(),
        path: path.to_path_buf(),
        values,
    }))
}

fn names(profiles: Option<&toml::Table>) -> String {
    let list: Vec<&str> = profiles
        .map(|p| p.keys().map(String::as_str).collect())
        .unwrap_or_default();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

fn to_json(v: &toml::Value) -> serde_json::Value {
    match v {
        toml::Value::String(s) => serde_json::Value::String(s.clone()),
        toml::Value::Integer(i) => serde_json::Value::from(*i),
        toml::Value::Float(f) => serde_json::Value::from(*f),
        toml::Value::Boolean(b) => serde_json::Value::Bool(*b),
        toml::Value::Datetime(d) => serde_json::Value::String(d.to_string()),
        toml::Value::Array(a) => serde_json::Value::Array(a.iter().map(to_json).collect()),
        toml::Value::Table(t) => serde_json::Value::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .collect::<serde_json::Map<_, _>>(),
        ),
    }
}

fn profile_error(path: &Path, detail: String) -> ConfigError {
    ConfigError::Profile {
        path: path.display().to_string(),
        detail,
    }
}

/// The lookup `from_lookup` reads: the environment first (an empty value counts
/// as unset), then the active profile (which holds Prefect client settings only).
pub fn env_then_profile<'a>(
    env: &'a dyn Fn(&str) -> Option<String>,
    profile: Option<&'a Profile>,
) -> impl Fn(&str) -> Option<String> + 'a {
    move |name: &str| env_value(env, name).or_else(|| profile.and_then(|p| p.get(name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `parse` and `load` with the table's profile keys.
    fn parse(
        text: &str,
        path: &Path,
        chosen: Option<&str>,
    ) -> Result<Option<Profile>, ConfigError> {
        super::parse(text, path, chosen, &crate::config::settings::profile_keys())
    }

    fn load(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Profile>, ConfigError> {
        super::load(env, &crate::config::settings::profile_keys())
    }

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn parse_err(text: &str, chosen: Option<&str>) -> String {
        parse(text, Path::new("/p/profiles.toml"), chosen)
            .expect_err("should be rejected")
            .to_string()
    }

    #[test]
    fn path_precedence() {
        let p = profiles_path(&env(&[
            ("PREFECT_PROFILES_PATH", "/a/p.toml"),
            ("PREFECT_HOME", "/h"),
            ("HOME", "/home/u"),
        ]));
        assert_eq!(p, Some(PathBuf::from("/a/p.toml")));
        let p = profiles_path(&env(&[("PREFECT_HOME", "/h"), ("HOME", "/home/u")]));
        assert_eq!(p, Some(PathBuf::from("/h/profiles.toml")));
        let p = profiles_path(&env(&[("HOME", "/home/u")]));
        assert_eq!(p, Some(PathBuf::from("/home/u/.prefect/profiles.toml")));
        let p = profiles_path(&env(&[("PREFECT_HOME", "~/ph"), ("HOME", "/home/u")]));
        assert_eq!(p, Some(PathBuf::from("/home/u/ph/profiles.toml")));
        let p = profiles_path(&env(&[("PREFECT_PROFILES_PATH", ""), ("HOME", "/home/u")]));
        assert_eq!(p, Some(PathBuf::from("/home/u/.prefect/profiles.toml")));
        assert_eq!(profiles_path(&env(&[])), None);
    }

    const FILE: &str = r#"
active = "dev"

[profiles.dev]
PREFECT_API_URL = "http://dev:4200/api"
PREFECT_API_AUTH_STRING = "admin:s3cret"
PREFECT_API_REQUEST_TIMEOUT = 7.5
PREFECT_CLIENT_MAX_RETRIES = 2
PREFECT_API_TLS_INSECURE_SKIP_VERIFY = true
PREFECT_SERVER_API_PORT = 4200
EXPORTER_PORT = "9999"
SOME_LIST = [1, 2]

[profiles.prod]
PREFECT_API_URL = "https://prod/api"
PREFECT_CLIENT_CUSTOM_HEADERS = { X-Team = "data" }
"#;

    #[test]
    fn active_profile_values_as_text() {
        let p = parse(FILE, Path::new("/p"), None).unwrap().unwrap();
        assert_eq!(p.name, "dev");
        assert_eq!(p.get("PREFECT_API_URL").unwrap(), "http://dev:4200/api");
        assert_eq!(p.get("PREFECT_API_REQUEST_TIMEOUT").unwrap(), "7.5");
        assert_eq!(p.get("PREFECT_CLIENT_MAX_RETRIES").unwrap(), "2");
        assert_eq!(
            p.get("PREFECT_API_TLS_INSECURE_SKIP_VERIFY").unwrap(),
            "true"
        );
        // Only Prefect client settings: not the exporter's own, not the server's.
        assert_eq!(p.get("EXPORTER_PORT"), None);
        assert_eq!(p.get("PREFECT_SERVER_API_PORT"), None);
        let shown = p.to_string();
        assert!(shown.contains("PREFECT_API_AUTH_STRING") && !shown.contains("s3cret"));
    }

    #[test]
    fn prefect_profile_picks_another_profile() {
        let p = parse(FILE, Path::new("/p"), Some("prod")).unwrap().unwrap();
        assert_eq!(p.name, "prod");
        assert_eq!(p.get("PREFECT_API_URL").unwrap(), "https://prod/api");
        let headers: serde_json::Value =
            serde_json::from_str(&p.get("PREFECT_CLIENT_CUSTOM_HEADERS").unwrap()).unwrap();
        assert_eq!(headers, serde_json::json!({"X-Team": "data"}));
    }

    #[test]
    fn missing_profile_named_by_prefect_profile_is_an_error_naming_the_file() {
        let e = parse_err(FILE, Some("staging"));
        assert!(e.contains("/p/profiles.toml"), "{e}");
        assert!(e.contains("PREFECT_PROFILE=staging"), "{e}");
        assert!(e.contains("dev, prod"), "{e}");
    }

    #[test]
    fn bundled_profile_names_are_not_errors() {
        assert_eq!(parse(FILE, Path::new("/p"), Some("local")).unwrap(), None);
        let only_active = "active = \"ephemeral\"\n";
        assert_eq!(parse(only_active, Path::new("/p"), None).unwrap(), None);
    }

    #[test]
    fn no_active_profile_is_fine() {
        assert_eq!(
            parse(
                "[profiles.x]\nPREFECT_API_URL = \"http://x/api\"\n",
                Path::new("/p"),
                None
            )
            .unwrap(),
            None
        );
        assert_eq!(parse("", Path::new("/p"), None).unwrap(), None);
    }

    #[test]
    fn malformed_files_are_errors_naming_the_file_without_secrets() {
        let e = parse_err(
            "active = \"dev\"\n[profiles.dev]\nPREFECT_API_KEY = pnu_s3cr3tkey\n",
            None,
        );
        assert!(e.contains("/p/profiles.toml"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(!e.contains("s3cr3t"), "{e}");
        let e = parse_err("active = 3\n", None);
        assert!(e.contains("active"), "{e}");
        let e = parse_err("profiles = \"x\"\n", None);
        assert!(e.contains("profiles"), "{e}");
        let e = parse_err(
            "active = \"a\"\n[profiles.a]\nPREFECT_API_URL = [\"x\"]\n",
            None,
        );
        assert!(e.contains("PREFECT_API_URL"), "{e}");
        let e = parse_err("active = \"nope\"\n[profiles.a]\n", None);
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn missing_file_is_fine_unless_a_profile_was_asked_for() {
        let dir = std::env::temp_dir().join(format!("pe-prof-{}", std::process::id()));
        let home = dir.to_string_lossy().to_string();
        let get = move |k: &str| match k {
            "PREFECT_HOME" => Some(home.clone()),
            _ => None,
        };
        assert_eq!(load(&get).unwrap(), None);
        // HOME a file, not a directory: no profiles either.
        let file = std::env::temp_dir().join(format!("pe-prof-file-{}", std::process::id()));
        std::fs::write(&file, "x").unwrap();
        let home = file.to_string_lossy().to_string();
        let get_file_home = move |k: &str| (k == "HOME").then(|| home.clone());
        assert_eq!(load(&get_file_home).unwrap(), None);
        let _ = std::fs::remove_file(&file);
        let home = dir.to_string_lossy().to_string();
        let get = move |k: &str| match k {
            "PREFECT_HOME" => Some(home.clone()),
            "PREFECT_PROFILE" => Some("prod".into()),
            _ => None,
        };
        let e = load(&get).err().unwrap().to_string();
        assert!(
            e.contains("profiles.toml") && e.contains("PREFECT_PROFILE=prod"),
            "{e}"
        );
    }
}
