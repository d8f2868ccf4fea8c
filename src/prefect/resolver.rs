//! The name cache: a host's addresses reused for a while instead of a DNS
//! look-up (and a thread) per request.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// How long a host name's addresses are reused.
pub(super) const DNS_TTL: Duration = Duration::from_secs(30);

/// ureq resolves the host before every request, even one sent on a kept-alive
/// connection, and when the request has a timeout (all of ours do) it resolves in
/// a new thread: one thread started and ended per request. This resolver answers
/// an IP address at once and reuses a host name's addresses for `DNS_TTL`, so a
/// steady collection starts no thread.
#[derive(Debug, Default)]
pub(super) struct CachingResolver {
    inner: DefaultResolver,
    cache: Mutex<Option<(String, Instant, ResolvedSocketAddrs)>>,
}

impl Resolver for CachingResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let port = match (uri.port_u16(), uri.scheme_str()) {
            (Some(p), _) => p,
            (None, Some("http")) => 80,
            (None, Some("https")) => 443,
            // Anything else (a SOCKS proxy): ureq's own rules.
            _ => return self.inner.resolve(uri, config, timeout),
        };
        let Some(host) = uri.host() else {
            return self.inner.resolve(uri, config, timeout);
        };
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            let mut out = self.empty();
            out.push(SocketAddr::new(ip, port));
            return Ok(out);
        }
        let key = format!("{host}:{port}");
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, at, addrs)) = cache.as_ref() {
            if *k == key && at.elapsed() < DNS_TTL {
                return Ok(addrs.clone());
            }
        }
        let addrs = self.inner.resolve(uri, config, timeout)?;
        *cache = Some((key, Instant::now(), addrs.clone()));
        Ok(addrs)
    }
}
