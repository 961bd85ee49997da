//! Where upstream may send regmirror with a redirect (rule 8).
//!
//! Registries redirect blob downloads to CDNs. regmirror follows them for
//! reads only, over https unless the upstream itself is plain http, never
//! to a loopback, link-local or private address other than the upstream's
//! own (an upstream may name CDN hosts on private networks it trusts), and
//! never with credentials. The address rule is enforced where names are
//! resolved ([`GuardedResolver`]), so a name cannot pass the check and then
//! resolve somewhere else.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::resolve::UpstreamResolver;

/// Redirect chains longer than this are refused.
pub const MAX_HOPS: usize = 10;

#[derive(Debug, Clone)]
pub struct RedirectPolicy {
    plain_http_allowed: bool,
    /// The upstream's own host and the hosts it allows on private networks.
    trusted: Vec<String>,
}

impl RedirectPolicy {
    pub fn new(upstream: &url::Url, private_redirect_hosts: &[String]) -> Self {
        let mut trusted: Vec<String> = private_redirect_hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        if let Some(h) = upstream.host_str() {
            trusted.push(h.trim_matches(|c| c == '[' || c == ']').to_ascii_lowercase());
        }
        RedirectPolicy {
            plain_http_allowed: upstream.scheme() == "http",
            trusted,
        }
    }

    fn trusts(&self, host: &str) -> bool {
        self.trusted.iter().any(|t| t == host)
    }

    /// Whether a redirect to `target` may be followed; the reason when not.
    pub fn check(&self, target: &url::Url) -> Result<(), String> {
        match target.scheme() {
            "https" => {}
            "http" if self.plain_http_allowed => {}
            "http" => return Err("plain http from an https upstream".into()),
            other => return Err(format!("scheme {other:?}")),
        }
        let host = match target.host() {
            Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err("no host".into()),
        };
        if !target.username().is_empty() || target.password().is_some() {
            return Err("credentials in the URL".into());
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            if !self.trusts(&host) && !is_public(ip) {
                return Err(format!("{ip} is a loopback, link-local or private address"));
            }
        }
        Ok(())
    }
}

/// True for addresses on the public internet: not loopback, link-local,
/// private, unique-local, unspecified, broadcast, documentation or shared.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// A redirect target for logs: no query (CDN URLs carry signed tokens).
pub fn redacted(u: &url::Url) -> String {
    format!("{}://{}{}", u.scheme(), u.host_str().unwrap_or(""), u.path())
}

/// Resolves redirect targets, keeping only public addresses unless the
/// host is the upstream's own or one it trusts on a private network.
pub struct GuardedResolver {
    inner: Arc<UpstreamResolver>,
    policy: RedirectPolicy,
}

impl GuardedResolver {
    pub fn new(inner: Arc<UpstreamResolver>, policy: RedirectPolicy) -> Self {
        GuardedResolver { inner, policy }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_ascii_lowercase();
        let trusted = self.policy.trusts(&host);
        let lookup = self.inner.resolve(name);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = lookup.await?.collect();
            let allowed: Vec<SocketAddr> = addrs.into_iter().filter(|a| trusted || is_public(a.ip())).collect();
            if allowed.is_empty() {
                return Err(format!("redirect host {host} resolves only to private addresses").into());
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(upstream: &str, trusted: &[&str]) -> RedirectPolicy {
        let t: Vec<String> = trusted.iter().map(|s| s.to_string()).collect();
        RedirectPolicy::new(&url::Url::parse(upstream).unwrap(), &t)
    }

    fn check(p: &RedirectPolicy, to: &str) -> Result<(), String> {
        p.check(&url::Url::parse(to).unwrap())
    }

    #[test]
    fn redirects_go_only_to_public_https_or_trusted_hosts() {
        let p = policy("https://registry-1.docker.io", &["cdn.internal", "10.1.2.3"]);
        assert!(check(&p, "https://production.cloudfront.example/blob?sig=x").is_ok());
        assert!(
            check(&p, "http://production.cloudfront.example/blob").is_err(),
            "https → http"
        );
        assert!(check(&p, "https://127.0.0.1/x").is_err());
        assert!(check(&p, "https://10.0.0.7/x").is_err());
        assert!(check(&p, "https://169.254.169.254/latest/meta-data").is_err());
        assert!(check(&p, "https://[::1]/x").is_err());
        assert!(check(&p, "https://[fd00::1]/x").is_err());
        assert!(check(&p, "https://[::ffff:127.0.0.1]/x").is_err());
        assert!(check(&p, "https://10.1.2.3/x").is_ok(), "named as trusted");
        assert!(check(&p, "https://user:pw@cdn.example/x").is_err());
        assert!(check(&p, "file:///etc/passwd").is_err());
        let plain = policy("http://127.0.0.5:5000", &[]);
        assert!(
            check(&plain, "http://127.0.0.5:5000/elsewhere").is_ok(),
            "the upstream's own address"
        );
        assert!(check(&plain, "http://127.0.0.6/x").is_err());
    }

    #[test]
    fn redacted_targets_drop_the_query() {
        let u = url::Url::parse("https://cdn.example/a/b?X-Amz-Signature=secret").unwrap();
        assert_eq!(redacted(&u), "https://cdn.example/a/b");
    }
}
