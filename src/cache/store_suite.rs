//! The behaviour every store backend must have, written against the traits
//! alone so that a second backend (S3) runs the same suite by calling these
//! functions with its own store. Public (hidden) only so that the
//! integration tests can run it against a real S3 cluster.
// Test code: a failed call is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use futures_util::TryStreamExt;

use super::blob_store::{BlobInfo, BlobStore};
use super::hosted_store::{HostedStore, Link};
use super::meta_store::{MetaStore, RepoKey, TagRecord};
use crate::reference::{Digest, RepoName, Tag};

async fn read_range(s: &dyn BlobStore, d: &Digest, start: u64, end: u64) -> Vec<u8> {
    let blob = s.open(d).await.unwrap().expect("stored");
    let chunks: Vec<bytes::Bytes> = blob.read(start, end).try_collect().await.unwrap();
    chunks.concat()
}

pub async fn blob_store(s: &dyn BlobStore) {
    s.check_writable().await.expect("a fresh store is writable");
    let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    let d = Digest::of(&data);
    assert!(s.stat(&d).await.unwrap().is_none());
    assert!(s.open(&d).await.unwrap().is_none());

    // A pending blob is invisible under its digest until committed, and its
    // follower reads what is written as it grows.
    let mut p = s.begin(&d).await.unwrap();
    let follower = p.follower();
    p.write(Bytes::copy_from_slice(&data[..1000])).await.unwrap();
    assert_eq!(&follower.read_at(0, 10_000).await.unwrap()[..], &data[..1000]);
    assert!(follower.read_at(1000, 10).await.unwrap().is_empty());
    p.write(Bytes::copy_from_slice(&data[1000..])).await.unwrap();
    assert!(s.stat(&d).await.unwrap().is_none(), "not visible before commit");
    p.commit(Some("application/x")).await.unwrap();
    assert_eq!(
        &follower.read_at(599_990, 100).await.unwrap()[..],
        &data[599_990..],
        "a follower keeps reading after commit"
    );

    let mut info = BlobInfo {
        size: data.len() as u64,
        media_type: Some("application/x".into()),
        public: false,
    };
    assert_eq!(s.stat(&d).await.unwrap(), Some(info.clone()));
    assert_eq!(s.open(&d).await.unwrap().unwrap().info(), &info);
    s.mark_public(&d).await.unwrap();
    info.public = true;
    assert_eq!(s.stat(&d).await.unwrap(), Some(info.clone()), "provenance is kept");
    assert_eq!(read_range(s, &d, 0, data.len() as u64).await, data);
    assert_eq!(read_range(s, &d, 10, 20).await, &data[10..20]);
    assert_eq!(read_range(s, &d, 599_999, 600_000).await, &data[599_999..]);

    // Content opened before a delete stays readable through that handle.
    let opened = s.open(&d).await.unwrap().unwrap();
    s.delete(&d).await.unwrap();
    assert!(s.stat(&d).await.unwrap().is_none());
    let chunks: Vec<bytes::Bytes> = opened.read(0, 5).try_collect().await.unwrap();
    assert_eq!(chunks.concat(), &data[..5]);
    s.delete(&d).await.expect("deleting what is gone is fine");

    // Aborted: nothing under the digest.
    let other = Digest::of(b"other");
    let mut p = s.begin(&other).await.unwrap();
    p.write(Bytes::from_static(b"partial")).await.unwrap();
    p.abort().await;
    assert!(s.stat(&other).await.unwrap().is_none());

    // Layers carry no media type.
    let mut p = s.begin(&other).await.unwrap();
    p.write(Bytes::from_static(b"other")).await.unwrap();
    p.commit(None).await.unwrap();
    assert_eq!(s.stat(&other).await.unwrap().unwrap().media_type, None);
    s.set_media_type(&other, "application/vnd.oci.image.index.v1+json")
        .await
        .unwrap();
    assert_eq!(
        s.stat(&other).await.unwrap().unwrap().media_type.as_deref(),
        Some("application/vnd.oci.image.index.v1+json"),
        "a type learnt later is kept"
    );

    // An upload (a push) names its digest only at the end: nothing is
    // visible until `commit_to`, and an aborted one leaves nothing.
    let pushed: Vec<u8> = (0..300_000u32).map(|i| (i % 13) as u8).collect();
    let pd = Digest::of(&pushed);
    let mut u = s.begin_upload("session-1").await.unwrap();
    u.write(Bytes::copy_from_slice(&pushed[..100_000])).await.unwrap();
    u.write(Bytes::copy_from_slice(&pushed[100_000..])).await.unwrap();
    assert_eq!(u.written(), pushed.len() as u64);
    assert!(
        s.stat(&pd).await.unwrap().is_none(),
        "an upload is invisible until committed"
    );
    u.commit_to(&pd, None).await.unwrap();
    assert_eq!(read_range(s, &pd, 0, pushed.len() as u64).await, pushed);
    assert!(
        !s.stat(&pd).await.unwrap().unwrap().public,
        "pushed content is not public"
    );
    let mut u = s.begin_upload("session-2").await.unwrap();
    u.write(Bytes::from_static(b"cancelled")).await.unwrap();
    u.abort().await;
    assert!(s.stat(&Digest::of(b"cancelled")).await.unwrap().is_none());
    s.delete(&pd).await.unwrap();

    // Listing: what is stored, each once, manifests marked.
    let layer = Digest::of(b"layer");
    let mut p = s.begin(&layer).await.unwrap();
    p.write(Bytes::from_static(b"layer")).await.unwrap();
    p.commit(None).await.unwrap();
    let mut listed = s.list().await.unwrap();
    listed.sort_by_key(|b| b.manifest);
    let summary: Vec<(Digest, u64, bool)> = listed.into_iter().map(|b| (b.digest, b.size, b.manifest)).collect();
    assert_eq!(summary, vec![(layer, 5, false), (other, 5, true)]);
}

pub async fn meta_store(s: &dyn MetaStore) {
    let rec = TagRecord {
        digest: Digest::of(b"m").to_string(),
        media_type: "t".into(),
        size: 1,
        public: true,
        seen_ms: 1,
    };
    let alpine = RepoName::parse("library/alpine").unwrap();
    let nested = RepoName::parse("org/app/x").unwrap();
    let tag = Tag::parse("3").unwrap();
    let hub = |repo| RepoKey {
        upstream: "docker.io",
        repo,
    };
    s.put_tag(hub(&alpine), &tag, &rec).await.unwrap();
    s.put_tag(hub(&nested), &tag, &rec).await.unwrap();
    assert_eq!(s.get_tags(hub(&alpine), &tag).await.unwrap(), vec![rec.clone()]);
    assert!(s
        .get_tags(hub(&alpine), &Tag::parse("4").unwrap())
        .await
        .unwrap()
        .is_empty());
    let quay = RepoKey {
        upstream: "quay.io",
        repo: &alpine,
    };
    assert!(
        s.get_tags(quay, &tag).await.unwrap().is_empty(),
        "records are per upstream"
    );

    // One record per media type: a second type is kept beside the first,
    // a newer answer in the same type replaces it.
    let other_type = TagRecord {
        digest: Digest::of(b"n").to_string(),
        media_type: "u".into(),
        size: 2,
        public: true,
        seen_ms: 2,
    };
    s.put_tag(hub(&alpine), &tag, &other_type).await.unwrap();
    let newer = TagRecord {
        digest: Digest::of(b"o").to_string(),
        seen_ms: 3,
        ..rec.clone()
    };
    s.put_tag(hub(&alpine), &tag, &newer).await.unwrap();
    let mut got = s.get_tags(hub(&alpine), &tag).await.unwrap();
    got.sort_by(|a, b| a.media_type.cmp(&b.media_type));
    assert_eq!(got, vec![newer, other_type]);
    assert_eq!(s.list_tags(hub(&alpine)).await.unwrap(), vec![tag.clone()]);
    s.delete_tag(hub(&nested), &tag).await.unwrap();
    assert!(s.get_tags(hub(&nested), &tag).await.unwrap().is_empty());
    assert!(s.list_tags(hub(&nested)).await.unwrap().is_empty());
    s.put_tag(hub(&nested), &tag, &rec).await.unwrap();

    assert_eq!(
        s.list_repositories("docker.io").await.unwrap(),
        vec!["library/alpine", "org/app/x"]
    );
    assert!(s.list_repositories("quay.io").await.unwrap().is_empty());

    s.put_tag_list(hub(&alpine), "q", br#"{"tags":["3"]}"#).await.unwrap();
    assert_eq!(
        s.get_tag_list(hub(&alpine), "q").await.unwrap().as_deref(),
        Some(&br#"{"tags":["3"]}"#[..])
    );
    assert_eq!(s.get_tag_list(hub(&alpine), "other").await.unwrap(), None);
}

pub async fn hosted_store(s: &dyn HostedStore) {
    let app = RepoName::parse("private/team/app").unwrap();
    let other = RepoName::parse("private/other").unwrap();
    let layer = Digest::of(b"layer");
    let manifest = Digest::of(b"manifest");

    // Links are per repository and per kind.
    assert!(!s.linked(&app, Link::Blob, &layer).await.unwrap());
    assert_eq!(s.link_age(&app, Link::Blob, &layer).await.unwrap(), None);
    s.link(&app, Link::Blob, &layer).await.unwrap();
    s.link(&app, Link::Manifest, &manifest).await.unwrap();
    assert!(s.linked(&app, Link::Blob, &layer).await.unwrap());
    assert!(
        !s.linked(&app, Link::Manifest, &layer).await.unwrap(),
        "a blob link is not a manifest link"
    );
    assert!(
        !s.linked(&other, Link::Blob, &layer).await.unwrap(),
        "links are per repository"
    );
    assert!(s.link_age(&app, Link::Blob, &layer).await.unwrap().is_some());
    assert_eq!(s.links(&app, Link::Blob).await.unwrap(), vec![layer.clone()]);
    assert_eq!(s.links(&app, Link::Manifest).await.unwrap(), vec![manifest.clone()]);
    s.link(&app, Link::Blob, &layer).await.expect("linking twice is fine");
    assert!(s.unlink(&app, Link::Blob, &layer).await.unwrap());
    assert!(
        !s.unlink(&app, Link::Blob, &layer).await.unwrap(),
        "unlinking what is gone says so"
    );
    assert!(s.links(&app, Link::Blob).await.unwrap().is_empty());

    // Tags, sorted, moved by a second set, deleted once.
    let (v1, latest) = (Tag::parse("v1").unwrap(), Tag::parse("latest").unwrap());
    let newer = Digest::of(b"manifest 2");
    s.set_tag(&app, &v1, &manifest).await.unwrap();
    s.set_tag(&app, &latest, &manifest).await.unwrap();
    s.set_tag(&app, &latest, &newer).await.unwrap();
    assert_eq!(s.tag(&app, &latest).await.unwrap(), Some(newer.clone()));
    assert_eq!(s.tag(&other, &latest).await.unwrap(), None);
    assert_eq!(
        s.tags(&app).await.unwrap(),
        vec![(latest.clone(), newer.clone()), (v1.clone(), manifest.clone())]
    );
    assert!(s.delete_tag(&app, &v1).await.unwrap());
    assert!(!s.delete_tag(&app, &v1).await.unwrap());
    assert_eq!(s.tags(&app).await.unwrap(), vec![(latest, newer)]);

    // Referrers by subject, each descriptor kept as given.
    let (sig, sbom) = (Digest::of(b"signature"), Digest::of(b"sbom"));
    s.add_referrer(&app, &manifest, &sig, br#"{"d":"sig"}"#).await.unwrap();
    s.add_referrer(&app, &manifest, &sbom, br#"{"d":"sbom"}"#)
        .await
        .unwrap();
    let mut got = s.referrers(&app, &manifest).await.unwrap();
    got.sort();
    assert_eq!(got, vec![br#"{"d":"sbom"}"#.to_vec(), br#"{"d":"sig"}"#.to_vec()]);
    assert!(s.referrers(&other, &manifest).await.unwrap().is_empty());
    s.remove_referrer(&app, &manifest, &sig).await.unwrap();
    s.remove_referrer(&app, &manifest, &sig)
        .await
        .expect("removing what is gone is fine");
    assert_eq!(
        s.referrers(&app, &manifest).await.unwrap(),
        vec![br#"{"d":"sbom"}"#.to_vec()]
    );

    // Repositories under a namespace, nested ones included, sorted.
    s.link(&other, Link::Blob, &layer).await.unwrap();
    let names: Vec<String> = s
        .repositories("private")
        .await
        .unwrap()
        .iter()
        .map(|r| r.as_str().to_string())
        .collect();
    assert_eq!(names, vec!["private/other", "private/team/app"]);
    assert!(s.repositories("elsewhere").await.unwrap().is_empty());
}
