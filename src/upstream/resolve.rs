//! Resolves upstream hostnames without /etc/hosts.
//!
//! Clients point registry hostnames at regmirror in /etc/hosts, and the host
//! regmirror runs on may do the same; asking the system resolver would make
//! regmirror dial itself. This resolver asks DNS directly (the nameservers of
//! /etc/resolv.conf) and honours `[resolver] overrides` from the config.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_resolver::config::{ResolverConfig, ResolverOpts};
use hickory_resolver::TokioAsyncResolver;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

pub struct UpstreamResolver {
    overrides: BTreeMap<String, IpAddr>,
    dns: Arc<TokioAsyncResolver>,
}

impl UpstreamResolver {
    pub fn new(overrides: BTreeMap<String, IpAddr>) -> Self {
        let (config, mut opts) = hickory_resolver::system_conf::read_system_conf().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read /etc/resolv.conf; upstream names resolve only through [resolver] overrides");
            (ResolverConfig::new(), ResolverOpts::default())
        });
        opts.use_hosts_file = false;
        UpstreamResolver {
            overrides,
            dns: Arc::new(TokioAsyncResolver::tokio(config, opts)),
        }
    }
}

impl Resolve for UpstreamResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_ascii_lowercase();
        if let Some(ip) = self.overrides.get(&host) {
            let addrs: Addrs = Box::new(std::iter::once(SocketAddr::new(*ip, 0)));
            return Box::pin(async move { Ok(addrs) });
        }
        let dns = self.dns.clone();
        Box::pin(async move {
            let ips = dns
                .lookup_ip(host.as_str())
                .await
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { format!("resolving {host}: {e}").into() })?;
            let addrs: Vec<SocketAddr> = ips.iter().map(|ip| SocketAddr::new(ip, 0)).collect();
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}
