//! The S3 backend on a real 3-node Garage cluster: the same store suite the
//! disk backend passes (src/cache/disk.rs runs it there), then what only a
//! shared bucket has to get right: a second replica with a cold local read
//! cache sees everything the first wrote, content is copied into its local
//! cache as it is served and survives eviction of that copy, large blobs go
//! up in parts, and a write that dies leaves nothing visible.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use regmirror::cache::blob_store::BlobStore;
use regmirror::cache::s3::{S3Store, PART_SIZE};
use regmirror::cache::tiered::TieredStore;
use regmirror::cache::{store_suite, DiskStore, HostedStore, Link, MetaStore, RepoKey, TagRecord};
use regmirror::config::BucketSettings;
use regmirror::reference::{Digest, RepoName, Tag};

use common::garage::{GarageCluster, KEY_ID, REGION, SECRET_KEY};

fn settings(g: &GarageCluster, node: usize, prefix: &str, creds: &std::path::Path) -> BucketSettings {
    BucketSettings {
        bucket: g.bucket.clone(),
        endpoint: Some(url::Url::parse(&g.endpoint(node)).unwrap()),
        region: Some(REGION.into()),
        prefix: format!("{prefix}/"),
        credentials_file: Some(creds.to_path_buf()),
        max_size: None,
    }
}

/// One replica's view: its own local read cache, the shared bucket.
struct Replica {
    local: Arc<DiskStore>,
    bucket: Arc<S3Store>,
    blobs: TieredStore,
    _dir: tempfile::TempDir,
}

fn replica(s: &BucketSettings) -> Replica {
    let dir = common::tempdir("s3-local-");
    let local = Arc::new(DiskStore::open_dir(dir.path()).unwrap());
    let bucket = Arc::new(S3Store::connect(s).unwrap());
    Replica {
        blobs: TieredStore::new(local.clone(), bucket.clone()),
        local,
        bucket,
        _dir: dir,
    }
}

async fn read_all(s: &dyn BlobStore, d: &Digest) -> Vec<u8> {
    let blob = s.open(d).await.unwrap().expect("stored");
    let size = blob.info().size;
    let chunks: Vec<Bytes> = blob.read(0, size).try_collect().await.unwrap();
    chunks.concat()
}

/// Waits for the copy into the local cache that a whole read starts.
async fn wait_local(local: &DiskStore, d: &Digest) -> bool {
    for _ in 0..100 {
        if local.stat(d).await.unwrap().is_some() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

fn credentials_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("credentials");
    std::fs::write(
        &path,
        format!("[other]\naws_access_key_id = nope\n\n[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET_KEY}\n"),
    )
    .unwrap();
    path
}

#[test]
fn s3_backend_on_garage() {
    let garage = GarageCluster::start(3, "regmirror-suite");
    let creds_dir = common::tempdir("s3-creds-");
    let creds = credentials_file(creds_dir.path());
    let rt = common::runtime();

    // The suite every backend passes, through node 0.
    let a = replica(&settings(&garage, 0, "suite", &creds));
    rt.block_on(async {
        store_suite::blob_store(&a.blobs).await;
        store_suite::meta_store(a.bucket.as_ref()).await;
        store_suite::hosted_store(a.bucket.as_ref()).await;
    });

    // Two replicas on one prefix, each through a different Garage node.
    let a = replica(&settings(&garage, 0, "shared", &creds));
    let b = replica(&settings(&garage, 1, "shared", &creds));
    rt.block_on(async {
        // A blob of several parts, written through A.
        let big: Vec<u8> = (0..(2 * PART_SIZE + 12_345) as u32).map(|i| (i % 241) as u8).collect();
        let d = Digest::of(&big);
        let mut p = a.blobs.begin(&d).await.unwrap();
        for chunk in big.chunks(1 << 20) {
            p.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        assert!(
            b.blobs.stat(&d).await.unwrap().is_none(),
            "nothing is visible to another replica before commit"
        );
        p.commit(None).await.unwrap();
        a.blobs.mark_public(&d).await.unwrap();

        // B has nothing locally, finds it in the bucket with its provenance,
        // and copies it into its local cache as it serves it.
        assert!(b.local.stat(&d).await.unwrap().is_none());
        let info = b.blobs.stat(&d).await.unwrap().expect("B sees A's blob");
        assert_eq!((info.size, info.public), (big.len() as u64, true));
        assert_eq!(read_all(&b.blobs, &d).await, big, "B reads A's blob whole");
        assert!(
            wait_local(&b.local, &d).await,
            "a whole read is copied into the local cache"
        );
        let local = b.local.stat(&d).await.unwrap().unwrap();
        assert!(local.public, "the copy keeps its provenance");

        // Evicting the local copy keeps the bucket's.
        b.local.delete(&d).await.unwrap();
        assert_eq!(
            read_all(&b.blobs, &d).await,
            big,
            "served from the bucket after local eviction"
        );

        // A ranged read from the bucket is served and not copied.
        let other = replica(&settings(&garage, 2, "shared", &creds));
        let blob = other.blobs.open(&d).await.unwrap().unwrap();
        let part: Vec<Bytes> = blob
            .read(PART_SIZE as u64 - 5, PART_SIZE as u64 + 5)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(part.concat(), &big[PART_SIZE - 5..PART_SIZE + 5]);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            other.local.stat(&d).await.unwrap().is_none(),
            "a ranged read leaves no partial copy"
        );

        // A push of several parts through B, its digest named at the end.
        let pushed: Vec<u8> = (0..(PART_SIZE + 7) as u32).map(|i| (i % 13) as u8).collect();
        let pd = Digest::of(&pushed);
        let mut u = b.blobs.begin_upload("push-1").await.unwrap();
        for chunk in pushed.chunks(3 << 20) {
            u.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        assert!(a.blobs.stat(&pd).await.unwrap().is_none());
        u.commit_to(&pd, None).await.unwrap();
        assert_eq!(read_all(&a.blobs, &pd).await, pushed, "A reads B's push");
        assert!(
            !a.blobs.stat(&pd).await.unwrap().unwrap().public,
            "pushed content is not public"
        );

        // A download that dies (dropped mid-write, as a killed task would)
        // leaves nothing under its digest, in the bucket or locally.
        let lost: Vec<u8> = vec![7u8; PART_SIZE + 100];
        let ld = Digest::of(&lost);
        let mut p = a.blobs.begin(&ld).await.unwrap();
        p.write(Bytes::copy_from_slice(&lost)).await.unwrap();
        drop(p);
        assert!(a.blobs.stat(&ld).await.unwrap().is_none());
        assert!(b.blobs.stat(&ld).await.unwrap().is_none());

        // A manifest's media type written by A is B's too.
        let m = br#"{"schemaVersion":2}"#;
        let md = Digest::of(m);
        let mut p = a.blobs.begin(&md).await.unwrap();
        p.write(Bytes::from_static(m)).await.unwrap();
        p.commit(Some("application/vnd.oci.image.manifest.v1+json"))
            .await
            .unwrap();
        assert_eq!(
            b.blobs.stat(&md).await.unwrap().unwrap().media_type.as_deref(),
            Some("application/vnd.oci.image.manifest.v1+json")
        );
        let listed = b.blobs.list().await.unwrap();
        let mut names: Vec<(String, bool)> = listed.iter().map(|l| (l.digest.to_string(), l.manifest)).collect();
        names.sort();
        let mut want = vec![(d.to_string(), false), (pd.to_string(), false), (md.to_string(), true)];
        want.sort();
        assert_eq!(names, want, "the bucket lists what every replica stored");

        // Records written by one replica are the other's.
        let repo = RepoName::parse("library/alpine").unwrap();
        let tag = Tag::parse("3").unwrap();
        let at = RepoKey {
            upstream: "docker.io",
            repo: &repo,
        };
        let rec = TagRecord {
            digest: md.to_string(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: m.len() as u64,
            public: false,
            seen_ms: 5,
        };
        a.bucket.put_tag(at, &tag, &rec).await.unwrap();
        assert_eq!(b.bucket.get_tags(at, &tag).await.unwrap(), vec![rec]);
        let private = RepoName::parse("private/app").unwrap();
        b.bucket.link(&private, Link::Manifest, &md).await.unwrap();
        b.bucket.set_tag(&private, &tag, &md).await.unwrap();
        assert!(a.bucket.linked(&private, Link::Manifest, &md).await.unwrap());
        assert_eq!(a.bucket.tag(&private, &tag).await.unwrap(), Some(md.clone()));
    });

    // One Garage node down: the other two are a quorum of three.
    let mut garage = garage;
    garage.kill_node(2);
    rt.block_on(async {
        let data = b"written with a node down".to_vec();
        let d = Digest::of(&data);
        let mut p = a.blobs.begin(&d).await.unwrap();
        p.write(Bytes::from(data.clone())).await.unwrap();
        p.commit(None).await.unwrap();
        assert_eq!(read_all(&b.blobs, &d).await, data);
    });
}

#[test]
fn a_bucket_that_refuses_the_key_fails_readiness_with_its_reason() {
    let garage = GarageCluster::start(3, "regmirror-refused");
    let dir = common::tempdir("s3-creds-");
    let creds = dir.path().join("credentials");
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {}\n",
            "0".repeat(64)
        ),
    )
    .unwrap();
    let r = replica(&settings(&garage, 0, "refused", &creds));
    let e = common::block_on(r.blobs.check_writable()).expect_err("a wrong secret cannot write");
    let msg = e.to_string();
    assert!(
        msg.contains("s3://regmirror-refused/refused/"),
        "names the bucket: {msg}"
    );
}

/// A local disk slower than the client never holds the client back: with
/// the disk stalled (every blocking thread busy), a whole read from the
/// bucket is served in full, its copy given up, and the copy made again
/// from the bucket once the disk answers.
#[test]
fn a_stalled_local_disk_never_holds_a_bucket_read_back() {
    let garage = GarageCluster::start(3, "regmirror-stalled-disk");
    let creds_dir = common::tempdir("s3-creds-");
    let creds = credentials_file(creds_dir.path());
    // One blocking thread: the local cache's file work queues behind it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let a = replica(&settings(&garage, 0, "stall", &creds));
    let b = replica(&settings(&garage, 1, "stall", &creds));
    rt.block_on(async {
        let big: Vec<u8> = (0..(3 * PART_SIZE) as u32).map(|i| (i % 251) as u8).collect();
        let d = Digest::of(&big);
        let mut p = a.blobs.begin(&d).await.unwrap();
        p.write(Bytes::from(big.clone())).await.unwrap();
        p.commit(None).await.unwrap();

        let blob = b.blobs.open(&d).await.unwrap().expect("in the bucket");
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (flag, (started_tx, started_rx)) = (stalled.clone(), std::sync::mpsc::channel());
        let stall = tokio::task::spawn_blocking(move || {
            started_tx.send(()).unwrap();
            std::thread::sleep(std::time::Duration::from_secs(5));
            flag.store(false, std::sync::atomic::Ordering::SeqCst);
        });
        started_rx.recv().unwrap();
        let chunks: Vec<Bytes> = blob.read(0, big.len() as u64).try_collect().await.unwrap();
        assert!(
            stalled.load(std::sync::atomic::Ordering::SeqCst),
            "the client had all of it while the local disk was stalled"
        );
        assert_eq!(chunks.concat(), big, "served whole from the bucket");
        stall.await.unwrap();
        assert!(
            wait_local(&b.local, &d).await,
            "copied into the local cache once the disk answered"
        );
        assert_eq!(read_all(b.local.as_ref(), &d).await, big, "the copy is whole");
    });
}
