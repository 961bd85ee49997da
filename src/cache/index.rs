//! The recency index: every stored digest with its size, its class (layer
//! or manifest) and when it was last used, kept in an embedded database
//! (redb) beside the content.
//!
//! It exists so that the size bound can be enforced without walking the
//! store: the total is one stored number, the least-recently-used entries
//! are the first keys of an ordered table, and opening it reads neither.
//! redb was chosen over an append-only journal because it gives crash-safe
//! transactions without a compaction step of our own, ordered keys for the
//! LRU walk, and (in its `MultiWriter` mode) lets the operator's `regmirror
//! cache` commands update the same index while `serve` runs.
//!
//! Every call here blocks on disk I/O: callers run it on a blocking thread,
//! never on the async workers and never while holding a lock.

use std::io;
use std::path::Path;

use redb::{ConcurrencyMode, Database, ReadableDatabase, ReadableTable, TableDefinition};

/// digest → (size, last use in ms since the epoch, class)
const ENTRIES: TableDefinition<&str, (u64, u64, u8)> = TableDefinition::new("entries");
/// (class, last use, digest): iterated in order, least recently used first,
/// layers (class 0) before manifests (class 1).
const LRU: TableDefinition<(u8, u64, &str), ()> = TableDefinition::new("lru");
/// "total" (bytes of all entries), "imported" (1 once a store that existed
/// before the index has been added to it).
const STATS: TableDefinition<&str, u64> = TableDefinition::new("stats");

/// What an entry is, in eviction order: layers and configs go first;
/// manifests are small and keep stale tags servable, so they go last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Layer = 0,
    Manifest = 1,
}

impl Class {
    fn from_u8(v: u8) -> Class {
        if v == 1 {
            Class::Manifest
        } else {
            Class::Layer
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub digest: String,
    pub size: u64,
    pub last_used_ms: u64,
    pub class: Class,
}

/// One change to the index; applied in batches, in order.
#[derive(Debug, Clone)]
pub enum Change {
    /// Stored (or stored again): sets size and class, counts as a use.
    Add {
        digest: String,
        size: u64,
        class: Class,
        at_ms: u64,
    },
    /// Used: moves the entry to the recent end, if it is still indexed.
    Touch {
        digest: String,
        at_ms: u64,
    },
    Remove {
        digest: String,
    },
}

pub struct Index {
    db: Database,
}

fn err(e: impl Into<redb::Error>) -> io::Error {
    io::Error::other(e.into())
}

impl Index {
    /// Opens the index at `path`, creating it when missing. Returns whether
    /// the store's content predating the index still has to be imported.
    pub fn open(path: &Path) -> io::Result<(Index, bool)> {
        let mut builder = Database::builder();
        builder
            .set_concurrency_mode(ConcurrencyMode::MultiWriter)
            // The index is a few hundred bytes per blob; keep its page
            // cache small next to the content it describes.
            .set_cache_size(16 << 20);
        let db = builder.create(path).map_err(err)?;
        let tx = db.begin_write().map_err(err)?;
        let imported = {
            tx.open_table(ENTRIES).map_err(err)?;
            tx.open_table(LRU).map_err(err)?;
            let stats = tx.open_table(STATS).map_err(err)?;
            let v = stats.get("imported").map_err(err)?.map(|v| v.value());
            v == Some(1)
        };
        tx.commit().map_err(err)?;
        Ok((Index { db }, !imported))
    }

    /// Records that the content that predated the index is in it now.
    pub fn mark_imported(&self) -> io::Result<()> {
        let tx = self.db.begin_write().map_err(err)?;
        tx.open_table(STATS).map_err(err)?.insert("imported", 1).map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Applies `changes` in one transaction.
    pub fn apply(&self, changes: &[Change]) -> io::Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut entries = tx.open_table(ENTRIES).map_err(err)?;
            let mut lru = tx.open_table(LRU).map_err(err)?;
            let mut stats = tx.open_table(STATS).map_err(err)?;
            let mut total = stats.get("total").map_err(err)?.map_or(0, |v| v.value());
            for c in changes {
                match c {
                    Change::Add {
                        digest,
                        size,
                        class,
                        at_ms,
                    } => {
                        let old = entries.remove(digest.as_str()).map_err(err)?.map(|v| v.value());
                        let mut at = *at_ms;
                        if let Some((old_size, old_at, old_class)) = old {
                            lru.remove((old_class, old_at, digest.as_str())).map_err(err)?;
                            total = total.saturating_sub(old_size);
                            at = at.max(old_at);
                        }
                        entries
                            .insert(digest.as_str(), (*size, at, *class as u8))
                            .map_err(err)?;
                        lru.insert((*class as u8, at, digest.as_str()), ()).map_err(err)?;
                        total += size;
                    }
                    Change::Touch { digest, at_ms } => {
                        let old = entries.get(digest.as_str()).map_err(err)?.map(|v| v.value());
                        if let Some((size, old_at, class)) = old {
                            if *at_ms > old_at {
                                lru.remove((class, old_at, digest.as_str())).map_err(err)?;
                                lru.insert((class, *at_ms, digest.as_str()), ()).map_err(err)?;
                                entries.insert(digest.as_str(), (size, *at_ms, class)).map_err(err)?;
                            }
                        }
                    }
                    Change::Remove { digest } => {
                        let old = entries.remove(digest.as_str()).map_err(err)?.map(|v| v.value());
                        if let Some((size, at, class)) = old {
                            lru.remove((class, at, digest.as_str())).map_err(err)?;
                            total = total.saturating_sub(size);
                        }
                    }
                }
            }
            stats.insert("total", total).map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// Bytes of all indexed content: one stored number, however many blobs.
    pub fn total(&self) -> io::Result<u64> {
        let tx = self.db.begin_read().map_err(err)?;
        let stats = tx.open_table(STATS).map_err(err)?;
        let v = stats.get("total").map_err(err)?.map_or(0, |v| v.value());
        Ok(v)
    }

    pub fn get(&self, digest: &str) -> io::Result<Option<Entry>> {
        let tx = self.db.begin_read().map_err(err)?;
        let entries = tx.open_table(ENTRIES).map_err(err)?;
        let v = entries.get(digest).map_err(err)?.map(|v| v.value());
        Ok(v.map(|(size, at, class)| Entry {
            digest: digest.to_string(),
            size,
            last_used_ms: at,
            class: Class::from_u8(class),
        }))
    }

    /// The least recently used entries, layers first, until they add up to
    /// at least `bytes` (or everything is listed).
    pub fn oldest(&self, bytes: u64) -> io::Result<Vec<Entry>> {
        let tx = self.db.begin_read().map_err(err)?;
        let lru = tx.open_table(LRU).map_err(err)?;
        let entries = tx.open_table(ENTRIES).map_err(err)?;
        let mut out = Vec::new();
        let mut sum = 0u64;
        for item in lru.iter().map_err(err)? {
            if sum >= bytes {
                break;
            }
            let (k, _) = item.map_err(err)?;
            let (class, at, digest) = k.value();
            let size = entries.get(digest).map_err(err)?.map_or(0, |v| v.value().0);
            sum += size;
            out.push(Entry {
                digest: digest.to_string(),
                size,
                last_used_ms: at,
                class: Class::from_u8(class),
            });
        }
        Ok(out)
    }

    /// Every entry, for the operator's commands (which may walk).
    pub fn all(&self) -> io::Result<Vec<Entry>> {
        let tx = self.db.begin_read().map_err(err)?;
        let entries = tx.open_table(ENTRIES).map_err(err)?;
        let mut out = Vec::new();
        for item in entries.iter().map_err(err)? {
            let (k, v) = item.map_err(err)?;
            let (size, at, class) = v.value();
            out.push(Entry {
                digest: k.value().to_string(),
                size,
                last_used_ms: at,
                class: Class::from_u8(class),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(d: &str, size: u64, class: Class, at_ms: u64) -> Change {
        Change::Add {
            digest: d.into(),
            size,
            class,
            at_ms,
        }
    }

    #[test]
    fn lru_order_puts_layers_first_and_counts_each_digest_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let (ix, fresh) = Index::open(&path).unwrap();
        assert!(fresh);
        ix.apply(&[
            add("a", 10, Class::Layer, 1),
            add("b", 20, Class::Layer, 2),
            add("m", 5, Class::Manifest, 0),
            add("a", 10, Class::Layer, 3), // stored again (another image): counted once
            Change::Touch {
                digest: "b".into(),
                at_ms: 9,
            },
            Change::Touch {
                digest: "gone".into(),
                at_ms: 9,
            },
        ])
        .unwrap();
        assert_eq!(ix.total().unwrap(), 35);
        let order: Vec<String> = ix.oldest(u64::MAX).unwrap().into_iter().map(|e| e.digest).collect();
        assert_eq!(order, ["a", "b", "m"], "LRU layers, then manifests however old");
        assert_eq!(ix.oldest(5).unwrap().len(), 1);
        ix.apply(&[Change::Remove { digest: "a".into() }]).unwrap();
        assert_eq!(ix.total().unwrap(), 25);
        ix.mark_imported().unwrap();
        drop(ix);
        let (ix, fresh) = Index::open(&path).unwrap();
        assert!(!fresh, "survives a restart");
        assert_eq!(ix.total().unwrap(), 25);
        assert_eq!(ix.get("b").unwrap().unwrap().last_used_ms, 9);
    }
}
