//! Who may read what, decided once per request at the dispatch seam.
//!
//! - `challenge`: the `WWW-Authenticate` clients see, on the host they used.
//! - `token`: regmirror's `/token` endpoint: client token requests relayed
//!   to upstream's realm with scopes rewritten, or answered by regmirror
//!   itself with an anonymous token when the client has no credentials.
//! - `scope`: typed scopes and their rewriting between client and upstream
//!   names.
//! - `access`: client networks, repository allow-lists, and the bounded
//!   memory of checks made upstream.
//!
//! The rule (DESIGN.md rule 11): content regmirror could fetch anonymously
//! is public and served to anyone allowed to use the proxy. Anything else
//! is served only to a client whose own token upstream accepts for the
//! repository asked for, checked with one upstream HEAD per (token,
//! repository) and remembered until the token expires. Handlers receive an
//! [`Access`] and ask it; they never read credentials from headers.

pub mod access;
pub mod challenge;
pub mod htpasswd;
pub mod local;
pub mod scope;
pub mod signed_token;
pub mod token;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{header, HeaderMap, HeaderValue, Method, StatusCode};

use crate::cache::Cache;
use crate::reference::{Digest, RepoName};
use crate::registry::errors::RegistryError;
use crate::upstream::{AuthScheme, Credential, Upstream, UpstreamRequest};
use access::{ClientFilter, Remembered};

/// The prefix of tokens regmirror issues itself: they stand for "nobody in
/// particular" and grant exactly what no token grants.
pub const ANONYMOUS_TOKEN_PREFIX: &str = "regmirror-anonymous.";
/// How long regmirror's anonymous tokens say they live.
pub const ANONYMOUS_TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// How long an anonymous proof that a repository is public is trusted.
const PUBLIC_PROOF: Duration = Duration::from_secs(600);
/// How long a check of a client token is trusted when the token does not
/// say when it expires (it is not a JWT).
const OPAQUE_TOKEN_CHECK: Duration = Duration::from_secs(60);
/// The longest a check is trusted, whatever the token says.
const MAX_TOKEN_CHECK: Duration = Duration::from_secs(3600);
/// How long upstream's word that a digest is in a repository is trusted.
const IN_REPOSITORY_PROOF: Duration = Duration::from_secs(3600);

/// Who is asking.
#[derive(Clone, Debug)]
pub enum Identity {
    /// Regmirror's anonymous token: may read what is public.
    Anonymous,
    /// A credential upstream issued to this client, sent upstream as is.
    Client(ClientToken),
}

/// A client's own credential (its whole `Authorization` value).
#[derive(Clone)]
pub struct ClientToken {
    header: HeaderValue,
    /// Identifies the token in memory without keeping a second copy of it.
    key: String,
    /// How long a check of it may be trusted.
    lifetime: Duration,
}

impl std::fmt::Debug for ClientToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientToken({}…)", &self.key[..8])
    }
}

impl ClientToken {
    fn new(header: HeaderValue) -> Self {
        let key = Digest::of(header.as_bytes()).hex().to_string();
        let lifetime = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .and_then(jwt_lifetime)
            .unwrap_or(OPAQUE_TOKEN_CHECK)
            .min(MAX_TOKEN_CHECK);
        ClientToken { header, key, lifetime }
    }
}

/// Seconds left before a JWT's `exp`, when the token is a JWT that says.
fn jwt_lifetime(token: &str) -> Option<Duration> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let exp = serde_json::from_slice::<serde_json::Value>(&raw).ok()?["exp"].as_u64()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(exp.saturating_sub(now)))
}

/// Access state shared by all requests.
#[derive(Default)]
pub struct Auth {
    pub clients: ClientFilter,
    /// Logins and rights of the local namespaces, when any is configured.
    pub local: Option<local::LocalAuth>,
    /// (token key, upstream, repository) upstream accepted the token for.
    checked: Remembered<(String, String, String)>,
    /// (upstream, repository) read anonymously, lately.
    public_repos: Remembered<(String, String)>,
    /// (upstream, repository, digest) upstream served or confirmed in that
    /// repository: a token checked for a repository reads only content that
    /// is in it (upstream would not serve another repository's content).
    in_repository: Remembered<(String, String, String)>,
}

/// The request was refused for want of a usable credential: a 401 with a
/// challenge (added at the seam, which knows how the client got here).
pub fn unauthorized(message: impl Into<String>) -> RegistryError {
    RegistryError::unauthorized(message)
}

impl Auth {
    pub fn new(clients: ClientFilter) -> Self {
        Auth {
            clients,
            ..Default::default()
        }
    }

    /// Decides who asks, from the request's `Authorization`. With no
    /// credential at all, a client of an upstream known to authenticate is
    /// challenged (as upstream would), so that it does the token dance.
    pub async fn identify(&self, upstream: &Upstream, headers: &HeaderMap) -> Result<Identity, RegistryError> {
        let scheme = upstream.client.discover_auth().await;
        if scheme == AuthScheme::Open {
            return Ok(Identity::Anonymous);
        }
        match headers.get(header::AUTHORIZATION) {
            // Not known to challenge (unreachable so far): nothing to ask
            // the client for; what is public and cached is still served.
            None if scheme == AuthScheme::Unknown => Ok(Identity::Anonymous),
            None => Err(unauthorized("authentication required")),
            Some(h) if is_anonymous_token(h) => Ok(Identity::Anonymous),
            Some(h) => Ok(Identity::Client(ClientToken::new(h.clone()))),
        }
    }

    /// Records that upstream served `d` in `repo` (a fetch by digest there
    /// succeeded).
    pub fn note_in_repository(&self, upstream: &str, repo: &str, d: &Digest) {
        self.in_repository
            .remember((upstream.into(), repo.into(), d.to_string()), IN_REPOSITORY_PROOF);
    }

    /// Who asks, where no challenge is due (listings across upstreams).
    pub fn identity_of(&self, headers: &HeaderMap) -> Identity {
        match headers.get(header::AUTHORIZATION) {
            Some(h) if !is_anonymous_token(h) => Identity::Client(ClientToken::new(h.clone())),
            _ => Identity::Anonymous,
        }
    }

    /// Repositories of `upstream` this identity may see listed.
    pub fn visible(&self, identity: &Identity, upstream: &Upstream, repo: &str) -> bool {
        if upstream.config.share_private || upstream.client.auth_scheme() == AuthScheme::Open {
            return true;
        }
        let key = (upstream.name().to_string(), repo.to_string());
        if self.public_repos.holds(&key) {
            return true;
        }
        match identity {
            Identity::Client(t) => self.checked.holds(&(t.key.clone(), key.0, key.1)),
            Identity::Anonymous => false,
        }
    }
}

fn is_anonymous_token(h: &HeaderValue) -> bool {
    h.to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t.starts_with(ANONYMOUS_TOKEN_PREFIX))
}

/// What kind of content a digest names, for the upstream path that checks it.
#[derive(Debug, Clone, Copy)]
pub enum ContentKind {
    Blob,
    Manifest,
}

/// How a piece of content may be fetched for this client, once allowed.
#[derive(Debug, Clone)]
pub struct FetchPlan {
    pub credential: Credential,
    /// True when what is fetched is proven readable by anyone.
    pub public: bool,
    /// The length upstream announced when it was just asked (a HEAD miss
    /// is answered from it instead of asking again).
    pub upstream_length: Option<u64>,
}

/// One request's decided access: who asks, for which repository.
pub struct Access<'a> {
    pub identity: Identity,
    pub upstream: &'a Upstream,
    pub repo: &'a RepoName,
    auth: &'a Auth,
}

impl<'a> Access<'a> {
    pub fn new(auth: &'a Auth, identity: Identity, upstream: &'a Upstream, repo: &'a RepoName) -> Self {
        Access {
            identity,
            upstream,
            repo,
            auth,
        }
    }

    fn shared(&self) -> bool {
        matches!(self.identity, Identity::Anonymous) && self.upstream.config.share_private
    }

    /// The credential for asking upstream about mutable things (tags, tag
    /// lists): the client's own, or none at all for anonymous clients (or
    /// regmirror's own where it is shared with everyone).
    pub fn credential(&self) -> Credential {
        match &self.identity {
            Identity::Client(t) => Credential::Client(t.header.clone()),
            Identity::Anonymous if self.shared() => Credential::Configured,
            Identity::Anonymous => Credential::Anonymous,
        }
    }

    /// True when what this client is answered with [`credential`](Self::credential)
    /// is readable by anyone of the proxy.
    pub fn answers_are_public(&self) -> bool {
        matches!(self.identity, Identity::Anonymous)
    }

    /// Records that an anonymous request to this repository succeeded.
    pub fn note_public(&self) {
        if self.answers_are_public() {
            self.auth
                .public_repos
                .remember((self.upstream.name().into(), self.repo.to_string()), PUBLIC_PROOF);
        }
    }

    fn checked_key(&self, t: &ClientToken) -> (String, String, String) {
        (t.key.clone(), self.upstream.name().into(), self.repo.to_string())
    }

    /// Whether a tag answer recorded earlier may be served to this client
    /// now that upstream cannot be asked.
    pub fn may_read_recorded(&self, recorded_public: bool) -> bool {
        recorded_public
            || self.shared()
            || match &self.identity {
                Identity::Client(t) => self.auth.checked.holds(&self.checked_key(t)),
                Identity::Anonymous => false,
            }
    }

    /// Decides whether `d` may be served to this client, and how it is
    /// fetched when it is not stored. `proven_public` says an anonymous
    /// upstream answer in this repository named this digest just now (a tag
    /// HEAD). Upstream is asked (one HEAD) only when the cache cannot
    /// decide: for anonymous clients, content not known public; for clients
    /// with a token, the first time per (token, repository).
    pub async fn content(
        &self,
        cache: &Cache,
        d: &Digest,
        kind: ContentKind,
        proven_public: bool,
    ) -> Result<FetchPlan, RegistryError> {
        let open = self.upstream.client.auth_scheme() == AuthScheme::Open;
        let configured_or_anonymous = if self.upstream.config.credentials.is_some() {
            Credential::Configured
        } else {
            Credential::Anonymous
        };
        if open || self.shared() {
            return Ok(FetchPlan {
                credential: configured_or_anonymous,
                public: true,
                upstream_length: None,
            });
        }
        let stored = cache.stat(d).await?;
        let stored_public = stored.as_ref().is_some_and(|i| i.public);
        match &self.identity {
            Identity::Anonymous => {
                let mut upstream_length = None;
                if !stored_public && !proven_public {
                    upstream_length = self.probe(d, kind, Credential::Anonymous).await?;
                    if stored.is_some() {
                        cache.mark_public(d).await;
                    }
                }
                self.note_public();
                Ok(FetchPlan {
                    credential: configured_or_anonymous,
                    public: true,
                    upstream_length,
                })
            }
            Identity::Client(t) => {
                let key = self.checked_key(t);
                let here = (self.upstream.name().to_string(), self.repo.to_string(), d.to_string());
                // A stored digest is served to a checked token only where
                // upstream has it: through another repository's name,
                // upstream is asked (and says no).
                // The same holds for a download in flight for someone else:
                // joining it would hand over bytes fetched in another
                // repository.
                let unproven_here = (stored.is_some() || cache.downloading(d)) && !self.auth.in_repository.holds(&here);
                let mut upstream_length = None;
                if !stored_public && (!self.auth.checked.holds(&key) || unproven_here) {
                    upstream_length = self.probe(d, kind, Credential::Client(t.header.clone())).await?;
                    self.auth.checked.remember(key, t.lifetime);
                    self.auth.in_repository.remember(here, IN_REPOSITORY_PROOF);
                }
                Ok(FetchPlan {
                    credential: Credential::Client(t.header.clone()),
                    public: false,
                    upstream_length,
                })
            }
        }
    }

    /// Asks upstream with a HEAD whether `credential` may read `d` here;
    /// the length it announces when it may.
    async fn probe(&self, d: &Digest, kind: ContentKind, credential: Credential) -> Result<Option<u64>, RegistryError> {
        let what = match kind {
            ContentKind::Blob => "blobs",
            ContentKind::Manifest => "manifests",
        };
        let mut headers = HeaderMap::new();
        if let ContentKind::Manifest = kind {
            // Every manifest type: distribution answers a digest it would
            // have to convert for the client with 404.
            headers.insert(
                header::ACCEPT,
                HeaderValue::from_static(crate::media_types::ALL_MANIFESTS),
            );
        }
        let req = UpstreamRequest {
            method: Method::HEAD,
            path: format!("/v2/{}/{what}/{d}", self.repo),
            query: None,
            headers,
            scope: format!("repository:{}:pull", self.repo),
            credential,
        };
        let anonymous = matches!(self.identity, Identity::Anonymous);
        match self.upstream.client.get_ok(&req).await {
            Ok(resp) => Ok(resp.header(header::CONTENT_LENGTH).and_then(|l| l.parse().ok())),
            Err(e) => match e.status() {
                Some(StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                    Err(unauthorized(format!("access to {} not granted", self.repo)))
                }
                // Without credentials, "not here" and "not yours" look the
                // same, as they do on Docker Hub: nothing tells an anonymous
                // client that private content exists, or is cached.
                Some(StatusCode::NOT_FOUND) if anonymous => {
                    Err(unauthorized(format!("access to {} not granted", self.repo)))
                }
                _ => Err(e.into()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_expiry_bounds_how_long_a_check_is_trusted() {
        use base64::Engine;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{}}}"#, now + 120));
        let t = ClientToken::new(HeaderValue::from_str(&format!("Bearer eyJhbGciOiJFUzI1NiJ9.{payload}.sig")).unwrap());
        assert!(t.lifetime <= Duration::from_secs(120) && t.lifetime >= Duration::from_secs(100));
        let opaque = ClientToken::new(HeaderValue::from_static("Bearer opaque"));
        assert_eq!(opaque.lifetime, OPAQUE_TOKEN_CHECK);
        assert!(is_anonymous_token(&HeaderValue::from_static(
            "Bearer regmirror-anonymous.abc"
        )));
        assert!(!is_anonymous_token(&HeaderValue::from_static("Bearer abc")));
    }
}
