//! The cache over time: stale tags served to every client while upstream
//! fails, the size bound with LRU eviction, disk-full pulls, the operator's
//! `regmirror cache` commands and restarts after a crash.
//!
//! regmirror runs in-process (or as the binary, where a test needs a mount
//! namespace or a kill -9) on `127.0.6.<n>:5000` with its own cache
//! directory; fakes on `127.0.6.<100+n>:0`.

#[path = "fake_upstream/mod.rs"]
mod fake_upstream;
mod in_process;

use std::path::{Path, PathBuf};
use std::time::Duration;

use fake_upstream::{bytes_for, digest_of, FakeUpstream, Fault};
use in_process::{client, header};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// What docker 20.10 sends for a tag.
const DOCKER_CLIENT_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v1+prettyjws, application/json";

// ---------------------------------------------------------------- harness

struct Mirror {
    /// First, so it stops before the store directory goes.
    served: in_process::Served,
    base: String,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

fn config_toml(ip: &str, root: &Path, upstream_url: &str, cache_extra: &str) -> String {
    let root = root.display();
    format!(
        r#"
[server]
http = "{ip}:5000"
name = "regmirror.test"
[ca]
dir = '{root}/certs'
[cache]
dir = '{root}/data'
max_size = "1GiB"
{cache_extra}
[[upstream]]
name = "docker.io"
hosts = ["registry-1.docker.io", "docker.io"]
url = "{upstream_url}"
namespace = "dockerhub"
[limits]
# Room for the 20 concurrent downloads of the crash test.
download_concurrency = 32
"#
    )
}

impl Mirror {
    /// regmirror on `127.0.6.<n>:5000` in front of `upstream_url`; `cache`
    /// replaces the `max_size` line of `[cache]`.
    async fn start(n: u8, upstream_url: &str, cache: Option<&str>) -> Mirror {
        let temp = tempfile::tempdir().expect("tempdir");
        let dir = temp.path().to_path_buf();
        Self::start_in(n, upstream_url, cache, dir, Some(temp)).await
    }

    async fn start_in(
        n: u8,
        upstream_url: &str,
        cache: Option<&str>,
        dir: PathBuf,
        temp: Option<tempfile::TempDir>,
    ) -> Mirror {
        let ip = format!("127.0.6.{n}");
        let mut toml = config_toml(&ip, &dir, upstream_url, "");
        if let Some(c) = cache {
            toml = toml.replace("max_size = \"1GiB\"\n", &format!("{c}\n"));
        }
        let served = in_process::Served::start(&ip, &toml, "lifecycle test").await;
        Mirror {
            base: served.base.clone(),
            dir,
            _temp: temp,
            served,
        }
    }

    /// Stops serving and waits until the listener is closed.
    async fn shutdown(mut self) {
        self.served.stop();
        let _ = tokio::time::timeout(Duration::from_secs(15), &mut self.served.task).await;
    }

    /// `/v2/dockerhub/library/<repo>/<rest>` (explicit prefix mode).
    fn url(&self, repo: &str, rest: &str) -> String {
        format!("{}/v2/dockerhub/library/{repo}/{rest}", self.base)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }
}

/// A manifest body of `media_type` that names `seed` (distinct seeds,
/// distinct digests).
fn manifest_of(media_type: &str, seed: &str) -> Vec<u8> {
    let config = digest_of(seed.as_bytes());
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{media_type}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{}}},"layers":[]}}"#,
        seed.len()
    )
    .into_bytes()
}

/// GET with one Accept value (or none): (status, Warning, digest, content type, body).
async fn get_tag(
    c: &reqwest::Client,
    url: &str,
    accept: Option<&str>,
) -> (u16, Option<String>, Option<String>, Option<String>, Vec<u8>) {
    let mut rb = c.get(url);
    if let Some(a) = accept {
        rb = rb.header("accept", a);
    }
    let r = rb.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let own = |n: &str| header(&r, n).map(str::to_string);
    let (status, warning, digest, ctype) = (
        r.status().as_u16(),
        own("warning"),
        own("docker-content-digest"),
        own("content-type"),
    );
    let body = r.bytes().await.expect("body").to_vec();
    (status, warning, digest, ctype, body)
}

fn oci_error_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not OCI error JSON ({e}): {}", String::from_utf8_lossy(body)));
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no errors[0].code in {v}"))
        .to_string()
}

// ---------------------------------------------------------------- stale tags

/// Rule 2 for every client: a tag pulled by docker (and once by an OCI
/// client) is served while upstream answers 429, then 500, then is gone, to
/// any client whose Accept admits a recorded type — the type it prefers —
/// with `Warning: 110`; a client admitting none gets an OCI error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_tags_are_served_to_every_client_whose_accept_admits_a_recorded_type() {
    let up = FakeUpstream::start("127.0.6.101:0").await;
    let m = Mirror::start(1, &up.url(), None).await;
    let c = client();
    let tag_path = "/v2/library/app/manifests/v1";
    let url = m.url("app", "manifests/v1");

    // docker pulls first: upstream answers with a Docker manifest.
    let docker = manifest_of(DOCKER_MANIFEST, "docker");
    let docker_d = up.add_manifest("library/app", Some("v1"), DOCKER_MANIFEST, &docker);
    let (status, warning, ..) = get_tag(&c, &url, Some(DOCKER_CLIENT_ACCEPT)).await;
    assert_eq!((status, warning), (200, None));
    // Later an OCI-only client: upstream answers with an OCI index.
    let index = manifest_of(OCI_INDEX, "index");
    let index_d = up.add_manifest("library/app", Some("v1"), OCI_INDEX, &index);
    let (status, _, digest, ..) = get_tag(&c, &url, Some(OCI_INDEX)).await;
    assert_eq!((status, digest.as_deref()), (200, Some(index_d.as_str())));

    let expect_stale = |why: String, accept: Option<&'static str>, want: (&'static str, String, Vec<u8>)| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let (status, warning, digest, ctype, body) = get_tag(&c, &url, accept).await;
            assert_eq!(
                status,
                200,
                "{why}, Accept {accept:?}: {}",
                String::from_utf8_lossy(&body)
            );
            let w = warning.unwrap_or_else(|| panic!("{why}, Accept {accept:?}: no Warning"));
            assert!(w.starts_with("110 "), "{why}: Warning {w:?}");
            assert_eq!(ctype.as_deref(), Some(want.0), "{why}, Accept {accept:?}");
            assert_eq!(digest, Some(want.1), "{why}, Accept {accept:?}");
            assert_eq!(body, want.2, "{why}, Accept {accept:?}");
        }
    };
    let as_docker = || (DOCKER_MANIFEST, docker_d.clone(), docker.clone());
    let as_index = || (OCI_INDEX, index_d.clone(), index.clone());

    for (why, fault) in [("429", Fault::TooMany { retry_after: 3 }), ("500", Fault::Status(500))] {
        up.set_fault(tag_path, fault);
        // podman / containerd / curl asking for one type each.
        expect_stale(why.to_string(), Some(DOCKER_MANIFEST), as_docker()).await;
        expect_stale(why.to_string(), Some(OCI_INDEX), as_index()).await;
        // Several admissible: the client's own preference decides.
        let prefers_docker: &'static str =
            "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json;q=0.9";
        expect_stale(why.to_string(), Some(prefers_docker), as_docker()).await;
        expect_stale(why.to_string(), Some(DOCKER_CLIENT_ACCEPT), as_docker()).await;
        // curl's `*/*`: regmirror asks for every manifest type, index first.
        expect_stale(why.to_string(), None, as_index()).await;
        // Nothing recorded in a type this client takes.
        for accept in [OCI_MANIFEST, DOCKER_LIST] {
            let (status, warning, _, _, body) = get_tag(&c, &url, Some(accept)).await;
            assert!(
                status == 429 || (500..600).contains(&status),
                "{why}, Accept {accept}: {status}"
            );
            assert_eq!(warning, None, "{why}, Accept {accept}: served a type it does not take");
            let code = oci_error_code(&body);
            assert!(["TOOMANYREQUESTS", "UNAVAILABLE"].contains(&code.as_str()), "{code}");
        }
    }

    up.clear_fault(tag_path);
    up.stop().await;
    expect_stale("unreachable".into(), Some(DOCKER_MANIFEST), as_docker()).await;
    expect_stale("unreachable".into(), Some(OCI_INDEX), as_index()).await;
    expect_stale("unreachable".into(), None, as_index()).await;
    let (status, _, _, _, body) = get_tag(&c, &url, Some(OCI_MANIFEST)).await;
    assert!(
        (500..600).contains(&status),
        "unreachable, nothing admissible: {status}"
    );
    assert_eq!(oci_error_code(&body), "UNAVAILABLE");
}

/// A store written before records were kept per media type (one record per
/// Accept list) keeps serving its tags stale to any admitting client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_records_of_older_stores_are_served_stale() {
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path().join("data");
    let manifest = manifest_of(DOCKER_MANIFEST, "old store");
    let d = digest_of(&manifest);
    let hex = d.strip_prefix("sha256:").expect("sha256");
    let blob_dir = data.join("blobs/sha256").join(&hex[..2]);
    std::fs::create_dir_all(&blob_dir).expect("blob dir");
    std::fs::write(blob_dir.join(hex), &manifest).expect("manifest");
    std::fs::write(blob_dir.join(format!("{hex}.type")), DOCKER_MANIFEST).expect("type");
    let tag_dir = data.join("meta/docker.io/library/old/_tags/1");
    std::fs::create_dir_all(&tag_dir).expect("tag dir");
    // What the previous version wrote: keyed by a hash of the Accept list.
    std::fs::write(
        tag_dir.join("9f86d081884c7d65.json"),
        format!(
            r#"{{"digest":"{d}","media_type":"{DOCKER_MANIFEST}","size":{}}}"#,
            manifest.len()
        ),
    )
    .expect("record");
    std::fs::write(data.join(".regmirror-store"), "regmirror content store\n").expect("marker");

    let up = FakeUpstream::start("127.0.6.102:0").await;
    let url = up.url();
    up.stop().await;
    let m = Mirror::start_in(2, &url, None, temp.path().to_path_buf(), Some(temp)).await;
    let (status, warning, digest, _, body) =
        get_tag(&client(), &m.url("old", "manifests/1"), Some(DOCKER_MANIFEST)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(warning.is_some_and(|w| w.starts_with("110 ")));
    assert_eq!(digest.as_deref(), Some(d.as_str()));
    assert_eq!(body, manifest);
}

// ---------------------------------------------------------------- size bound

/// An image of the fake upstream: one layer of `size` bytes and an OCI
/// manifest naming it, tagged `1` in `library/<name>`.
struct TestImage {
    name: String,
    layer: Vec<u8>,
    layer_digest: String,
    manifest: Vec<u8>,
}

fn push_image(up: &FakeUpstream, name: &str, size: usize) -> TestImage {
    let layer = bytes_for(name, size);
    let (layer_digest, _) = up.add_blob(&format!("library/{name}"), &layer);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{layer_digest}","size":{size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_digest}","size":{size}}}]}}"#
    )
    .into_bytes();
    up.add_manifest(&format!("library/{name}"), Some("1"), OCI_MANIFEST, &manifest);
    TestImage {
        name: name.into(),
        layer,
        layer_digest,
        manifest,
    }
}

/// What a client's pull of `img` does over HTTP: the tag, then the layer;
/// both must arrive whole and byte-identical to upstream's.
async fn pull(c: &reqwest::Client, m: &Mirror, img: &TestImage) {
    pull_from(c, &m.base, img).await
}

/// [`pull`] from the regmirror at `base` (`http://IP:5000`).
async fn pull_from(c: &reqwest::Client, base: &str, img: &TestImage) {
    let url = |rest: &str| format!("{base}/v2/dockerhub/library/{}/{rest}", img.name);
    let (status, _, _, _, body) = get_tag(c, &url("manifests/1"), Some(OCI_MANIFEST)).await;
    assert_eq!(status, 200, "manifest of {}", img.name);
    assert_eq!(body, img.manifest, "manifest of {}", img.name);
    let url = url(&format!("blobs/{}", img.layer_digest));
    let r = c.get(&url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(r.status(), 200, "layer of {}", img.name);
    let got = r.bytes().await.unwrap_or_else(|e| panic!("layer of {}: {e}", img.name));
    assert!(got == img.layer, "layer of {} is not upstream's bytes", img.name);
}

fn blob_path(data: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    data.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// Bytes of content in the store, as `du` of the content files would say.
fn stored_bytes(data: &Path) -> u64 {
    let mut total = 0;
    for prefix in std::fs::read_dir(data.join("blobs/sha256")).expect("blobs dir") {
        for f in std::fs::read_dir(prefix.expect("entry").path()).expect("prefix dir") {
            let f = f.expect("entry");
            if !f.file_name().to_string_lossy().ends_with(".type") {
                total += f.metadata().map_or(0, |m| m.len());
            }
        }
    }
    total
}

async fn settles_under(data: &Path, bound: u64) -> u64 {
    let mut size = stored_bytes(data);
    for _ in 0..300 {
        if size <= bound {
            return size;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        size = stored_bytes(data);
    }
    panic!("the store stayed at {size} bytes, over its bound of {bound}");
}

/// `cache.max_size` holds: filled past it, the store settles under the
/// bound; recently used layers survive, the least recently used go first
/// (manifests after every layer); an evicted image pulls again
/// byte-identical; and after a restart the bound still holds with what was
/// stored before it counted (the index survived; nothing was walked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_settles_under_max_size_keeping_what_was_used_last() {
    const LAYER: usize = 200_000;
    const MAX: u64 = 1 << 20;
    let up = FakeUpstream::start("127.0.6.103:0").await;
    let temp = tempfile::tempdir().expect("tempdir");
    let dir = temp.path().to_path_buf();
    let cache = r#"max_size = "1MiB""#;
    let m = Mirror::start_in(3, &up.url(), Some(cache), dir.clone(), None).await;
    let c = client();
    let imgs: Vec<TestImage> = (0..9).map(|i| push_image(&up, &format!("evict{i}"), LAYER)).collect();

    for img in &imgs[..5] {
        pull(&c, &m, img).await;
    }
    // Images 0 and 1 are used again: they are now the most recent.
    for img in &imgs[..2] {
        pull(&c, &m, img).await;
    }
    for img in &imgs[5..7] {
        pull(&c, &m, img).await;
    }
    let data = m.data();
    let size = settles_under(&data, MAX).await;
    let present = |img: &TestImage| blob_path(&data, &img.layer_digest).exists();
    for img in [&imgs[0], &imgs[1], &imgs[6]] {
        assert!(
            present(img),
            "{} was used recently but evicted (store {size} bytes)",
            img.name
        );
    }
    for img in [&imgs[2], &imgs[3]] {
        assert!(!present(img), "{} was least recently used but kept", img.name);
    }
    for img in &imgs[..7] {
        let d = digest_of(&img.manifest);
        assert!(
            blob_path(&data, &d).exists(),
            "manifest of {} evicted before layers",
            img.name
        );
    }
    let no_tmp = std::fs::read_dir(data.join("tmp")).expect("tmp").count();
    assert_eq!(no_tmp, 0, "eviction left temp files");

    // The manifest is cached, its layer is not: the pull fetches the layer again.
    let gets = |img: &TestImage| up.count("GET", &format!("/v2/library/{}/blobs/{}", img.name, img.layer_digest));
    assert_eq!(gets(&imgs[2]), 1);
    pull(&c, &m, &imgs[2]).await;
    assert_eq!(gets(&imgs[2]), 2, "an evicted layer is fetched again");
    settles_under(&data, MAX).await;

    // Restart on the same store: the index knows what is there.
    m.shutdown().await;
    let m = Mirror::start_in(3, &up.url(), Some(cache), dir.clone(), Some(temp)).await;
    for img in &imgs[7..9] {
        pull(&c, &m, img).await;
    }
    let size = settles_under(&data, MAX).await;
    for img in &imgs[7..9] {
        assert!(
            present(img),
            "{} was just pulled but is gone (store {size} bytes)",
            img.name
        );
    }
    assert!(
        blob_path(&data, &imgs[2].layer_digest).exists(),
        "the image pulled again last before the restart survives"
    );
}

// ---------------------------------------------------------------- disk full

/// The regmirror binary, started by the test (for mount namespaces and
/// kill -9), logging to `<dir>/regmirror.log`.
struct Process {
    child: std::process::Child,
    base: String,
    log: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "regmirror log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Process {
    /// `regmirror serve` on `127.0.6.<n>:5000`, its store in `<dir>/data`;
    /// with `tmpfs_size`, that directory is a tmpfs of that size mounted in
    /// a mount namespace of regmirror's own (gone with the process).
    async fn start(n: u8, dir: &Path, upstream_url: &str, tmpfs_size: Option<&str>) -> Process {
        let ip = format!("127.0.6.{n}");
        let config = dir.join("regmirror.toml");
        std::fs::write(&config, config_toml(&ip, dir, upstream_url, "")).expect("config");
        let log = dir.join("regmirror.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log");
        let bin = env!("CARGO_BIN_EXE_regmirror");
        let mut cmd = match tmpfs_size {
            Some(size) => {
                let data = dir.join("data");
                std::fs::create_dir_all(&data).expect("mount point");
                let mut c = std::process::Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                    .arg(format!(
                        "mount -t tmpfs -o size={size} tmpfs '{}' && exec '{bin}' serve --config '{}'",
                        data.display(),
                        config.display()
                    ));
                c
            }
            None => {
                let mut c = std::process::Command::new(bin);
                c.arg("serve").arg("--config").arg(&config);
                c
            }
        };
        let child = cmd
            .env("RUST_LOG", "regmirror=info")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn regmirror");
        let mut p = Process {
            child,
            base: format!("http://{ip}:5000"),
            log,
        };
        let c = client();
        for _ in 0..500 {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("regmirror exited during start-up: {status}");
            }
            if c.get(format!("{}/healthz", p.base))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = p.child.kill();
        panic!("regmirror on {ip} did not come up");
    }

    /// `<dir>/data` as regmirror sees it (through its mount namespace).
    fn data(&self, dir: &Path) -> PathBuf {
        let inside = dir.join("data");
        PathBuf::from(format!("/proc/{}/root{}", self.child.id(), inside.display()))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl std::ops::Deref for Process {
    type Target = str;
    fn deref(&self) -> &str {
        &self.base
    }
}

/// Disk full: a layer larger than the free space is still pulled whole and
/// verified (streamed from upstream, not stored), nothing partial is left,
/// a log line and a metric say why, eviction makes room, and the next
/// layer that fits is cached again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_streams_uncached_and_evicts_to_make_room() {
    let up = FakeUpstream::start("127.0.6.104:0").await;
    let temp = tempfile::tempdir().expect("tempdir");
    let p = Process::start(4, temp.path(), &up.url(), Some("6m")).await;
    let c = client();
    let data = p.data(temp.path());
    assert!(data.join(".regmirror-store").exists(), "store on the tmpfs");

    let small = push_image(&up, "full-small", 1_500_000);
    let huge = push_image(&up, "full-huge", 8_000_000);
    let after = push_image(&up, "full-after", 2_500_000);
    pull_from(&c, &p, &small).await;
    assert!(
        blob_path(&data, &small.layer_digest).exists(),
        "cached while there is room"
    );

    pull_from(&c, &p, &huge).await;
    assert!(
        !blob_path(&data, &huge.layer_digest).exists(),
        "more than the disk holds is not stored"
    );
    let tmp: Vec<_> = std::fs::read_dir(data.join("tmp")).expect("tmp").collect();
    assert!(tmp.is_empty(), "partial files left: {tmp:?}");
    let log = p.log();
    assert!(log.contains("disk full"), "no log line says why:\n{log}");
    let metrics = c
        .get(format!("{}/metrics", &*p))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("regmirror_disk_full_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // The evictor made room: the next layer that fits is stored whole.
    let mut evicted = false;
    for _ in 0..100 {
        if !blob_path(&data, &small.layer_digest).exists() {
            evicted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(evicted, "nothing was evicted after the disk filled:\n{}", p.log());
    pull_from(&c, &p, &after).await;
    let stored = std::fs::read(blob_path(&data, &after.layer_digest)).expect("cached after eviction");
    assert!(stored == after.layer, "the entry stored after a full disk is intact");
    // And the oversized one still pulls, every time.
    pull_from(&c, &p, &huge).await;
    assert_eq!(
        up.count("GET", &format!("/v2/library/full-huge/blobs/{}", huge.layer_digest)),
        2
    );
}

// ---------------------------------------------------------------- cache commands

/// `regmirror cache ARGS --config <dir>/regmirror.toml`: (exit ok, stdout, stderr).
async fn cache_cmd(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .arg("cache")
        .args(args)
        .arg("--config")
        .arg(dir.join("regmirror.toml"))
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run regmirror cache");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The operator's commands on a store filled by pulls, while `serve` runs
/// on it: `warm` fills through the server, `ls --json` and `du` report what
/// is there, `verify` finds a flipped byte (non-zero exit, quarantined, the
/// next pull fetches it again intact), `rm` forgets an image, `gc --to 0`
/// empties the store, and pulls go on working throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_commands_work_while_serve_runs() {
    let up = FakeUpstream::start("127.0.6.105:0").await;
    let temp = tempfile::tempdir().expect("tempdir");
    let dir = temp.path();
    let p = Process::start(5, dir, &up.url(), None).await;
    let c = client();
    let data = dir.join("data");
    let imgs: Vec<TestImage> = (0..3)
        .map(|i| push_image(&up, &format!("cmd{i}"), 300_000 + i))
        .collect();
    pull_from(&c, &p, &imgs[0]).await;
    pull_from(&c, &p, &imgs[1]).await;

    // warm: through the server, so upstream sees one GET per blob.
    let (ok, out, err) = cache_cmd(dir, &["warm", "docker.io/library/cmd2:1"]).await;
    assert!(ok, "warm failed:\n{out}\n{err}");
    assert!(
        blob_path(&data, &imgs[2].layer_digest).exists(),
        "warm stored nothing:\n{out}"
    );
    assert_eq!(
        up.count("GET", &format!("/v2/library/cmd2/blobs/{}", imgs[2].layer_digest)),
        1
    );
    let (ok, _, err) = cache_cmd(dir, &["warm", "docker.io/library/nope:1"]).await;
    assert!(!ok, "warming a missing image succeeded");
    assert!(err.contains("nope"), "{err}");

    // ls --json: every tag with its digest and size.
    let (ok, out, err) = cache_cmd(dir, &["ls", "--json"]).await;
    assert!(ok, "ls failed: {err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("ls --json ({e}):\n{out}"));
    for img in &imgs {
        let repo = format!("library/{}", img.name);
        let row = rows
            .as_array()
            .expect("array")
            .iter()
            .find(|r| r["repository"] == repo.as_str())
            .unwrap_or_else(|| panic!("{repo} not listed:\n{out}"));
        assert_eq!(row["upstream"], "docker.io");
        assert_eq!(row["tag"], "1");
        assert_eq!(row["digest"], digest_of(&img.manifest).as_str());
        let want = (img.layer.len() + img.manifest.len()) as u64;
        assert_eq!(row["size"].as_u64(), Some(want), "size of {repo}");
        assert!(row["last_used_ms"].as_u64().is_some_and(|t| t > 0));
    }
    let (ok, out, _) = cache_cmd(dir, &["ls"]).await;
    assert!(ok && out.contains("docker.io/library/cmd1"), "{out}");

    // du: the bytes stored (the index catches up within a second or so).
    let want: u64 = imgs.iter().map(|i| (i.layer.len() + i.manifest.len()) as u64).sum();
    let mut du = String::new();
    for _ in 0..100 {
        du = cache_cmd(dir, &["du"]).await.1;
        if du.contains(&format!("total_bytes {want}\n")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(du.contains(&format!("total_bytes {want}\n")), "du:\n{du}");

    // verify: a flipped byte is found and quarantined, exit non-zero.
    let victim = blob_path(&data, &imgs[1].layer_digest);
    let mut bytes = std::fs::read(&victim).expect("layer");
    bytes[1234] ^= 0x01;
    std::fs::write(&victim, &bytes).expect("flip a byte");
    let (ok, out, err) = cache_cmd(dir, &["verify"]).await;
    assert!(!ok, "verify passed a flipped byte:\n{out}\n{err}");
    assert!(
        out.contains(&imgs[1].layer_digest),
        "verify does not name the bad blob:\n{out}"
    );
    assert!(!victim.exists(), "the bad blob is still served from the store");
    assert_eq!(
        std::fs::read_dir(data.join("quarantine")).expect("quarantine").count(),
        1
    );
    pull_from(&c, &p, &imgs[1]).await;
    assert_eq!(std::fs::read(&victim).expect("fetched again"), imgs[1].layer);
    let (ok, out, err) = cache_cmd(dir, &["verify"]).await;
    assert!(ok, "verify after the fix:\n{out}\n{err}");

    // rm: the image is forgotten, the others stay.
    let (ok, out, err) = cache_cmd(dir, &["rm", "docker.io/library/cmd0:1"]).await;
    assert!(ok, "rm failed:\n{out}\n{err}");
    assert!(!blob_path(&data, &imgs[0].layer_digest).exists());
    assert!(!blob_path(&data, &digest_of(&imgs[0].manifest)).exists());
    assert!(
        blob_path(&data, &imgs[2].layer_digest).exists(),
        "rm took another image's layer"
    );
    let (_, out, _) = cache_cmd(dir, &["ls", "--json"]).await;
    assert!(!out.contains("library/cmd0"), "{out}");
    pull_from(&c, &p, &imgs[0]).await;

    // gc --to 0: everything goes; pulls fetch it all again.
    let (ok, out, err) = cache_cmd(dir, &["gc", "--to", "0"]).await;
    assert!(ok, "gc failed:\n{out}\n{err}");
    assert_eq!(stored_bytes(&data), 0, "gc --to 0 left content:\n{out}");
    for img in &imgs {
        pull_from(&c, &p, img).await;
    }
    assert!(p.log().lines().all(|l| !l.contains("panicked")));
}

// ---------------------------------------------------------------- crash

/// kill -9 while 20 cold downloads are half-way: the next start removes
/// every temp file, nothing half-written is in the store, and every later
/// pull is byte-identical to upstream (and `cache verify` agrees).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_20_cold_downloads_leaves_nothing_half_written() {
    let up = FakeUpstream::start("127.0.6.106:0").await;
    let temp = tempfile::tempdir().expect("tempdir");
    let dir = temp.path();
    let data = dir.join("data");
    let imgs: Vec<TestImage> = (0..20)
        .map(|i| push_image(&up, &format!("crash{i}"), 400_000 + i))
        .collect();
    for img in &imgs {
        up.gate(&format!("/v2/library/{}/blobs/{}", img.name, img.layer_digest));
    }
    let p = Process::start(6, dir, &up.url(), None).await;
    let c = client();
    let mut pulls = Vec::new();
    for img in &imgs {
        let url = format!("{}/v2/dockerhub/library/{}/blobs/{}", &*p, img.name, img.layer_digest);
        let c = c.clone();
        pulls.push(tokio::spawn(async move {
            let _ = c.get(&url).send().await.map(|r| r.bytes());
        }));
    }
    let tmp_count = || std::fs::read_dir(data.join("tmp")).map_or(0, |d| d.count());
    let mut in_flight = 0;
    for _ in 0..400 {
        in_flight = tmp_count();
        if in_flight >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(in_flight >= 20, "only {in_flight} downloads in flight");
    drop(p); // SIGKILL
    for t in pulls {
        let _ = t.await;
    }
    assert!(
        tmp_count() >= 20,
        "the crash left its temp files (the test would prove nothing)"
    );

    up.open_gate();
    let p = Process::start(6, dir, &up.url(), None).await;
    assert_eq!(tmp_count(), 0, "temp files survived the restart");
    for img in &imgs {
        assert!(
            !blob_path(&data, &img.layer_digest).exists(),
            "{} is in the store though its download was cut",
            img.name
        );
    }
    for img in &imgs {
        pull_from(&c, &p, img).await;
        assert_eq!(
            std::fs::read(blob_path(&data, &img.layer_digest)).expect("stored"),
            img.layer
        );
    }
    let (ok, out, err) = cache_cmd(dir, &["verify"]).await;
    assert!(ok, "verify after the crash:\n{out}\n{err}");
}

// ---------------------------------------------------------------- portability

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let target = to.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

/// A cache directory copied to another place (another machine) serves
/// there as is: no absolute path, no host-specific state inside it. With
/// upstream gone, the copy still answers tags (stale) and blobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_cache_directory_serves_as_is() {
    let up = FakeUpstream::start("127.0.6.108:0").await;
    let url = up.url();
    let first = tempfile::tempdir().expect("tempdir");
    let m = Mirror::start_in(8, &url, None, first.path().to_path_buf(), None).await;
    let c = client();
    let imgs: Vec<TestImage> = (0..2).map(|i| push_image(&up, &format!("moved{i}"), 50_000)).collect();
    for img in &imgs {
        pull(&c, &m, img).await;
    }
    m.shutdown().await;
    let second = tempfile::tempdir().expect("tempdir");
    copy_dir(&first.path().join("data"), &second.path().join("data"));
    drop(first);
    up.stop().await;
    let m = Mirror::start_in(9, &url, None, second.path().to_path_buf(), Some(second)).await;
    for img in &imgs {
        pull(&c, &m, img).await;
    }
}
