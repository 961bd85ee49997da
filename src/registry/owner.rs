//! A cold digest another replica owns (`[cluster]`), asked of that owner
//! instead of upstream, for blobs and manifests alike: the owner's single
//! flight is then the cluster's one upstream fetch.
//!
//! The client's own `Authorization` goes along, so the owner decides access
//! and provenance as it would for the client itself. A request that came
//! from a peer is never passed on to another owner, whatever this replica's
//! view of the members: two replicas that disagree cannot ask each other in
//! a loop.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue};
use url::Url;

use super::App;
use crate::cache::Source;
use crate::cluster::Cluster;
use crate::metrics::METRICS;
use crate::reference::Digest;
use crate::route::RepoRequest;

/// Whether the cold digests a request needs may be asked of their owners,
/// decided once from the request's headers.
#[derive(Clone)]
pub struct Forward(Option<Option<HeaderValue>>);

impl Forward {
    /// Never for a request signed by a peer (verified in dispatch); else
    /// with the client's `Authorization`, if it sent one.
    pub fn of(headers: &HeaderMap) -> Forward {
        if headers.contains_key(crate::cluster::PEER_HEADER) {
            return Forward(None);
        }
        Forward(Some(headers.get(header::AUTHORIZATION).cloned()))
    }

    /// The member to ask for `d`: `None` without a cluster, when this
    /// replica owns `d`, or for a peer's request.
    pub fn owner(&self, app: &App, d: &Digest) -> Option<OwnerAsk> {
        let authorization = self.0.clone()?;
        let cluster = app.cluster.clone()?;
        let owner = cluster.other_owner(d)?;
        Some(OwnerAsk {
            cluster,
            owner,
            authorization,
        })
    }
}

/// What is asked of the owner: the URL kind, and for a manifest the
/// client's `Accept` (what the owner asks upstream with on its own miss).
#[derive(Clone, Copy)]
pub enum Content<'a> {
    Blob,
    Manifest { accept: &'a str, max_len: u64 },
}

#[derive(Clone)]
pub struct OwnerAsk {
    cluster: Arc<Cluster>,
    owner: Url,
    authorization: Option<HeaderValue>,
}

impl OwnerAsk {
    /// The owner's answer for `d` from byte `offset` on, or `None` (logged,
    /// counted) when it gave none: the caller fetches from upstream itself,
    /// so a dead or refusing owner costs one duplicate fetch, never a
    /// failed pull.
    pub async fn open(&self, app: &App, r: &RepoRequest, d: &Digest, what: Content<'_>, offset: u64) -> Option<Source> {
        let up = app.upstream(r);
        let (kind, accept) = match what {
            Content::Blob => ("blobs", None),
            Content::Manifest { accept, .. } => ("manifests", Some(accept)),
        };
        let path = format!("/v2/{}/{}/{kind}/{d}", up.config.namespace, r.repo);
        let label = |result| crate::metrics::PeerFetchLabels { result };
        let asked = crate::cluster::owner_fetch::open(
            &self.cluster,
            &self.owner,
            &path,
            offset,
            self.authorization.as_ref(),
            accept,
        )
        .await;
        match asked {
            Ok(mut source) => {
                METRICS.peer_fetches.get_or_create(&label("owner")).inc();
                app.auth.note_in_repository(up.name(), &r.repo.to_string(), d);
                match what {
                    // Layers are opaque bytes, as from upstream.
                    Content::Blob => source.media_type = None,
                    Content::Manifest { max_len, .. } => source.max_len = Some(max_len),
                }
                Some(source)
            }
            Err(e) => {
                METRICS.peer_fetches.get_or_create(&label("fallback")).inc();
                tracing::info!(digest = %d, error = %e, "the digest's owner did not serve it; fetching from upstream");
                None
            }
        }
    }
}
