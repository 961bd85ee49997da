//! Replicas on one bucket (`[cluster]`): who the members are, which of
//! them owns a digest, and the signatures on the requests they send each
//! other.
//!
//! Each digest has one owner, by rendezvous (highest-random-weight)
//! hashing over the members: adding or removing a member moves only the
//! digests it gains or loses, and every replica that agrees on the members
//! agrees on the owner without asking anyone. A replica that misses a
//! digest someone else owns asks the owner for it (`owner_fetch`), so the
//! owner's single-flight download is the cluster's one upstream fetch.
//!
//! Peer requests are ordinary registry requests on the owner's plain
//! listener, signed with the shared secret: the owner serves them as it
//! serves any client (its own access decision, its own single flight), and
//! the signature only says "do not ask another owner", which is what keeps
//! two replicas that disagree on the members from asking each other in a
//! loop. A request carrying a signature that does not verify is refused.

pub mod owner_fetch;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue};
use sha2::{Digest as _, Sha256};
use url::Url;

use crate::config::{self, ClusterMembers, SigningKey};
use crate::reference::Digest;

/// The header a peer request is signed in: `<unix seconds>.<hex HMAC>`.
pub const PEER_HEADER: &str = "x-regmirror-peer";
/// How far a signature's time may be from ours (clock skew, slow links).
const SIGNATURE_WINDOW_SECS: u64 = 120;
/// How often `peers_dns` is looked up again.
const DISCOVERY_EVERY: Duration = Duration::from_secs(10);

pub struct Cluster {
    self_url: Url,
    /// Sorted, `self` included.
    members: RwLock<Arc<Vec<Url>>>,
    dns: Option<String>,
    key: SigningKey,
    pub owner_timeout: Duration,
    client: reqwest::Client,
}

/// Why a request that claims to be a peer's is refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerAuthError {
    #[error("malformed {PEER_HEADER} header")]
    Malformed,
    #[error("{PEER_HEADER} signed {0} s away from this replica's clock")]
    Stale(u64),
    #[error("{PEER_HEADER} signature does not verify (another cluster secret?)")]
    BadSignature,
}

impl Cluster {
    pub fn new(c: &config::Cluster) -> Result<Cluster, String> {
        let members = match &c.members {
            ClusterMembers::Listed(urls) => urls.clone(),
            ClusterMembers::Dns(_) => vec![c.self_url.clone()],
        };
        let client = reqwest::Client::builder()
            .connect_timeout(c.owner_timeout)
            .read_timeout(Duration::from_secs(60))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("cluster: HTTP client: {e}"))?;
        Ok(Cluster {
            self_url: c.self_url.clone(),
            members: RwLock::new(Arc::new(members)),
            dns: match &c.members {
                ClusterMembers::Dns(name) => Some(name.clone()),
                ClusterMembers::Listed(_) => None,
            },
            key: c.secret.clone(),
            owner_timeout: c.owner_timeout,
            client,
        })
    }

    pub fn self_url(&self) -> &Url {
        &self.self_url
    }

    pub fn members(&self) -> Arc<Vec<Url>> {
        match self.members.read() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_members(&self, mut urls: Vec<Url>) {
        urls.push(self.self_url.clone());
        urls.sort();
        urls.dedup();
        let changed = *self.members() != urls;
        if changed {
            tracing::info!(members = ?urls.iter().map(Url::as_str).collect::<Vec<_>>(), "cluster members");
            match self.members.write() {
                Ok(mut m) => *m = Arc::new(urls),
                Err(p) => *p.into_inner() = Arc::new(urls),
            }
        }
    }

    /// For `peers_dns`: looks the name up now and every few seconds; a
    /// failed lookup keeps the members last seen.
    pub fn spawn_discovery(self: &Arc<Self>) {
        let Some(name) = self.dns.clone() else { return };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(c) = weak.upgrade() else { return };
                let port = c.self_url.port_or_known_default().unwrap_or(5000);
                match tokio::net::lookup_host((name.as_str(), port)).await {
                    Ok(addrs) => {
                        let urls = addrs
                            .filter_map(|a| {
                                let mut u = c.self_url.clone();
                                u.set_ip_host(a.ip()).ok()?;
                                Some(u)
                            })
                            .collect();
                        c.set_members(urls);
                    }
                    Err(e) => {
                        tracing::warn!(name = %name, error = %e, "cluster.peers_dns lookup failed; keeping the members last seen")
                    }
                }
                drop(c);
                tokio::time::sleep(DISCOVERY_EVERY).await;
            }
        });
    }

    /// The member that fetches `d` for the cluster.
    pub fn owner_of(&self, d: &Digest) -> Url {
        let members = self.members();
        members
            .iter()
            .max_by_key(|m| weight(m, d))
            .cloned()
            .unwrap_or_else(|| self.self_url.clone())
    }

    /// This replica's tag: a short name of its `self` URL, carried in the
    /// upload session ids it opens so that every member can tell where a
    /// session lives.
    pub fn self_tag(&self) -> String {
        member_tag(&self.self_url)
    }

    /// The other member tagged `tag`, if one is known.
    pub fn member_tagged(&self, tag: &str) -> Option<Url> {
        self.members()
            .iter()
            .find(|m| **m != self.self_url && member_tag(m) == tag)
            .cloned()
    }

    /// The owner of `d` when it is another member.
    pub fn other_owner(&self, d: &Digest) -> Option<Url> {
        let owner = self.owner_of(d);
        (owner != self.self_url).then_some(owner)
    }

    /// The signature header for a request of ours.
    pub fn sign(&self, method: &str, path_and_query: &str) -> HeaderValue {
        let ts = unix_now();
        let value = format!("{ts}.{}", hex::encode(self.mac(ts, method, path_and_query)));
        HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("-"))
    }

    /// `Ok(true)`: a verified peer request; `Ok(false)`: no signature (a
    /// client's request).
    pub fn verify(&self, headers: &HeaderMap, method: &str, path_and_query: &str) -> Result<bool, PeerAuthError> {
        let Some(v) = headers.get(PEER_HEADER) else {
            return Ok(false);
        };
        let v = v.to_str().map_err(|_| PeerAuthError::Malformed)?;
        let (ts, mac) = v.split_once('.').ok_or(PeerAuthError::Malformed)?;
        let ts: u64 = ts.parse().map_err(|_| PeerAuthError::Malformed)?;
        let mac = hex::decode(mac).map_err(|_| PeerAuthError::Malformed)?;
        let skew = unix_now().abs_diff(ts);
        if skew > SIGNATURE_WINDOW_SECS {
            return Err(PeerAuthError::Stale(skew));
        }
        let mut m = self.hmac();
        m.update(message(ts, method, path_and_query).as_bytes());
        m.verify_slice(&mac).map_err(|_| PeerAuthError::BadSignature)?;
        Ok(true)
    }

    fn hmac(&self) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        match Hmac::<Sha256>::new_from_slice(&self.key.0) {
            Ok(m) => m,
            Err(_) => unreachable_hmac(),
        }
    }

    fn mac(&self, ts: u64, method: &str, path_and_query: &str) -> Vec<u8> {
        let mut m = self.hmac();
        m.update(message(ts, method, path_and_query).as_bytes());
        m.finalize().into_bytes().to_vec()
    }

    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

#[allow(clippy::panic)]
fn unreachable_hmac() -> Hmac<Sha256> {
    panic!("HMAC-SHA256 accepts keys of every length")
}

fn message(ts: u64, method: &str, path_and_query: &str) -> String {
    format!("{ts}\n{method}\n{path_and_query}")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// 8 hex digits of SHA-256 of a member's URL: enough to tell a handful of
/// members apart, short enough for an upload URL.
fn member_tag(url: &Url) -> String {
    hex::encode(&Sha256::digest(url.as_str().as_bytes())[..4])
}

/// A member's weight for `d`: the first 8 bytes of
/// SHA-256(`<member URL>\n<digest>`). The highest weight owns `d`.
pub fn weight(member: &Url, d: &Digest) -> u64 {
    let mut h = Sha256::new();
    h.update(member.as_str().as_bytes());
    h.update(b"\n");
    h.update(d.as_str().as_bytes());
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(members: &[&str], me: &str) -> Cluster {
        let urls: Vec<Url> = members.iter().map(|m| Url::parse(m).unwrap()).collect();
        Cluster::new(&config::Cluster {
            self_url: Url::parse(me).unwrap(),
            members: ClusterMembers::Listed(urls),
            secret: SigningKey(b"0123456789abcdef-secret".to_vec().into()),
            owner_timeout: Duration::from_secs(1),
        })
        .unwrap()
    }

    #[test]
    fn removing_a_member_moves_only_its_digests() {
        let three = cluster(&["http://a:5000", "http://b:5000", "http://c:5000"], "http://a:5000");
        let two = cluster(&["http://a:5000", "http://b:5000"], "http://a:5000");
        let mut moved = 0;
        let mut owned_by_c = 0;
        for i in 0..3000u32 {
            let d = Digest::of(&i.to_be_bytes());
            let before = three.owner_of(&d);
            let after = two.owner_of(&d);
            if before.as_str() == "http://c:5000/" {
                owned_by_c += 1;
            } else {
                assert_eq!(before, after, "a digest c did not own moved");
            }
            if before != after {
                moved += 1;
            }
        }
        assert_eq!(moved, owned_by_c, "only c's digests move");
        // Each of three members owns about a third.
        assert!((800..1200).contains(&owned_by_c), "c owned {owned_by_c} of 3000");
    }

    #[test]
    fn every_member_agrees_on_the_owner() {
        let members = ["http://a:5000", "http://b:5000", "http://c:5000"];
        let views: Vec<Cluster> = members.iter().map(|m| cluster(&members, m)).collect();
        for i in 0..200u32 {
            let d = Digest::of(&i.to_be_bytes());
            let owners: Vec<Url> = views.iter().map(|v| v.owner_of(&d)).collect();
            assert!(owners.windows(2).all(|w| w[0] == w[1]));
            let others = views.iter().filter(|v| v.other_owner(&d).is_none()).count();
            assert_eq!(others, 1, "exactly one member owns it itself");
        }
    }

    #[test]
    fn signatures_verify_only_with_the_same_secret_method_and_path() {
        let a = cluster(&["http://a:5000"], "http://a:5000");
        let mut h = HeaderMap::new();
        assert!(!a.verify(&h, "GET", "/v2/x").unwrap(), "no header: a client");
        h.insert(PEER_HEADER, a.sign("GET", "/v2/x/blobs/sha256:1"));
        assert!(a.verify(&h, "GET", "/v2/x/blobs/sha256:1").unwrap());
        assert!(matches!(
            a.verify(&h, "GET", "/v2/y/blobs/sha256:1"),
            Err(PeerAuthError::BadSignature)
        ));
        assert!(matches!(
            a.verify(&h, "HEAD", "/v2/x/blobs/sha256:1"),
            Err(PeerAuthError::BadSignature)
        ));
        let other = Cluster::new(&config::Cluster {
            self_url: Url::parse("http://a:5000").unwrap(),
            members: ClusterMembers::Listed(vec![Url::parse("http://a:5000").unwrap()]),
            secret: SigningKey(b"another-secret-of-16+".to_vec().into()),
            owner_timeout: Duration::from_secs(1),
        })
        .unwrap();
        assert!(other.verify(&h, "GET", "/v2/x/blobs/sha256:1").is_err());
        let old = format!(
            "{}.{}",
            unix_now() - 1000,
            hex::encode(a.mac(unix_now() - 1000, "GET", "/p"))
        );
        h.insert(PEER_HEADER, HeaderValue::from_str(&old).unwrap());
        assert!(matches!(a.verify(&h, "GET", "/p"), Err(PeerAuthError::Stale(_))));
        h.insert(PEER_HEADER, HeaderValue::from_static("nonsense"));
        assert!(matches!(a.verify(&h, "GET", "/p"), Err(PeerAuthError::Malformed)));
    }
}
