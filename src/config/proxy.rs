//! Which proxy, if any, carries the requests to Prefect: decided once at start
//! from `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`/`NO_PROXY` (either case), the way
//! curl and Python's httpx (Prefect's own client) read them.
//!
//! ureq's built-in `Proxy::try_from_env()` (the default of every agent) differs
//! in ways a user would trip over: it takes the first of `ALL_PROXY`,
//! `HTTPS_PROXY`, `HTTP_PROXY` whatever the URL's scheme (so `HTTPS_PROXY` alone
//! also captures an `http://` Prefect URL), matches `NO_PROXY` entries exactly
//! without trimming spaces (`localhost, 10.0.0.5` never matches `10.0.0.5`) and
//! without covering subdomains (`example.com` does not cover `prefect.example.com`),
//! and silently drops a proxy URL it cannot parse. The exporter talks to one host,
//! so it decides here and hands ureq the result.

use std::fmt;
use std::net::IpAddr;

use super::error::ConfigError;

/// The proxy to use and the variable it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyChoice {
    /// As given (possibly with `user:pass@`, which ureq sends as
    /// `Proxy-Authorization: Basic`); never logged as is, see `Display`.
    pub url: String,
    pub var: &'static str,
}

impl fmt::Display for ProxyChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (from {})", mask_userinfo(&self.url), self.var)
    }
}

/// Variables naming the proxy for a scheme, in order of precedence: the lower
/// case first, as curl and Python's urllib/httpx prefer it.
fn proxy_vars(https: bool) -> [&'static str; 4] {
    if https {
        ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]
    } else {
        ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
    }
}

/// The proxy for requests to `api_url` (an already validated http(s) URL).
pub fn choose(
    api_url: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<ProxyChoice>, ConfigError> {
    let get = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let https = api_url.starts_with("https://");
    let Some((var, url)) = proxy_vars(https)
        .into_iter()
        .find_map(|var| get(var).map(|v| (var, v.trim().to_string())))
    else {
        return Ok(None);
    };
    let (host, port) = target(api_url);
    let no_proxy = get("no_proxy").or_else(|| get("NO_PROXY"));
    if let Some(list) = no_proxy {
        if bypasses(&list, &host, port) {
            return Ok(None);
        }
    }
    validate(var, &url)?;
    Ok(Some(ProxyChoice { url, var }))
}

fn validate(var: &'static str, url: &str) -> Result<(), ConfigError> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    let bad = |expected: &'static str| ConfigError::Invalid {
        var,
        value: mask_userinfo(url),
        expected,
    };
    match scheme.as_deref() {
        None | Some("http") | Some("https") => {}
        Some(s) if s.starts_with("socks") => {
            return Err(bad(
                "SOCKS proxies are not supported: use an http:// proxy, or list the Prefect host in NO_PROXY",
            ))
        }
        Some(_) => return Err(bad("expected an http:// or https:// proxy URL")),
    }
    ureq::Proxy::new(url)
        .map(|_| ())
        .map_err(|_| bad("expected a proxy URL such as http://proxy.example.com:3128"))
}

/// Host (lower case, IPv6 without brackets) and port of an http(s) URL.
fn target(url: &str) -> (String, u16) {
    let https = url.starts_with("https://");
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let default_port = if https { 443 } else { 80 };
    let (host, port) = split_host_port(authority);
    (
        host.to_ascii_lowercase(),
        port.and_then(|p| p.parse().ok()).unwrap_or(default_port),
    )
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`, or a bare IPv6 address.
fn split_host_port(s: &str) -> (&str, Option<&str>) {
    if let Some(rest) = s.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            return (host, after.strip_prefix(':'));
        }
        return (rest, None);
    }
    match s.rsplit_once(':') {
        // One colon followed by digits: a port. More colons: a bare IPv6 address.
        Some((h, p))
            if !h.contains(':') && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) =>
        {
            (h, Some(p))
        }
        _ => (s, None),
    }
}

/// Whether `NO_PROXY` sends this host around the proxy. Entries are separated by
/// commas (spaces around them ignored): `*` for every host; a domain with or
/// without a leading `.` or `*.`, matching it and its subdomains; an IP address;
/// a CIDR block such as `10.0.0.0/8`; any of these with `:port` to match one port.
pub fn bypasses(no_proxy: &str, host: &str, port: u16) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let host_ip: Option<IpAddr> = host.parse().ok();
    for entry in no_proxy.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if entry == "*" {
            return true;
        }
        if let Some((net, bits)) = entry.split_once('/') {
            let net = net.trim_start_matches('[').trim_end_matches(']');
            if let (Ok(net), Ok(bits), Some(ip)) = (net.parse::<IpAddr>(), bits.parse(), host_ip) {
                if in_network(ip, net, bits) {
                    return true;
                }
            }
            continue;
        }
        let (name, entry_port) = split_host_port(entry);
        if let Some(p) = entry_port {
            if p.parse::<u16>().ok() != Some(port) {
                continue;
            }
        }
        let name = name
            .trim_start_matches('*')
            .trim_start_matches('.')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if name.is_empty() {
            continue;
        }
        if let (Some(ip), Ok(entry_ip)) = (host_ip, name.parse::<IpAddr>()) {
            if ip == entry_ip {
                return true;
            }
            continue;
        }
        if host == name || host.ends_with(&format!(".{name}")) {
            return true;
        }
    }
    false
}

fn in_network(ip: IpAddr, net: IpAddr, bits: u32) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// `http://user:pass@proxy:3128` -> `http://***@proxy:3128`.
pub fn mask_userinfo(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), url),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choose_with(url: &str, pairs: &[(&str, &str)]) -> Option<ProxyChoice> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        choose(url, &move |k: &str| {
            pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
        .unwrap()
    }

    #[test]
    fn proxy_follows_the_scheme_of_the_url() {
        let env = [
            ("HTTPS_PROXY", "http://secure:3128"),
            ("HTTP_PROXY", "http://plain:3128"),
        ];
        assert_eq!(
            choose_with("https://prefect.example.com/api", &env)
                .unwrap()
                .var,
            "HTTPS_PROXY"
        );
        assert_eq!(
            choose_with("http://prefect.example.com/api", &env)
                .unwrap()
                .var,
            "HTTP_PROXY"
        );
        // HTTPS_PROXY alone does not capture plain http (ureq's default would).
        assert_eq!(
            choose_with("http://p/api", &[("HTTPS_PROXY", "http://secure:3128")]),
            None
        );
        let c = choose_with("http://p/api", &[("ALL_PROXY", "proxy:8080")]).unwrap();
        assert_eq!((c.var, c.url.as_str()), ("ALL_PROXY", "proxy:8080"));
    }

    #[test]
    fn lower_case_wins_and_empty_is_unset() {
        let c = choose_with(
            "http://p/api",
            &[
                ("HTTP_PROXY", "http://upper:1"),
                ("http_proxy", "http://lower:1"),
            ],
        )
        .unwrap();
        assert_eq!(c.var, "http_proxy");
        let c = choose_with(
            "http://p/api",
            &[("http_proxy", " "), ("HTTP_PROXY", "http://upper:1")],
        )
        .unwrap();
        assert_eq!(c.var, "HTTP_PROXY");
        assert_eq!(
            choose_with(
                "http://p/api",
                &[("HTTP_PROXY", "http://upper:1"), ("no_proxy", "p")]
            ),
            None
        );
    }

    #[test]
    fn no_proxy_entries() {
        let list = " localhost, .internal.example ,*.corp, 10.0.0.0/8 ,[::1], 192.168.1.5:4200, example.org";
        for (host, port) in [
            ("localhost", 80),
            ("LOCALHOST", 80),
            ("prefect.internal.example", 443),
            ("internal.example", 443),
            ("a.b.corp", 80),
            ("corp", 80),
            ("10.1.2.3", 4200),
            ("::1", 4200),
            ("192.168.1.5", 4200),
            ("example.org", 80),
            ("prefect.example.org", 80),
        ] {
            assert!(bypasses(list, host, port), "{host}:{port}");
        }
        for (host, port) in [
            ("mylocalhost", 80),
            ("internal.example.evil", 80),
            ("11.0.0.1", 80),
            ("::2", 80),
            ("192.168.1.5", 80),
            ("notexample.org", 80),
        ] {
            assert!(!bypasses(list, host, port), "{host}:{port}");
        }
        assert!(bypasses("*", "anything", 1));
        assert!(!bypasses("", "anything", 1));
        assert!(bypasses("fd00::/8", "fd12::1", 1));
    }

    #[test]
    fn target_host_and_port() {
        assert_eq!(target("http://Prefect:4200/api"), ("prefect".into(), 4200));
        assert_eq!(target("https://h/api"), ("h".into(), 443));
        assert_eq!(target("http://[::1]:4200/api"), ("::1".into(), 4200));
        assert_eq!(target("http://h"), ("h".into(), 80));
    }

    #[test]
    fn bad_proxies_are_config_errors_without_credentials() {
        let e = choose("http://p/api", &|k: &str| {
            (k == "HTTP_PROXY").then(|| "socks5://u:pw9@s:1080".to_string())
        })
        .err()
        .unwrap();
        let shown = e.to_string();
        assert!(
            shown.starts_with("HTTP_PROXY=socks5://***@s:1080"),
            "{shown}"
        );
        assert!(!shown.contains("pw9"));
        let e = choose("http://p/api", &|k: &str| {
            (k == "HTTP_PROXY").then(|| "ftp://x".to_string())
        });
        assert!(e.is_err());
    }

    #[test]
    fn a_socks_proxy_stops_the_start_only_where_it_would_be_used() {
        let socks =
            |var: &'static str| move |k: &str| (k == var).then(|| "socks5://s:1080".to_string());
        // The variable of the URL's scheme, or ALL_PROXY without it: refused.
        assert!(choose("http://p/api", &socks("HTTP_PROXY")).is_err());
        assert!(choose("https://p/api", &socks("HTTPS_PROXY")).is_err());
        assert!(choose("https://p/api", &socks("ALL_PROXY")).is_err());
        // The other scheme's variable, or a host in NO_PROXY: not used, no error.
        assert_eq!(choose("http://p/api", &socks("HTTPS_PROXY")), Ok(None));
        assert_eq!(choose("https://p/api", &socks("HTTP_PROXY")), Ok(None));
        let bypassed = |k: &str| match k {
            "HTTPS_PROXY" => Some("socks5://s:1080".to_string()),
            "NO_PROXY" => Some("p".to_string()),
            _ => None,
        };
        assert_eq!(choose("https://p/api", &bypassed), Ok(None));
        // An http proxy in the scheme's variable wins over a SOCKS ALL_PROXY.
        let both = |k: &str| match k {
            "HTTPS_PROXY" => Some("http://h:3128".to_string()),
            "ALL_PROXY" => Some("socks5://s:1080".to_string()),
            _ => None,
        };
        assert!(choose("https://p/api", &both).unwrap().is_some());
    }

    #[test]
    fn display_masks_credentials() {
        let c = ProxyChoice {
            url: "http://user:pw7@proxy:3128".into(),
            var: "HTTPS_PROXY",
        };
        assert_eq!(c.to_string(), "http://***@proxy:3128 (from HTTPS_PROXY)");
        assert_eq!(mask_userinfo("proxy:3128"), "proxy:3128");
    }
}
