//! Instant restart stays instant: a store holding 100,000 blobs (and no
//! recency index yet, as after an upgrade) serves at once — start-up never
//! walks the store — and is indexed in the background, after which
//! `cache du` counts every blob. The start-to-first-answer figure is
//! printed, not asserted (speed belongs in scripts/bench.sh).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

mod standalone;

const BLOBS: usize = 100_000;

fn write_blobs(data: &Path) -> Vec<(String, Vec<u8>)> {
    let mut samples = Vec::new();
    for i in 0..BLOBS {
        let body = format!("blob number {i}\n").into_bytes();
        let hex = hex::encode(Sha256::digest(&body));
        let dir = data.join("blobs/sha256").join(&hex[..2]);
        std::fs::create_dir_all(&dir).unwrap();
        let mut f = std::fs::File::create(dir.join(&hex)).unwrap();
        f.write_all(&body).unwrap();
        // Fetched without any client's credential: public (provenance).
        std::fs::File::create(dir.join(format!("{hex}.public"))).unwrap();
        if i % 20_000 == 7 {
            samples.push((format!("sha256:{hex}"), body));
        }
    }
    std::fs::create_dir_all(data.join("tmp")).unwrap();
    std::fs::write(data.join(".regmirror-store"), "regmirror content store\n").unwrap();
    samples
}

#[test]
fn a_store_of_100k_blobs_serves_at_once_and_is_indexed_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let samples = write_blobs(&data);
    let addr = "127.0.3.253:5000";
    let cfg = standalone::write_config(dir.path(), addr, &["registry-1.docker.io"]);
    let started = Instant::now();
    let _serving = standalone::spawn(&cfg, &[], std::process::Stdio::null());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    // The upstream (127.0.0.9) is down: only the store can answer.
    let first = rt.block_on(async {
        let (d, body) = &samples[0];
        let url = format!("http://{addr}/v2/dockerhub/library/x/blobs/{d}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(&url).send().await {
                assert_eq!(r.status(), 200, "a stored blob is served");
                assert_eq!(&r.bytes().await.unwrap()[..], &body[..]);
                return started.elapsed();
            }
            assert!(Instant::now() < deadline, "regmirror never answered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    for (d, body) in &samples[1..] {
        let got = rt.block_on(async {
            let url = format!("http://{addr}/v2/dockerhub/library/x/blobs/{d}");
            client.get(url).send().await.unwrap().bytes().await.unwrap()
        });
        assert_eq!(&got[..], &body[..], "{d}");
    }
    // The background indexing counts every blob, eventually.
    let deadline = Instant::now() + Duration::from_secs(120);
    let indexed = loop {
        let out = Command::new(env!("CARGO_BIN_EXE_regmirror"))
            .args(["cache", "du", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        let du = String::from_utf8_lossy(&out.stdout).into_owned();
        // "<size> in <N> blobs (...)"
        let blobs = du
            .split(" in ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse::<usize>().ok());
        if blobs.is_some_and(|n| n >= BLOBS) {
            break started.elapsed();
        }
        assert!(Instant::now() < deadline, "the store was never indexed:\n{du}");
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("100k blobs: first answer {first:?} after start; fully indexed {indexed:?} after start");
}
