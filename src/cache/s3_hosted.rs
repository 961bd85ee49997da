//! The S3 backend of [`HostedStore`]: pushed repositories as keys, laid out
//! as `disk_hosted` lays out directories, so every replica sees a push the
//! moment its PUT returns.
//!
//! ```text
//! local/<repo>/_blobs/<alg>-<hex>          a layer or config the repository holds
//! local/<repo>/_manifests/<alg>-<hex>      a manifest the repository holds
//! local/<repo>/_deleted/<alg>-<hex>        a manifest deleted through the API, until gc
//! local/<repo>/_tags/<tag>                 the digest the tag points at
//! local/<repo>/_referrers/<alg>-<hex>/<alg>-<hex>.json   a referrer's descriptor, by subject
//! ```

use std::io;

use async_trait::async_trait;
use bytes::Bytes;
use object_store::path::Path;

use super::hosted_store::{digest_name, link_dir, parse_digest_name, HostedStore, Link, RECORDS};
use super::s3::S3Store;
use crate::reference::{Digest, RepoName, Tag};

fn hosted_key(repo: &RepoName) -> Path {
    let mut p = Path::from("local");
    for c in repo.components() {
        p = p.join(c);
    }
    p
}

fn link_key(repo: &RepoName, link: Link, d: &Digest) -> Path {
    hosted_key(repo).join(link_dir(link)).join(digest_name(d))
}

fn tag_key(repo: &RepoName, tag: &Tag) -> Path {
    hosted_key(repo).join("_tags").join(tag.as_str())
}

fn referrer_key(repo: &RepoName, subject: &Digest, referrer: &Digest) -> Path {
    hosted_key(repo)
        .join("_referrers")
        .join(digest_name(subject))
        .join(format!("{}.json", digest_name(referrer)))
}

#[async_trait]
impl HostedStore for S3Store {
    async fn link(&self, repo: &RepoName, link: Link, d: &Digest) -> io::Result<()> {
        self.put_small(&link_key(repo, link, d), Bytes::new()).await
    }

    async fn linked(&self, repo: &RepoName, link: Link, d: &Digest) -> io::Result<bool> {
        Ok(self.head(&link_key(repo, link, d)).await?.is_some())
    }

    async fn unlink(&self, repo: &RepoName, link: Link, d: &Digest) -> io::Result<bool> {
        self.delete_existing(&link_key(repo, link, d)).await
    }

    async fn links(&self, repo: &RepoName, link: Link) -> io::Result<Vec<Digest>> {
        let (names, _) = self.list_names(&hosted_key(repo).join(link_dir(link))).await?;
        Ok(names.iter().filter_map(|n| parse_digest_name(n)).collect())
    }

    async fn link_age(&self, repo: &RepoName, link: Link, d: &Digest) -> io::Result<Option<std::time::Duration>> {
        let Some(meta) = self.head(&link_key(repo, link, d)).await? else {
            return Ok(None);
        };
        let modified_ms = meta.last_modified.timestamp_millis().max(0) as u64;
        let age = super::evict::now_ms().saturating_sub(modified_ms);
        Ok(Some(std::time::Duration::from_millis(age)))
    }

    async fn set_tag(&self, repo: &RepoName, tag: &Tag, d: &Digest) -> io::Result<()> {
        self.put_small(&tag_key(repo, tag), Bytes::copy_from_slice(d.as_str().as_bytes()))
            .await
    }

    async fn tag(&self, repo: &RepoName, tag: &Tag) -> io::Result<Option<Digest>> {
        let Some(data) = self.get_small(&tag_key(repo, tag)).await? else {
            return Ok(None);
        };
        Ok(Digest::parse(String::from_utf8_lossy(&data).trim()).ok())
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> io::Result<bool> {
        self.delete_existing(&tag_key(repo, tag)).await
    }

    async fn tags(&self, repo: &RepoName) -> io::Result<Vec<(Tag, Digest)>> {
        let (mut names, _) = self.list_names(&hosted_key(repo).join("_tags")).await?;
        names.sort();
        let tags: Vec<Tag> = names.iter().filter_map(|n| Tag::parse(n).ok()).collect();
        let reads = tags.iter().map(|t| self.tag(repo, t));
        let digests = futures_util::future::try_join_all(reads).await?;
        Ok(tags
            .into_iter()
            .zip(digests)
            .filter_map(|(t, d)| Some((t, d?)))
            .collect())
    }

    async fn add_referrer(
        &self,
        repo: &RepoName,
        subject: &Digest,
        referrer: &Digest,
        descriptor: &[u8],
    ) -> io::Result<()> {
        self.put_small(
            &referrer_key(repo, subject, referrer),
            Bytes::copy_from_slice(descriptor),
        )
        .await
    }

    async fn remove_referrer(&self, repo: &RepoName, subject: &Digest, referrer: &Digest) -> io::Result<()> {
        self.delete_key(&referrer_key(repo, subject, referrer)).await
    }

    async fn referrers(&self, repo: &RepoName, subject: &Digest) -> io::Result<Vec<Vec<u8>>> {
        let dir = hosted_key(repo).join("_referrers").join(digest_name(subject));
        let (names, _) = self.list_names(&dir).await?;
        let reads = names.iter().filter(|n| n.ends_with(".json")).map(|n| {
            let key = dir.clone().join(n.as_str());
            async move { self.get_small(&key).await }
        });
        Ok(futures_util::future::try_join_all(reads)
            .await?
            .into_iter()
            .flatten()
            .map(|b| b.to_vec())
            .collect())
    }

    async fn repositories(&self, namespace: &str) -> io::Result<Vec<RepoName>> {
        let Ok(ns) = RepoName::parse(namespace) else {
            return Ok(Vec::new());
        };
        let mut repos = self
            .repositories_in(&Path::from("local"), &hosted_key(&ns), |p| RECORDS.contains(&p))
            .await?;
        repos.retain(|r| r.as_str() != namespace);
        Ok(repos)
    }
}
