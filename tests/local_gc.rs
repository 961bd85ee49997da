//! Pushed content and the cache commands: deleting a manifest makes what
//! only it used collectable, `regmirror cache gc` removes that (and
//! nothing another manifest still uses), `cache ls` and `du` show the
//! local namespace apart from cached content, and a young unreferenced
//! blob (a push in progress) survives gc.

mod common;

use std::path::{Path, PathBuf};

use common::regmirror::{Config, Regmirror, UpstreamEntry, DOCKER_HOSTS};

const USER: &str = "admin";
const PASSWORD: &str = "admin-pw";

fn start() -> (Regmirror, tempfile::TempDir) {
    let dir = common::tempdir("local-gc-");
    let hash = bcrypt::hash(PASSWORD, 4).expect("bcrypt");
    let file = dir.path().join("htpasswd");
    std::fs::write(&file, format!("{USER}:{hash}\n")).expect("htpasswd");
    let mut cfg = Config::new(common::alloc_ip()).with_upstream(UpstreamEntry::new(
        "docker.io",
        DOCKER_HOSTS,
        "https://127.0.0.9",
        "dockerhub",
    ));
    cfg.extra_toml = format!(
        "[[local]]\nnamespace = \"private\"\nhtpasswd = {:?}\ndelete = true\n",
        file.display().to_string()
    );
    (Regmirror::start(cfg), dir)
}

fn blob_file(rm: &Regmirror, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    rm.dir().join("data/blobs/sha256").join(&hex[..2]).join(hex)
}

async fn push_blob(c: &reqwest::Client, base: &str, repo: &str, data: &[u8]) -> String {
    let d = common::sha256_digest(data);
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"))
        .basic_auth(USER, Some(PASSWORD))
        .body(data.to_vec())
        .send()
        .await
        .expect("push blob");
    assert_eq!(r.status(), 201, "monolithic push of {d}");
    d
}

async fn push_manifest(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
    config: &str,
    layers: &[&str],
) -> String {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|d| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": 0}))
        .collect();
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 0},
        "layers": layers,
    })
    .to_string();
    let r = c
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .basic_auth(USER, Some(PASSWORD))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(body.clone())
        .send()
        .await
        .expect("push manifest");
    assert_eq!(r.status(), 201, "manifest push: {}", r.text().await.unwrap_or_default());
    common::sha256_digest(body.as_bytes())
}

fn cache(rm: &Regmirror, args: &[&str]) -> String {
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
}

/// Makes every blob link of `repo` look an hour and a half old.
fn age_links(root: &Path, repo: &str) {
    let dir = root.join("data/local").join(repo).join("_blobs");
    for e in std::fs::read_dir(&dir).expect("links") {
        let path = e.expect("link").path();
        let status = std::process::Command::new("touch")
            .args(["-d", "90 minutes ago"])
            .arg(&path)
            .status()
            .expect("touch");
        assert!(status.success());
    }
}

#[test]
fn deleted_manifests_content_is_collected_and_shared_content_stays() {
    common::init_crypto();
    let (rm, _dir) = start();
    let base = rm.http_url();
    let c = reqwest::Client::new();
    let (shared, only_a, config, stray, a, b) = common::block_on(async {
        let shared = push_blob(&c, &base, "private/a", b"shared layer").await;
        let only_a = push_blob(&c, &base, "private/a", b"layer only a uses").await;
        let config = push_blob(&c, &base, "private/a", b"{\"config\":1}").await;
        let stray = push_blob(&c, &base, "private/a", b"uploaded, never referenced").await;
        let a = push_manifest(&c, &base, "private/a", "1", &config, &[&shared, &only_a]).await;
        // b mounts the shared layer and config from a.
        for d in [&shared, &config] {
            let r = c
                .post(format!("{base}/v2/private/b/blobs/uploads/?mount={d}&from=private/a"))
                .basic_auth(USER, Some(PASSWORD))
                .send()
                .await
                .expect("mount");
            assert_eq!(r.status(), 201, "mount {d}");
        }
        let b = push_manifest(&c, &base, "private/b", "1", &config, &[&shared]).await;
        let r = c
            .delete(format!("{base}/v2/private/a/manifests/{a}"))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .expect("delete");
        assert_eq!(r.status(), 202);
        (shared, only_a, config, stray, a, b)
    });
    let ls = cache(&rm, &["ls"]);
    assert!(
        ls.contains("local/private/b") && !ls.contains("local/private/a "),
        "{ls}"
    );
    assert!(cache(&rm, &["du"]).contains("local namespaces:"));

    // Young links are a push in progress: gc leaves them.
    let said = cache(&rm, &["gc"]);
    assert!(said.contains("0 unreferenced blob links removed"), "{said}");
    assert!(
        !blob_file(&rm, &a).exists(),
        "the deleted manifest's own bytes went: {said}"
    );
    for d in [&shared, &only_a, &config, &stray, &b] {
        assert!(blob_file(&rm, d).exists(), "{d} is still linked: {said}");
    }

    age_links(rm.dir(), "private/a");
    let said = cache(&rm, &["gc"]);
    assert!(
        said.contains("4 unreferenced blob links removed, 2 blobs deleted"),
        "{said}"
    );
    for d in [&only_a, &stray] {
        assert!(!blob_file(&rm, d).exists(), "{d} was used by nothing left: {said}");
    }
    for d in [&shared, &config, &b] {
        assert!(blob_file(&rm, d).exists(), "{d} is what private/b uses: {said}");
    }
    common::block_on(async {
        let r = c
            .get(format!("{base}/v2/private/b/blobs/{shared}"))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.expect("body").as_ref(), b"shared layer");
        let r = c
            .get(format!("{base}/v2/private/a/blobs/{only_a}"))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 404, "collected content is gone from its repository");
    });
}
