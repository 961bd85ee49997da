//! What each local namespace holds, for its `quota`: every digest linked
//! in any of its repositories, counted once however many repositories or
//! tags share it. Walked from the store on first use, then kept as pushes
//! link content.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use crate::cache::{Cache, Link};
use crate::reference::Digest;

#[derive(Default)]
struct Held {
    digests: HashSet<Digest>,
    bytes: u64,
}

#[derive(Default)]
pub struct Usage {
    namespaces: Mutex<HashMap<usize, Held>>,
}

impl Usage {
    /// Bytes namespace `ns` holds.
    pub async fn bytes(&self, cache: &Cache, ns: usize, namespace: &str) -> u64 {
        if let Some(h) = lock(&self.namespaces).get(&ns) {
            return h.bytes;
        }
        let held = walk(cache, namespace).await;
        let mut all = lock(&self.namespaces);
        all.entry(ns).or_insert(held).bytes
    }

    /// `d` of `size` bytes is linked in namespace `ns` now.
    pub fn add(&self, ns: usize, d: &Digest, size: u64) {
        if let Some(h) = lock(&self.namespaces).get_mut(&ns) {
            if h.digests.insert(d.clone()) {
                h.bytes += size;
            }
        }
    }

    /// Forgets the count, to be walked again (after deletes or a gc).
    pub fn recount(&self, ns: usize) {
        lock(&self.namespaces).remove(&ns);
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
