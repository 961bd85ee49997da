//! regmirror: a transparent, TLS-intercepting pull-through cache for
//! container registries. See DESIGN.md for the contract this code keeps.
//!
//! The modules follow a request: `server` accepts it, `route` parses it,
//! `registry` handles it, `upstream` asks the real registry, `cache` stores
//! and serves the bytes, `tls` issues the certificates clients see.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod auth;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod events;
pub mod local;
pub mod logging;
pub mod media_types;
pub mod metrics;
pub mod reference;
pub mod registry;
pub mod route;
pub mod server;
pub mod setup;
pub mod status_page;
pub mod tag_policy;
pub mod tls;
pub mod upstream;
pub mod warm;

use std::future::Future;
use std::sync::Arc;

use config::Settings;

/// Everything that can stop regmirror from starting, with the file or
/// setting at fault named in the message.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("CA: {0}")]
    Ca(#[from] tls::ca::CaError),
    #[error("cache directory {path}: {source}")]
    Store { path: String, source: std::io::Error },
    #[error("{0}")]
    Upstream(#[from] upstream::client::ClientBuildError),
    #[error("{0}")]
    Listen(std::io::Error),
    #[error("{0}")]
    Webhook(#[from] events::StartError),
}

/// Loads the CA and store, builds the upstream clients, binds the listeners
/// and serves until `shutdown` resolves.
pub async fn serve(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = tls::CertificateAuthority::load_or_create(&settings.ca_dir, &settings.tls_names())?;
    let ca_pem = ca.cert_pem.clone();
    let issuer = Arc::new(tls::LeafIssuer::new(
        ca,
        settings.tls_names(),
        settings.server_name.clone(),
    ));
    let namespace_moves: Vec<(String, String)> = settings
        .upstreams
        .iter()
        .map(|u| (u.namespace.clone(), u.name.clone()))
        .collect();
    let limits = cache::Limits {
        max_size: settings.max_size,
        low_water: settings.low_water,
    };
    let cache = match &settings.bucket {
        None => {
            cache::Cache::open_disk(
                &settings.cache_dir,
                namespace_moves,
                settings.limits.download_concurrency,
                limits,
            )
            .await
        }
        Some(bucket) => {
            cache::Cache::open_bucket(
                bucket,
                &settings.cache_dir,
                settings.limits.download_concurrency,
                limits,
            )
            .await
        }
    }
    .map_err(|source| StartError::Store {
        path: settings.cache_dir.display().to_string(),
        source,
    })?;
    let via = instance_id();
    let resolver = Arc::new(upstream::resolve::UpstreamResolver::new(
        settings.resolver_overrides.clone(),
    ));
    let upstreams = upstream::UpstreamTable::build(&settings.upstreams, resolver, &via)?;
    let listeners = server::Listeners::bind(settings.https, settings.http, settings.connect)
        .await
        .map_err(StartError::Listen)?;
    let cache = Arc::new(cache);
    let mut auth = auth::Auth::new(auth::access::ClientFilter::new(settings.access_allow.clone()));
    if !settings.locals.is_empty() {
        let signer =
            auth::signed_token::TokenSigner::load_or_create(&settings.ca_dir).map_err(|source| StartError::Store {
                path: settings.ca_dir.display().to_string(),
                source,
            })?;
        auth.local = Some(auth::local::LocalAuth::new(settings.locals.clone(), signer));
    }
    let cluster = match &settings.cluster {
        None => None,
        Some(c) => {
            let c = Arc::new(cluster::Cluster::new(c).map_err(|e| StartError::Listen(std::io::Error::other(e)))?);
            c.spawn_discovery();
            Some(c)
        }
    };
    if let Some(max) = settings.bucket.as_ref().and_then(|b| b.max_size) {
        let namespaces = settings.locals.iter().map(|l| l.namespace.clone()).collect();
        let c = cluster.clone();
        let key = cache::bucket_evict::evictor_key();
        // One evictor: the owner of a well-known key among the members
        // (this replica when it has no [cluster]).
        cache.spawn_bucket_bound(max, namespaces, move || {
            c.as_ref().is_none_or(|c| c.other_owner(&key).is_none())
        });
    }
    let app = Arc::new(registry::App {
        routes: route::RouteTable::from_settings(&settings),
        upstreams,
        cache: cache.clone(),
        auth,
        ca_pem,
        via,
        warming: warm::runs::WarmRuns::new(&settings.warm),
        tag_asks: Default::default(),
        settings,
        hosted: local::Hosted::default(),
        cluster,
    });
    local::Hosted::spawn_background(&app);
    warm::schedule::spawn(&app);
    events::start(&app.settings.webhooks, &app.settings.server_name, &app.via)?;
    let served = server::run(app, issuer, listeners, shutdown).await;
    cache.flush().await;
    served.map_err(StartError::Listen)
}

/// A value unique to this process, for loop detection.
fn instance_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = format!("{}-{nanos}-{:p}", std::process::id(), &nanos);
    reference::Digest::of(seed.as_bytes()).hex()[..16].to_string()
}
