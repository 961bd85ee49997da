//! The disk backend of [`HostedStore`]: pushed repositories as directories.
//!
//! ```text
//! local/<repo>/_blobs/<alg>-<hex>          a layer or config the repository holds
//! local/<repo>/_manifests/<alg>-<hex>      a manifest the repository holds
//! local/<repo>/_deleted/<alg>-<hex>        a manifest deleted through the API, until gc
//! local/<repo>/_tags/<tag>                 the digest the tag points at
//! local/<repo>/_referrers/<alg>-<hex>/<alg>-<hex>.json   a referrer's descriptor, by subject
//! ```
//!
//! Repository components never start with `_` (the OCI name grammar), so
//! the records cannot collide with a nested repository. Every write is a
//! rename of a finished temp file: a crash leaves the old record or the new.

use std::io;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::fs;

use super::disk::{not_found_is_none, DiskStore};
use super::hosted_store::{digest_name, link_dir, parse_digest_name, HostedStore, Link, RECORDS};
use crate::reference::{Digest, RepoName, Tag};

impl DiskStore {
    fn hosted_dir(&self, repo: &RepoName) -> PathBuf {
        let mut p = self.root().join("local");
        for c in repo.components() {
            p.push(c);
        }
        p
    }

    fn link_path(&self, repo: &RepoName, link: Link, d: &Digest) -> PathBuf {
        self.hosted_dir(repo).join(link_dir(link)).join(digest_name(d))
    }

    fn referrer_dir(&self, repo: &RepoName, subject: &Digest) -> PathBuf {
        self.hosted_dir(repo).join("_referrers").join(digest_name(subject))
    }
}

/// Names in `dir`, none when it does not exist.
async fn names(dir: &Path) -> io::Result<Vec<String>> {
    let Some(mut entries) = not_found_is_none(fs::read_dir(dir).await)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    while let Some(e) = entries.next_entry().await? {
        if let Some(n) = e.file_name().to_str() {
            out.push(n.to_string());
        }
    }
    Ok(out)
}

#[async_trait]
impl HostedStore for DiskStore {
    async fn link(&self, repo: &RepoName, link: Link, d: &Digest) -> io::Result<()> {
        self.write_atomically(&self.link_path(repo, link, d), b"").await
    }

    async fn linked(&self, repo: &RepoName, link: Link, d: &Digest) -> io::Result<bool> {
        Ok(not_found_is_none(fs::metadata(self.link_path(repo, link, d)).await)?.is_some())
    }

    async fn link_age(&self, repo: &RepoName, link: Link, d: &Digest) -> io::Result<Option<std::time::Duration>> {
        let Some(meta) = not_found_is_none(fs::metadata(self.link_path(repo, link, d)).await)? else {
            return Ok(None);
        };
        Ok(Some(meta.modified()?.elapsed().unwrap_or_default()))
    }

    async fn unlink(&self, repo: &RepoName, link: Link, d: &Digest) -> io::Result<bool> {
        Ok(not_found_is_none(fs::remove_file(self.link_path(repo, link, d)).await)?.is_some())
    }

    async fn links(&self, repo: &RepoName, link: Link) -> io::Result<Vec<Digest>> {
        let dir = self.hosted_dir(repo).join(link_dir(link));
        Ok(names(&dir).await?.iter().filter_map(|n| parse_digest_name(n)).collect())
    }

    async fn set_tag(&self, repo: &RepoName, tag: &Tag, d: &Digest) -> io::Result<()> {
        let path = self.hosted_dir(repo).join("_tags").join(tag.as_str());
        self.write_atomically(&path, d.as_str().as_bytes()).await
    }

    async fn tag(&self, repo: &RepoName, tag: &Tag) -> io::Result<Option<Digest>> {
        let path = self.hosted_dir(repo).join("_tags").join(tag.as_str());
        let Some(text) = not_found_is_none(fs::read_to_string(&path).await)? else {
            return Ok(None);
        };
        Ok(Digest::parse(text.trim()).ok())
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> io::Result<bool> {
        let path = self.hosted_dir(repo).join("_tags").join(tag.as_str());
        Ok(not_found_is_none(fs::remove_file(&path).await)?.is_some())
    }

    async fn tags(&self, repo: &RepoName) -> io::Result<Vec<(Tag, Digest)>> {
        let mut out = Vec::new();
        let mut listed = names(&self.hosted_dir(repo).join("_tags")).await?;
        listed.sort();
        for n in listed {
            let Ok(tag) = Tag::parse(&n) else { continue };
            if let Some(d) = self.tag(repo, &tag).await? {
                out.push((tag, d));
            }
        }
        Ok(out)
    }

    async fn add_referrer(
        &self,
        repo: &RepoName,
        subject: &Digest,
        referrer: &Digest,
        descriptor: &[u8],
    ) -> io::Result<()> {
        let path = self
            .referrer_dir(repo, subject)
            .join(format!("{}.json", digest_name(referrer)));
        self.write_atomically(&path, descriptor).await
    }

    async fn remove_referrer(&self, repo: &RepoName, subject: &Digest, referrer: &Digest) -> io::Result<()> {
        let path = self
            .referrer_dir(repo, subject)
            .join(format!("{}.json", digest_name(referrer)));
        not_found_is_none(fs::remove_file(&path).await)?;
        Ok(())
    }

    async fn referrers(&self, repo: &RepoName, subject: &Digest) -> io::Result<Vec<Vec<u8>>> {
        let dir = self.referrer_dir(repo, subject);
        let mut out = Vec::new();
        for n in names(&dir).await? {
            if !n.ends_with(".json") {
                continue;
            }
            if let Some(data) = not_found_is_none(fs::read(dir.join(&n)).await)? {
                out.push(data);
            }
        }
        Ok(out)
    }

    async fn repositories(&self, namespace: &str) -> io::Result<Vec<RepoName>> {
        let Ok(ns) = RepoName::parse(namespace) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut stack = vec![(self.hosted_dir(&ns), namespace.to_string())];
        while let Some((dir, name)) = stack.pop() {
            let entries = names(&dir).await?;
            if entries.iter().any(|e| RECORDS.contains(&e.as_str())) && name != namespace {
                if let Ok(r) = RepoName::parse(&name) {
                    out.push(r);
                }
            }
            for e in entries {
                if !e.starts_with('_') && fs::metadata(dir.join(&e)).await.is_ok_and(|m| m.is_dir()) {
                    stack.push((dir.join(&e), format!("{name}/{e}")));
                }
            }
        }
        out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(out)
    }
}
