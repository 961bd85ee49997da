//! What each local namespace holds, for its `quota`: every digest linked
//! in any of its repositories, counted once however many repositories or
//! tags share it, plus the bytes open uploads have received. Walked from
//! the store on first use, then kept as pushes link content.
//!
//! Uploads claim room frame by frame under one lock, so concurrent pushes
//! cannot together pass the quota that each alone would respect; a
//! committed upload's bytes move from pending to held in one step.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use crate::cache::{Cache, Link};
use crate::reference::Digest;

#[derive(Default)]
struct Held {
    digests: HashSet<Digest>,
    bytes: u64,
    /// Received by uploads not yet committed or removed.
    pending: u64,
    /// Walked from the store (what `digests` and `bytes` say is known).
    loaded: bool,
    /// Deletes or a gc ran: walk the store again before the next answer.
    stale: bool,
}

#[derive(Default)]
pub struct Usage {
    namespaces: Mutex<HashMap<usize, Held>>,
}

impl Usage {
    /// Bytes namespace `ns` holds (pending uploads not included).
    pub async fn bytes(&self, cache: &Cache, ns: usize, namespace: &str) -> u64 {
        if let Some(h) = lock(&self.namespaces).get(&ns).filter(|h| h.loaded && !h.stale) {
            return h.bytes;
        }
        let walked = walk(cache, namespace).await;
        let mut all = lock(&self.namespaces);
        let h = all.entry(ns).or_default();
        if !h.loaded || h.stale {
            h.digests = walked.digests;
            h.bytes = walked.bytes;
            h.loaded = true;
            h.stale = false;
        }
        h.bytes
    }

    /// Whether `len` more bytes fit under `quota` beside what the
    /// namespace holds and its uploads have claimed. Call after
    /// [`Usage::bytes`], which loads the count.
    pub fn fits(&self, ns: usize, len: u64, quota: u64) -> bool {
        let all = lock(&self.namespaces);
        let h = all.get(&ns);
        h.map_or(0, |h| h.bytes + h.pending).saturating_add(len) <= quota
    }

    /// Claims `len` bytes for an upload, when they fit under `quota`.
    pub fn claim(&self, ns: usize, len: u64, quota: u64) -> bool {
        let mut all = lock(&self.namespaces);
        let h = all.entry(ns).or_default();
        if (h.bytes + h.pending).saturating_add(len) > quota {
            return false;
        }
        h.pending += len;
        true
    }

    /// Gives back what an upload claimed (cancelled, failed, expired).
    pub fn release(&self, ns: usize, len: u64) {
        if let Some(h) = lock(&self.namespaces).get_mut(&ns) {
            h.pending = h.pending.saturating_sub(len);
        }
    }

    /// An upload that claimed `claimed` bytes is committed as `d` of
    /// `size` bytes: its claim becomes held content in one step.
    pub fn settle(&self, ns: usize, claimed: u64, d: &Digest, size: u64) {
        let mut all = lock(&self.namespaces);
        let h = all.entry(ns).or_default();
        h.pending = h.pending.saturating_sub(claimed);
        if h.digests.insert(d.clone()) {
            h.bytes += size;
        }
    }

    /// `d` of `size` bytes is linked in namespace `ns` now.
    pub fn add(&self, ns: usize, d: &Digest, size: u64) {
        if let Some(h) = lock(&self.namespaces).get_mut(&ns) {
            if h.digests.insert(d.clone()) {
                h.bytes += size;
            }
        }
    }

    /// The held count is to be walked again (after deletes or a gc);
    /// uploads' claims are kept.
    pub fn recount(&self, ns: usize) {
        if let Some(h) = lock(&self.namespaces).get_mut(&ns) {
            h.stale = true;
        }
    }
}

async fn walk(cache: &Cache, namespace: &str) -> Held {
    let mut held = Held::default();
    let Ok(store) = cache.hosted() else {
        return held;
    };
    let repos = store.repositories(namespace).await.unwrap_or_default();
    for repo in repos {
        for link in [Link::Blob, Link::Manifest] {
            for d in store.links(&repo, link).await.unwrap_or_default() {
                if held.digests.contains(&d) {
                    continue;
                }
                if let Ok(Some(info)) = cache.stat(&d).await {
                    held.bytes += info.size;
                    held.digests.insert(d);
                }
            }
        }
    }
    held
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_claims_share_one_quota() {
        let u = Usage::default();
        assert!(u.claim(0, 60, 100));
        assert!(
            !u.claim(0, 50, 100),
            "a second upload cannot take what the first claimed"
        );
        assert!(u.claim(0, 40, 100));
        assert!(!u.fits(0, 1, 100));
        u.release(0, 40);
        assert!(u.fits(0, 40, 100), "a cancelled upload gives its room back");
        assert!(u.claim(1, 100, 100), "namespaces have their own room");
    }

    #[test]
    fn a_commit_moves_its_claim_to_held_once() {
        let u = Usage::default();
        let d = Digest::of(b"layer");
        assert!(u.claim(0, 30, 100));
        u.settle(0, 30, &d, 30);
        assert!(u.fits(0, 70, 100) && !u.fits(0, 71, 100));
        // The same content pushed again is held once.
        assert!(u.claim(0, 30, 100));
        u.settle(0, 30, &d, 30);
        assert!(u.fits(0, 70, 100));
    }
}
