//! Pulling an image into the cache before any client asks for it: its
//! manifest by tag, the platform manifests of an index, then every config
//! and layer, each read to the end.
//!
//! A warm run never writes the store itself. It sends the requests a client
//! would, through a [`Puller`]: `regmirror cache warm` to the running
//! server's plain listener, the `[[warm]]` schedule ([`schedule`]) straight
//! to the server's request handler. Either way the content is fetched,
//! verified and stored by the normal path (single flight, download limits,
//! access rules), and a run can only warm what anyone may pull.

pub mod runs;
pub mod schedule;

use std::collections::BTreeSet;

use async_trait::async_trait;
use bytes::Bytes;

use crate::cache::listing::references;
use crate::config::{parse_image, Platforms, Upstream};

use crate::media_types::ALL_MANIFESTS as MANIFEST_ACCEPT;

/// Manifests are read whole; anything bigger is not one.
const MAX_MANIFEST: usize = 4 << 20;

/// One request of a warm run.
#[derive(Debug, Clone, Copy)]
pub struct Get<'a> {
    /// `/v2/...` or `/token?...`.
    pub path: &'a str,
    pub accept: Option<&'a str>,
    /// A bearer token.
    pub token: Option<&'a str>,
    /// Sent with `Cache-Control: no-cache`: a tag is asked upstream
    /// whatever the tag policy says (warming is for what a tag names now).
    pub fresh: bool,
}

impl<'a> Get<'a> {
    fn new(path: &'a str, accept: Option<&'a str>, token: Option<&'a str>) -> Self {
        Get {
            path,
            accept,
            token,
            fresh: false,
        }
    }
}

/// Where a warm run's requests go.
#[async_trait]
pub trait Puller: Send + Sync {
    async fn get(&self, get: Get<'_>) -> Result<Box<dyn Answer>, String>;
}

/// A response being read.
#[async_trait]
pub trait Answer: Send {
    fn status(&self) -> u16;
    /// The `Warning` header: a tag served stale because upstream failed.
    fn warning(&self) -> Option<String>;
    /// The next piece of the body; `None` at its end.
    async fn chunk(&mut self) -> Result<Option<Bytes>, String>;
}

/// What a run reports as it goes (the command's progress bar).
pub trait Progress: Send + Sync {
    /// The bytes of configs and layers the run will read.
    fn total(&self, _bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
}

/// Reports nothing.
pub struct Quiet;
impl Progress for Quiet {}

/// What one image's warm run read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Warmed {
    /// Image manifests (one per platform warmed).
    pub images: usize,
    pub blobs: usize,
    pub bytes: u64,
}

/// Warms `image` (parsed against `upstreams`) through `puller`, in the
/// namespace-prefix form every listener serves (`/v2/<namespace>/<repo>`).
pub async fn warm_image(
    puller: &dyn Puller,
    upstreams: &[Upstream],
    image: &str,
    platforms: &Platforms,
    progress: &dyn Progress,
) -> Result<Warmed, String> {
    let img = parse_image(upstreams, image)?;
    let name = format!("{}/{}", upstreams[img.upstream].namespace, img.repo);
    let token = anonymous_token(puller, &name).await?;
    let token = token.as_deref();
    let manifest_path = |reference: &str| format!("/v2/{name}/manifests/{reference}");

    // The tag as upstream names it now: a stale answer (upstream down) is
    // a failed run, not a warmed image.
    let path = manifest_path(&img.reference);
    let fresh = Get {
        fresh: true,
        ..Get::new(&path, Some(MANIFEST_ACCEPT), token)
    };
    let mut answer = send(puller, fresh).await?;
    if let Some(w) = answer.warning() {
        return Err(format!(
            "{path}: upstream did not answer; the cached copy was served ({w})"
        ));
    }
    let top = read_body(&mut *answer, &path).await?;
    let (_, children) = references(&top);
    let mut manifests = Vec::new();
    if children.is_empty() {
        manifests.push(top);
    } else {
        let chosen: Vec<&(String, String)> = match platforms {
            Platforms::Every => children.iter().collect(),
            Platforms::Only(wanted) => wanted
                .iter()
                .map(|p| {
                    children
                        .iter()
                        .find(|(_, have)| have == p || p.starts_with(&format!("{have}/")))
                        .ok_or_else(|| format!("{image}: no {p} image in its index"))
                })
                .collect::<Result<_, _>>()?,
        };
        for (digest, _) in chosen {
            let path = manifest_path(digest);
            manifests.push(read_all(puller, Get::new(&path, Some(MANIFEST_ACCEPT), token)).await?);
        }
    }

    // Configs and layers, each once, however many platforms share them.
    let mut wanted = BTreeSet::new();
    let mut total = 0u64;
    for m in &manifests {
        let v: serde_json::Value = serde_json::from_slice(m).unwrap_or_default();
        let sizes = v["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(std::iter::once(&v["config"]));
        for item in sizes {
            if let (Some(d), size) = (item["digest"].as_str(), item["size"].as_u64().unwrap_or(0)) {
                if wanted.insert(d.to_string()) {
                    total += size;
                }
            }
        }
    }
    progress.total(total);
    let mut bytes = 0;
    for d in &wanted {
        let path = format!("/v2/{name}/blobs/{d}");
        bytes += read_to_end(puller, Get::new(&path, None, token), progress).await?;
    }
    Ok(Warmed {
        images: manifests.len(),
        blobs: wanted.len(),
        bytes,
    })
}

/// The token regmirror issues anonymously for `name`, when the upstream
/// authenticates (a warm run fills the cache with what anyone may pull).
async fn anonymous_token(puller: &dyn Puller, name: &str) -> Result<Option<String>, String> {
    let ping = format!("/v2/{name}/tags/list");
    if puller.get(Get::new(&ping, None, None)).await?.status() != 401 {
        return Ok(None);
    }
    let url = format!("/token?scope=repository:{name}:pull");
    let body = read_all(puller, Get::new(&url, None, None)).await?;
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("{url}: {e}"))?;
    let token = v["token"]
        .as_str()
        .ok_or_else(|| format!("{url}: no token in the answer"))?;
    Ok(Some(token.to_string()))
}

/// Sends `get`; an answer other than 2xx is an error with its status and text.
async fn send(puller: &dyn Puller, get: Get<'_>) -> Result<Box<dyn Answer>, String> {
    let mut answer = puller.get(get).await?;
    let status = answer.status();
    if !(200..300).contains(&status) {
        let mut text = Vec::new();
        while let Some(c) = answer.chunk().await? {
            text.extend_from_slice(&c);
            if text.len() > 4096 {
                break;
            }
        }
        return Err(format!(
            "{}: {status} {}",
            get.path,
            String::from_utf8_lossy(&text).trim()
        ));
    }
    Ok(answer)
}

async fn read_all(puller: &dyn Puller, get: Get<'_>) -> Result<Vec<u8>, String> {
    let mut answer = send(puller, get).await?;
    read_body(&mut *answer, get.path).await
}

async fn read_body(answer: &mut dyn Answer, path: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(c) = answer.chunk().await? {
        if out.len() + c.len() > MAX_MANIFEST {
            return Err(format!("{path}: more than {MAX_MANIFEST} bytes"));
        }
        out.extend_from_slice(&c);
    }
    Ok(out)
}

/// Reads a blob to its end (the server stores it as it goes); its length.
async fn read_to_end(puller: &dyn Puller, get: Get<'_>, progress: &dyn Progress) -> Result<u64, String> {
    let mut answer = send(puller, get).await?;
    let mut n = 0;
    while let Some(c) = answer.chunk().await? {
        progress.advance(c.len() as u64);
        n += c.len() as u64;
    }
    Ok(n)
}
