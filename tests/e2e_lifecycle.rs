//! The cache lifecycle with real clients and a real upstream: pulls past
//! `cache.max_size` settle under it, the least recently used image goes
//! first, an evicted image pulls again byte-identical, and pulls keep
//! succeeding while `regmirror cache verify` runs on the same store.

mod common;

use std::path::Path;
use std::time::Duration;

use common::clients::Sandbox;
use common::images::{self, Format, Image};
use common::matrix::assert_pulled;
use common::regmirror::{Config, Regmirror};
use common::{alloc_ip, UpstreamEnv, UpstreamEnvOpts, UPSTREAM_HOST};

const MIB: usize = 1024 * 1024;
/// The store's bound in this test; each image is a little over 1 MiB.
const MAX: u64 = 3 * 1024 * 1024;

/// Bytes of content in the store (blobs and manifests, not metadata).
fn stored_bytes(cache_dir: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else { return 0 };
        rd.filter_map(|e| e.ok())
            .map(|e| {
                let path = e.path();
                match e.file_type() {
                    Ok(t) if t.is_dir() => walk(&path),
                    Ok(t) if t.is_file() && path.extension().is_none() => e.metadata().map(|m| m.len()).unwrap_or(0),
                    _ => 0,
                }
            })
            .sum()
    }
    walk(&cache_dir.join("blobs"))
}

fn stored(cache_dir: &Path, digest: &str) -> bool {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    cache_dir.join("blobs/sha256").join(&hex[..2]).join(hex).exists()
}

fn layer_of(image: &Image) -> String {
    image.layers[0].digest.clone()
}

#[test]
fn real_pulls_settle_under_max_size_and_evicted_images_pull_again() {
    let env = UpstreamEnv::start(UpstreamEnvOpts::default());
    let mut cfg = Config::new(alloc_ip()).with_standard_upstreams(UPSTREAM_HOST, env.upstream.ip, &env.ca_file);
    cfg.max_size = format!("{MAX}B");
    let rm = Regmirror::start(cfg);
    let images: Vec<Image> = (0..4)
        .map(|_| images::build_image(Format::Oci, "amd64", &[MIB]))
        .collect();
    for (i, img) in images.iter().enumerate() {
        env.pusher.push_image(&format!("library/ev-{i}"), "1", img);
    }
    let client = Sandbox::new(rm.ip(), &rm.config.client_hostnames(), &rm.ca_pem);
    let name = |i: usize| format!("docker.io/library/ev-{i}:1");

    // Pull 0, 1, 2, then use 0 again, then pull 3: 1 is the least recently used.
    for i in [0, 1, 2, 0, 3] {
        assert_pulled(
            &name(i),
            &client.skopeo_copy(&name(i), None),
            &images[i].manifest_digest,
        );
    }
    let settled = common::wait_until(Duration::from_secs(20), || stored_bytes(&rm.cache_dir) <= MAX);
    assert!(
        settled,
        "the store did not settle under {MAX} bytes: {} bytes\n{}",
        stored_bytes(&rm.cache_dir),
        rm.log()
    );
    assert!(
        !stored(&rm.cache_dir, &layer_of(&images[1])),
        "the least recently used image's layer is evicted"
    );
    assert!(
        stored(&rm.cache_dir, &layer_of(&images[3])),
        "the image pulled last is kept"
    );
    assert!(
        stored(&rm.cache_dir, &images[1].manifest_digest),
        "manifests outlive layers"
    );

    // The evicted image pulls again, byte-identical (the client checks every
    // digest), while `cache verify` re-hashes the same store.
    let verify = std::process::Command::new(common::regmirror::binary())
        .args(["cache", "verify", "--config"])
        .arg(&rm.config_path)
        .output();
    let podman = client.podman_pull(&name(1), None);
    assert_pulled(&name(1), &podman, &images[1].manifest_digest);
    let verify = verify.expect("regmirror cache verify runs");
    assert!(
        verify.status.success(),
        "cache verify found problems in a store filled by real pulls:\n{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let ls = std::process::Command::new(common::regmirror::binary())
        .args(["cache", "ls", "--json", "--config"])
        .arg(&rm.config_path)
        .output()
        .expect("cache ls");
    let listed = String::from_utf8_lossy(&ls.stdout);
    assert!(
        listed.contains("library/ev-3"),
        "cache ls lists what real pulls cached: {listed}"
    );

    let cache = |args: &[&str]| {
        let out = std::process::Command::new(common::regmirror::binary())
            .arg("cache")
            .args(args)
            .arg("--config")
            .arg(&rm.config_path)
            .output()
            .expect("regmirror cache");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "cache {args:?}: {said}");
        said
    };
    assert!(cache(&["du"]).contains("total_bytes"));

    // gc empties the store; warm fills it again through the normal fetch
    // path (with regmirror's anonymous token: upstream authenticates), so
    // the next pull costs upstream only the tag HEAD.
    cache(&["gc", "--to", "0"]);
    assert_eq!(stored_bytes(&rm.cache_dir), 0);
    cache(&["warm", &name(2)]);
    assert!(stored(&rm.cache_dir, &layer_of(&images[2])), "warm stored the layer");
    let mark = env.upstream.mark();
    assert_pulled(
        &name(2),
        &client.skopeo_copy(&name(2), None),
        &images[2].manifest_digest,
    );
    let blob_gets: Vec<_> = env
        .upstream
        .entries_since(mark)
        .into_iter()
        .filter(|e| e.blob_digest().is_some())
        .collect();
    assert!(
        blob_gets.is_empty(),
        "a warmed image fetched blobs again: {blob_gets:#?}"
    );

    // rm forgets one image; it pulls again, byte-identical.
    cache(&["rm", &name(2)]);
    assert!(!stored(&rm.cache_dir, &layer_of(&images[2])));
    assert_pulled(
        &name(2),
        &client.podman_pull(&name(2), None),
        &images[2].manifest_digest,
    );
}
