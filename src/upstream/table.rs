//! The configured upstreams, each with its settings and its client in one
//! entry, so nothing else keeps a parallel list indexed by position.

use std::sync::Arc;

use super::client::{ClientBuildError, UpstreamClient};
use super::resolve::UpstreamResolver;
use crate::config;

pub use crate::route::UpstreamId;

/// One upstream registry: what the operator configured and the client that
/// talks to it.
pub struct Upstream {
    pub id: UpstreamId,
    pub config: config::Upstream,
    pub client: UpstreamClient,
}

impl Upstream {
    /// The upstream's own name (`docker.io`), which also keys its metadata in
    /// the store, so that renaming a namespace loses nothing.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The state of each of the upstream's URLs (healthy or backing off,
    /// last error, last success), in configured order, for the status
    /// page and metrics.
    pub fn url_states(&self) -> Vec<super::UrlState> {
        self.client.url_states()
    }
}

pub struct UpstreamTable {
    entries: Vec<Upstream>,
}

impl UpstreamTable {
    pub fn build(
        upstreams: &[config::Upstream],
        resolver: Arc<UpstreamResolver>,
        via: &str,
    ) -> Result<Self, ClientBuildError> {
        let entries = upstreams
            .iter()
            .enumerate()
            .map(|(i, cfg)| {
                Ok(Upstream {
                    id: UpstreamId::from_config_index(i),
                    config: cfg.clone(),
                    client: UpstreamClient::new(cfg, resolver.clone(), via)?,
                })
            })
            .collect::<Result<Vec<_>, ClientBuildError>>()?;
        Ok(UpstreamTable { entries })
    }

    /// The entry for an id from routing, which is built from the same
    /// configuration as this table, so every id it hands out is in range.
    pub fn get(&self, id: UpstreamId) -> &Upstream {
        &self.entries[id.index()]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Upstream> {
        self.entries.iter()
    }
}
