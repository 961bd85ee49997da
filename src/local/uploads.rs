//! Upload sessions: the blobs a push is writing, from `POST .../uploads/`
//! to the `PUT ?digest=` that commits them.
//!
//! Bytes stream to a file in the store as they arrive (a 5 GiB layer never
//! sits in memory), hashed as they go; the commit checks the digest the
//! client names against that hash and only then makes the blob visible.
//! A session is bounded like everything a client can make regmirror hold:
//! at most `max_uploads_per_user` open per user, and removed (its file
//! with it) after `upload_timeout` without a request. A session whose
//! client broke off mid-chunk is removed at once: what it wrote is not
//! known to be what the client sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use super::quota::Usage;
use super::PushBody;
use crate::cache::blob_store::PendingBlob;
use crate::cache::Cache;
use crate::reference::{Algorithm, Digest, Hasher, RepoName};
use crate::registry::errors::{OciCode, RegistryError};
use crate::route::UploadId;
use http::StatusCode;

/// Bytes gathered before one write to the file: enough that a write is
/// not a blocking-pool hand-off per 16 KiB frame, small enough that eight
/// concurrent pushes of two layers each hold a few MiB, not 16.
const WRITE_BATCH: usize = 256 * 1024;

pub struct Session {
    pub id: UploadId,
    pub repo: RepoName,
    pub namespace: usize,
    /// Who opened it: only they may go on with it.
    pub owner: String,
    state: tokio::sync::Mutex<State>,
    last_used: Mutex<Instant>,
}

struct State {
    file: Option<Box<dyn PendingBlob>>,
    sha256: Option<Hasher>,
    len: u64,
    /// Bytes claimed from the namespace's quota (received, some perhaps
    /// still batched): given back when the session goes, settled when it
    /// commits.
    claimed: u64,
}

impl Session {
    fn touch(&self) {
        *lock(&self.last_used) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        lock(&self.last_used).elapsed()
    }

    /// Bytes received so far.
    pub async fn received(&self) -> u64 {
        self.state.lock().await.len
    }
}

/// Why a chunk was not taken.
pub enum ChunkError {
    /// The chunk does not start where the upload stands (416).
    OutOfOrder { len: u64 },
    /// The body broke off or its length is not what it said: the session
    /// is gone.
    Broken(RegistryError),
    /// More than the namespace may hold: the session is gone.
    OverQuota(RegistryError),
}

#[derive(Default)]
pub struct Uploads {
    sessions: Mutex<HashMap<UploadId, Arc<Session>>>,
}

impl Uploads {
    /// Opens a session, unless `owner` already has `max` open.
    pub async fn open(
        &self,
        cache: &Cache,
        namespace: usize,
        repo: &RepoName,
        owner: &str,
        max: usize,
        replica_tag: Option<&str>,
    ) -> Result<Arc<Session>, RegistryError> {
        let open = lock(&self.sessions).values().filter(|s| s.owner == owner).count();
        if open >= max {
            return Err(RegistryError::new(
                StatusCode::TOO_MANY_REQUESTS,
                OciCode::TooManyRequests,
                format!("{owner} has {open} uploads open already (max_uploads_per_user = {max}); finish or cancel one"),
            ));
        }
        let id = match replica_tag {
            // `<tag>-<random>`: the replica that holds it (see `session_forward`).
            Some(tag) => format!("{tag}-{}", new_id()),
            None => new_id(),
        };
        let id = UploadId::parse(&id).map_err(RegistryError::internal)?;
        let file = cache
            .begin_upload(id.as_str())
            .await
            .map_err(|e| RegistryError::internal(format!("cannot start an upload: {e}")))?;
        let session = Arc::new(Session {
            id: id.clone(),
            repo: repo.clone(),
            namespace,
            owner: owner.to_string(),
            state: tokio::sync::Mutex::new(State {
                file: Some(file),
                sha256: Some(Hasher::new(Algorithm::Sha256)),
                len: 0,
                claimed: 0,
            }),
            last_used: Mutex::new(Instant::now()),
        });
        lock(&self.sessions).insert(id, session.clone());
        crate::metrics::METRICS.uploads_open.inc();
        Ok(session)
    }

    /// The session `id` of `repo`, for its owner.
    pub fn get(&self, id: &UploadId, repo: &RepoName, owner: &str) -> Result<Arc<Session>, RegistryError> {
        let found = lock(&self.sessions).get(id).cloned();
        match found {
            Some(s) if s.repo == *repo && s.owner == owner => {
                s.touch();
                Ok(s)
            }
            _ => Err(unknown(id)),
        }
    }

    /// Removes a session and its file (cancel, failure, expiry), giving
    /// back its claim on the quota.
    pub async fn remove(&self, id: &UploadId, usage: &Usage) {
        let session = lock(&self.sessions).remove(id);
        if let Some(s) = session {
            crate::metrics::METRICS.uploads_open.dec();
            let mut state = s.state.lock().await;
            usage.release(s.namespace, std::mem::take(&mut state.claimed));
            if let Some(f) = state.file.take() {
                f.abort().await;
            }
        }
    }

    /// Appends a request body to the session. `start` is the chunk's
    /// offset when the client sent `Content-Range`; `declared` its
    /// `Content-Length`. With a `quota`, every frame claims its bytes from
    /// the namespace's room first (loaded by the caller).
    pub async fn append(
        &self,
        session: &Session,
        body: PushBody,
        start: Option<u64>,
        declared: Option<u64>,
        usage: &Usage,
        quota: Option<u64>,
    ) -> Result<u64, ChunkError> {
        let mut state = session.state.lock().await;
        if state.file.is_none() {
            return Err(ChunkError::Broken(unknown(&session.id)));
        }
        if let Some(start) = start {
            if start != state.len {
                return Err(ChunkError::OutOfOrder { len: state.len });
            }
        }
        let claim = quota.map(|q| (usage, session.namespace, q));
        let result = write_body(&mut state, body, declared, claim).await;
        session.touch();
        match result {
            Ok(()) => Ok(state.len),
            Err(e) => {
                drop(state);
                self.remove(&session.id, usage).await;
                Err(e)
            }
        }
    }

    /// Verifies the session's bytes against `d` and commits them under
    /// it. On a mismatch the session is gone and nothing is visible. The
    /// claim on the quota becomes held content (or is given back).
    pub async fn finish(
        &self,
        cache: &Cache,
        session: &Session,
        d: &Digest,
        usage: &Usage,
    ) -> Result<u64, RegistryError> {
        let mut state = session.state.lock().await;
        let Some(file) = state.file.take() else {
            return Err(unknown(&session.id));
        };
        let len = state.len;
        let claimed = std::mem::take(&mut state.claimed);
        let actual = match d.algorithm() {
            Algorithm::Sha256 => state.sha256.take().map(Hasher::finish),
            // Hashed again from the file: sha512 is rare, and hashing every
            // upload both ways would cost every push.
            Algorithm::Sha512 => rehash(file.follower(), len, Algorithm::Sha512).await.ok(),
        };
        drop(state);
        lock(&self.sessions).remove(&session.id);
        crate::metrics::METRICS.uploads_open.dec();
        if actual.as_ref() != Some(d) {
            usage.release(session.namespace, claimed);
            file.abort().await;
            let got = actual.map(|a| a.to_string()).unwrap_or_else(|| "unreadable".into());
            return Err(RegistryError::new(
                StatusCode::BAD_REQUEST,
                OciCode::DigestInvalid,
                format!("the upload's {len} bytes hash to {got}, not {d}"),
            ));
        }
        if let Err(e) = cache.commit_upload(file, d).await {
            usage.release(session.namespace, claimed);
            return Err(RegistryError::internal(format!("cannot store {d}: {e}")));
        }
        usage.settle(session.namespace, claimed, d, len);
        Ok(len)
    }

    /// Removes sessions idle longer than `timeout(namespace)`.
    pub async fn expire(&self, timeout: impl Fn(usize) -> Duration, usage: &Usage) {
        let stale: Vec<UploadId> = lock(&self.sessions)
            .values()
            .filter(|s| s.idle_for() > timeout(s.namespace) && s.state.try_lock().is_ok())
            .map(|s| s.id.clone())
            .collect();
        for id in stale {
            tracing::info!(upload = %id, "upload session expired");
            self.remove(&id, usage).await;
        }
    }

    pub fn open_count(&self) -> usize {
        lock(&self.sessions).len()
    }
}

/// The namespace's usage, its index and its quota.
type Claim<'a> = (&'a Usage, usize, u64);

async fn write_body(
    state: &mut State,
    mut body: PushBody,
    declared: Option<u64>,
    claim: Option<Claim<'_>>,
) -> Result<(), ChunkError> {
    let mut got: u64 = 0;
    let mut batch = BytesMut::with_capacity(WRITE_BATCH);
    loop {
        let frame = match body.frame().await {
            None => break,
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                return Err(ChunkError::Broken(RegistryError::new(
                    StatusCode::BAD_REQUEST,
                    OciCode::BlobUploadInvalid,
                    format!("the upload's body broke off after {got} bytes: {e}"),
                )))
            }
        };
        let Ok(data) = frame.into_data() else { continue };
        got += data.len() as u64;
        if declared.is_some_and(|d| got > d) {
            return Err(ChunkError::Broken(RegistryError::new(
                StatusCode::BAD_REQUEST,
                OciCode::BlobUploadInvalid,
                "the body is longer than its Content-Length",
            )));
        }
        if let Some((usage, ns, quota)) = claim {
            if !usage.claim(ns, data.len() as u64, quota) {
                return Err(ChunkError::OverQuota(RegistryError::new(
                    StatusCode::FORBIDDEN,
                    OciCode::Denied,
                    "the push would take the namespace past its quota",
                )));
            }
            state.claimed += data.len() as u64;
        }
        if let Some(h) = state.sha256.as_mut() {
            h.update(&data);
        }
        batch.extend_from_slice(&data);
        if batch.len() >= WRITE_BATCH {
            write(state, batch.split().freeze()).await?;
        }
    }
    if declared.is_some_and(|d| got != d) {
        return Err(ChunkError::Broken(RegistryError::new(
            StatusCode::BAD_REQUEST,
            OciCode::BlobUploadInvalid,
            format!("the body had {got} bytes, not its Content-Length"),
        )));
    }
    if !batch.is_empty() {
        write(state, batch.freeze()).await?;
    }
    Ok(())
}

async fn write(state: &mut State, data: Bytes) -> Result<(), ChunkError> {
    let n = data.len() as u64;
    let Some(file) = state.file.as_mut() else {
        return Err(ChunkError::Broken(RegistryError::internal("upload file closed")));
    };
    file.write(data)
        .await
        .map_err(|e| ChunkError::Broken(RegistryError::internal(format!("cannot write the upload: {e}"))))?;
    state.len += n;
    Ok(())
}

async fn rehash(
    reader: Arc<dyn crate::cache::blob_store::GrowingBlob>,
    len: u64,
    algorithm: Algorithm,
) -> std::io::Result<Digest> {
    let mut h = Hasher::new(algorithm);
    let mut pos = 0;
    while pos < len {
        let chunk = reader.read_at(pos, WRITE_BATCH).await?;
        if chunk.is_empty() {
            return Err(std::io::Error::other("upload file shorter than written"));
        }
        h.update(&chunk);
        pos += chunk.len() as u64;
    }
    Ok(h.finish())
}

pub fn unknown(id: &UploadId) -> RegistryError {
    RegistryError::new(
        StatusCode::NOT_FOUND,
        OciCode::BlobUploadUnknown,
        format!("upload {id} is not open (finished, cancelled or expired)"),
    )
}

/// A session id nobody can guess (the URL is all that names a session).
fn new_id() -> String {
    use std::io::Read;
    let mut raw = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut raw));
    if random.is_err() {
        let seed = format!("{:?}-{}", Instant::now(), std::process::id());
        raw.copy_from_slice(&Digest::of(seed.as_bytes()).hex().as_bytes()[..16]);
    }
    hex::encode(raw)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
