//! A regmirror with `[[local]]` namespaces (issue 26: a private registry
//! beside the cache) and the HTTP helpers to push to it the way the OCI
//! distribution-spec describes: upload sessions, manifests, tags, referrers.
//!
//! The helpers return every response as a [`Resp`] (status, headers, body)
//! and never follow redirects, so a test sees exactly what regmirror said.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::images::{basic, random_bytes, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST};
use super::regmirror::{Config, Regmirror, UpstreamEntry};
use super::sha256_digest;

/// A login: (user, password).
pub type User = (&'static str, &'static str);

/// Writer and reader in the tests' usual roles.
pub const ADMIN: User = ("admin", "admin-pw");
/// Reader only.
pub const CI: User = ("ci", "ci-pw");
/// In the file but neither a reader nor a writer where roles are listed.
pub const DEV: User = ("dev", "dev-pw");
/// A fourth login (the only user of a second namespace, or a second writer).
pub const OTHER: User = ("other", "other-pw");

/// bcrypt (cost 4) of each user's password, as `htpasswd -B` (`$2y$`) and the
/// `bcrypt` crate (`$2b$`) write them; both prefixes must be accepted.
const HASHES: &[(&str, &str)] = &[
    ("admin", "$2y$04$UI3Dsu2Kyp9acYXU0zcO6uG.qOfUgdXTLWQ2sB9g/RK9/aWeKgsv6"),
    ("ci", "$2b$04$yYITsO7.TgCSWWDZQru7Auqb1eyHn/ZRD6HbQiYPJs73Xzo2c7gLq"),
    ("dev", "$2y$04$NTZ.FUs1kyeG9srAybaP0.4/TKdvV4z4iUFmLG0OVKdv.9k6ArqOq"),
    ("other", "$2b$04$U/HN8CLJH.EPn3FCiqQ8U.8Mh6JZUWFkqhFDnr1PQ/K2klPwEVfv6"),
];

/// The usual roles: admin pushes and pulls, ci pulls, dev may do neither.
pub const ROLES: &str = "writers = [\"admin\"]\nreaders = [\"admin\", \"ci\"]\n";

/// Writes an htpasswd file with bcrypt entries for `users`.
pub fn write_htpasswd(path: &Path, users: &[User]) {
    let mut text = String::from("# regmirror test logins\n");
    for (user, _) in users {
        let hash = HASHES
            .iter()
            .find(|(u, _)| u == user)
            .unwrap_or_else(|| panic!("no precomputed hash for {user}"))
            .1;
        text += &format!("{user}:{hash}\n");
    }
    std::fs::write(path, text).expect("write htpasswd");
}

/// One `[[local]]` table: its namespace, the logins of its htpasswd file and
/// the raw TOML lines of its other keys (`delete = true`, ...).
pub struct Namespace<'a> {
    pub namespace: &'a str,
    pub users: &'a [User],
    pub keys: &'a str,
}

/// How a request authenticates.
#[derive(Clone, Debug)]
pub enum Auth {
    None,
    Basic(String, String),
    Bearer(String),
}

impl Auth {
    pub fn user(u: User) -> Auth {
        Auth::Basic(u.0.into(), u.1.into())
    }
}

/// A response, read to the end.
#[derive(Debug)]
pub struct Resp {
    /// `METHOD URL`, for failure messages.
    pub what: String,
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `errors[0].code` of an OCI error body (panics when the body is not one).
    #[track_caller]
    pub fn code(&self) -> String {
        let v: Value = serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} → {}: body is not OCI error JSON ({e}): {:?}",
                self.what,
                self.status,
                self.text()
            )
        });
        v["errors"][0]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("{} → {}: no errors[0].code in {v}", self.what, self.status))
            .to_string()
    }

    /// `errors[0].message` of an OCI error body.
    pub fn message(&self) -> String {
        let v: Value = serde_json::from_slice(&self.body).unwrap_or(Value::Null);
        v["errors"][0]["message"].as_str().unwrap_or_default().to_string()
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{} → {}: not JSON ({e}): {:?}", self.what, self.status, self.text()))
    }

    /// Asserts the status (the body is in the message).
    #[track_caller]
    pub fn expect(&self, status: u16) -> &Resp {
        assert_eq!(
            self.status,
            status,
            "{} answered {} (want {status}); headers {:?}; body {:?}",
            self.what,
            self.status,
            self.headers,
            self.text()
        );
        self
    }

    /// Asserts the status and the OCI error code.
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str) -> &Resp {
        self.expect(status);
        assert_eq!(self.code(), code, "{}: error code; body {:?}", self.what, self.text());
        self
    }

    /// The end of the `Range: 0-<end>` header (a `bytes=` prefix tolerated).
    #[track_caller]
    pub fn range_end(&self) -> u64 {
        let range = self
            .header("range")
            .unwrap_or_else(|| panic!("{} → {}: no Range header: {:?}", self.what, self.status, self.headers));
        let r = range.trim().trim_start_matches("bytes=");
        let (start, end) = r
            .split_once('-')
            .unwrap_or_else(|| panic!("{}: Range {range:?} is not <start>-<end>", self.what));
        assert_eq!(start, "0", "{}: Range {range:?} must start at 0", self.what);
        end.parse()
            .unwrap_or_else(|_| panic!("{}: Range {range:?}: end is not a number", self.what))
    }
}

/// Where nothing listens (TESTING.md): the upstream of a regmirror that only
/// hosts local namespaces (regmirror needs one `[[upstream]]`).
pub const DEAD_UPSTREAM: &str = "https://127.0.0.9";

/// regmirror with `[[local]]` namespaces, its htpasswd files and a client of
/// its plain listener (`Deref` to that [`Registry`]).
pub struct Local {
    /// A second process on the same config and data dir after [`Local::restart`].
    respawned: Option<std::process::Child>,
    pub rm: Regmirror,
    pub reg: Registry,
    _dir: tempfile::TempDir,
}

impl Drop for Local {
    fn drop(&mut self) {
        if let Some(child) = self.respawned.as_mut() {
            super::terminate(child, Duration::from_secs(10));
        }
    }
}

impl std::ops::Deref for Local {
    type Target = Registry;
    fn deref(&self) -> &Registry {
        &self.reg
    }
}

/// A config on a fresh address whose only upstream is [`DEAD_UPSTREAM`].
pub fn dead_upstream_config() -> Config {
    Config::new(super::alloc_ip()).with_upstream(UpstreamEntry::new(
        "docker.io",
        super::regmirror::DOCKER_HOSTS,
        DEAD_UPSTREAM,
        "dockerhub",
    ))
}

impl Local {
    /// regmirror with a dead upstream and one namespace `private` holding
    /// every test user, its other keys `keys` (e.g. [`ROLES`]).
    pub fn start(keys: &str) -> Local {
        Local::start_with(
            dead_upstream_config(),
            &[Namespace {
                namespace: "private",
                users: &[ADMIN, CI, DEV, OTHER],
                keys,
            }],
        )
    }

    /// `cfg` with the given `[[local]]` tables appended.
    pub fn start_with(mut cfg: Config, namespaces: &[Namespace<'_>]) -> Local {
        super::init_crypto();
        let dir = super::tempdir("local-ns-");
        for ns in namespaces {
            let path = dir.path().join(format!("htpasswd-{}", ns.namespace));
            write_htpasswd(&path, ns.users);
            let q = |s: &str| Value::String(s.to_string()).to_string();
            cfg.extra_toml += &format!(
                "\n[[local]]\nnamespace = {}\nhtpasswd = {}\n{}\n",
                q(ns.namespace),
                q(&path.display().to_string()),
                ns.keys
            );
        }
        let rm = Regmirror::start(cfg);
        let reg = Registry {
            base: rm.http_url(),
            client: plain_client(),
        };
        Local {
            respawned: None,
            rm,
            reg,
            _dir: dir,
        }
    }

    /// Stops regmirror (SIGTERM) and starts it again on the same config and
    /// data dir; waits until the plain listener answers `/healthz`.
    pub fn restart(&mut self) {
        if let Some(mut child) = self.respawned.take() {
            super::terminate(&mut child, Duration::from_secs(10));
        } else {
            self.rm.stop();
        }
        let log_path = self.rm.dir().join("regmirror-restarted.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = std::process::Command::new(super::regmirror::binary())
            .args(["serve", "--config"])
            .arg(&self.rm.config_path)
            .env("RUST_LOG", "regmirror=debug")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn regmirror again");
        self.respawned = Some(child);
        let url = format!("{}/healthz", self.reg.base);
        let client = plain_client();
        let up = super::wait_until(Duration::from_secs(15), || {
            super::block_on(async { client.get(&url).send().await }).is_ok_and(|r| r.status().is_success())
        });
        assert!(
            up,
            "regmirror did not come back after a restart:\n{}",
            super::tail_file(&log_path, 8000)
        );
    }

    /// regmirror's data dir (`[cache] dir`).
    pub fn data(&self) -> PathBuf {
        self.rm.dir().join("data")
    }

    /// Regular files under `data/uploads/` (upload sessions' bytes and state).
    pub fn upload_files(&self) -> Vec<PathBuf> {
        files_under(&self.data().join("uploads"))
    }

    /// Asserts that `data/uploads/` holds no file within 3 s (cleanup may be
    /// asynchronous).
    #[track_caller]
    pub fn assert_uploads_empty(&self, after: &str) {
        let empty = super::wait_until(Duration::from_secs(3), || self.upload_files().is_empty());
        assert!(
            empty,
            "after {after}, data/uploads/ still holds {:?}",
            self.upload_files()
        );
    }

    /// A client of the proxy's own name over TLS (`https://<server.name>`),
    /// trusting regmirror's CA and resolving the name to its TLS listener.
    pub fn tls(&self) -> Registry {
        let ca = std::fs::read(&self.rm.ca_pem).expect("read regmirror CA");
        let name = self.rm.config.name.clone();
        let client = super::http_client_resolving(&ca, &[(name.as_str(), self.rm.config.https)]);
        Registry {
            base: format!("https://{name}"),
            client,
        }
    }
}

/// A registry as a client sees it: a base URL and an HTTP client.
pub struct Registry {
    /// `http://IP:5000` or `https://name`.
    pub base: String,
    pub client: reqwest::Client,
}

impl Registry {
    /// `base + path`, or `path` itself when it is already a URL; a relative
    /// `Location` resolves against the base.
    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            reqwest::Url::parse(&self.base)
                .and_then(|b| b.join(path))
                .unwrap_or_else(|e| panic!("resolve {path:?} against {}: {e}", self.base))
                .to_string()
        }
    }

    pub fn request(&self, method: &str, path: &str, auth: &Auth) -> reqwest::RequestBuilder {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let rb = self.client.request(method, self.url(path));
        with_auth(rb, auth)
    }

    pub async fn get(&self, path: &str, auth: &Auth) -> Resp {
        send(self.request("GET", path, auth)).await
    }

    pub async fn head(&self, path: &str, auth: &Auth) -> Resp {
        send(self.request("HEAD", path, auth)).await
    }

    pub async fn delete(&self, path: &str, auth: &Auth) -> Resp {
        send(self.request("DELETE", path, auth)).await
    }

    /// GET a manifest, accepting every manifest type.
    pub async fn get_manifest(&self, repo: &str, reference: &str, auth: &Auth) -> Resp {
        send(
            self.request("GET", &format!("/v2/{repo}/manifests/{reference}"), auth)
                .header("accept", ACCEPT_MANIFESTS),
        )
        .await
    }

    /// `POST /v2/<repo>/blobs/uploads/` (no body).
    pub async fn start_upload(&self, repo: &str, auth: &Auth) -> Resp {
        send(
            self.request("POST", &format!("/v2/{repo}/blobs/uploads/"), auth)
                .header("content-length", "0"),
        )
        .await
    }

    /// Starts an upload and returns its absolute Location (asserting 202).
    pub async fn session(&self, repo: &str, auth: &Auth) -> String {
        let r = self.start_upload(repo, auth).await;
        r.expect(202);
        self.location(&r)
    }

    /// The absolute URL of a response's `Location`.
    #[track_caller]
    pub fn location(&self, r: &Resp) -> String {
        let loc = r
            .header("location")
            .unwrap_or_else(|| panic!("{} → {}: no Location: {:?}", r.what, r.status, r.headers));
        self.url(loc)
    }

    /// `PATCH <location>` with `Content-Range: start-end` and the chunk.
    pub async fn patch_chunk(&self, location: &str, start: u64, chunk: &[u8], auth: &Auth) -> Resp {
        let end = start + chunk.len() as u64 - 1;
        send(
            self.request("PATCH", location, auth)
                .header("content-type", "application/octet-stream")
                .header("content-range", format!("{start}-{end}"))
                .body(chunk.to_vec()),
        )
        .await
    }

    /// `PUT <location>?digest=<digest>` with `body` (possibly empty).
    pub async fn put_upload(&self, location: &str, digest: &str, body: &[u8], auth: &Auth) -> Resp {
        send(
            self.request("PUT", &with_query(location, "digest", digest), auth)
                .header("content-type", "application/octet-stream")
                .body(body.to_vec()),
        )
        .await
    }

    /// Monolithic POST+PUT of `data` under `digest` (which may be wrong).
    pub async fn post_put(&self, repo: &str, digest: &str, data: &[u8], auth: &Auth) -> Resp {
        let loc = self.session(repo, auth).await;
        self.put_upload(&loc, digest, data, auth).await
    }

    /// Pushes `data` (POST, then PUT with the body), asserting 201 and the
    /// digest regmirror reports. Returns the sha256 digest.
    pub async fn push_blob(&self, repo: &str, data: &[u8], auth: &Auth) -> String {
        let digest = sha256_digest(data);
        let r = self.post_put(repo, &digest, data, auth).await;
        r.expect(201);
        assert_eq!(
            r.header("docker-content-digest"),
            Some(digest.as_str()),
            "{}: Docker-Content-Digest",
            r.what
        );
        digest
    }

    /// `PUT /v2/<repo>/manifests/<reference>` with `Content-Type: media_type`.
    pub async fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8], auth: &Auth) -> Resp {
        send(
            self.request("PUT", &format!("/v2/{repo}/manifests/{reference}"), auth)
                .header("content-type", media_type)
                .body(body.to_vec()),
        )
        .await
    }

    /// Pushes a small random OCI image (config + `layers` layers) and its
    /// manifest under `reference`, asserting each step.
    pub async fn push_image(&self, repo: &str, reference: &str, layers: usize, auth: &Auth) -> Pushed {
        let config = config_blob();
        self.push_blob(repo, &config, auth).await;
        let mut blobs = Vec::new();
        for _ in 0..layers {
            let layer = random_bytes(2048);
            self.push_blob(repo, &layer, auth).await;
            blobs.push(layer);
        }
        let manifest = image_manifest(&config, &blobs, json!({}));
        let r = self.put_manifest(repo, reference, OCI_MANIFEST, &manifest, auth).await;
        r.expect(201);
        let digest = sha256_digest(&manifest);
        assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()), "{}", r.what);
        Pushed {
            config,
            layers: blobs,
            manifest,
            digest,
        }
    }
}

/// What [`Local::push_image`] pushed.
pub struct Pushed {
    pub config: Vec<u8>,
    pub layers: Vec<Vec<u8>>,
    pub manifest: Vec<u8>,
    pub digest: String,
}

/// Every manifest type, as a client that takes any would ask.
pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// A plain-HTTP client that follows no redirect.
pub fn plain_client() -> reqwest::Client {
    super::init_crypto();
    // Connections are reused, as registry clients do: a refusal that leaves a
    // connection unusable fails the next, unrelated request.
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

pub fn with_auth(rb: reqwest::RequestBuilder, auth: &Auth) -> reqwest::RequestBuilder {
    match auth {
        Auth::None => rb,
        Auth::Basic(u, p) => rb.header("authorization", basic(u, p)),
        Auth::Bearer(t) => rb.bearer_auth(t),
    }
}

/// Sends and reads the whole response.
pub async fn send(rb: reqwest::RequestBuilder) -> Resp {
    let (client, req) = rb.build_split();
    let req = req.expect("build request");
    let what = format!("{} {}", req.method(), req.url());
    let r = client
        .execute(req)
        .await
        .unwrap_or_else(|e| panic!("{what}: no response: {e:?}"));
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("{what} → {status}: reading body: {e:?}"))
        .to_vec();
    Resp {
        what,
        status,
        headers,
        body,
    }
}

/// `url` with `key=value` appended to its query (keeping what is there).
pub fn with_query(url: &str, key: &str, value: &str) -> String {
    let mut u = reqwest::Url::parse(url).unwrap_or_else(|e| panic!("{url:?}: {e}"));
    u.query_pairs_mut().append_pair(key, value);
    u.to_string()
}

/// The same upload URL with its last path segment changed (a session id of
/// the same shape that does not exist).
pub fn mangle_session(url: &str) -> String {
    let mut u = reqwest::Url::parse(url).unwrap_or_else(|e| panic!("{url:?}: {e}"));
    let mut segs: Vec<String> = u.path_segments().expect("path").map(str::to_string).collect();
    let last = segs.iter_mut().rev().find(|s| !s.is_empty()).expect("session segment");
    let c = last.pop().expect("non-empty id");
    last.push(match c {
        '0' => '1',
        'a' => 'b',
        'A' => 'B',
        _ => '0',
    });
    u.set_path(&segs.join("/"));
    u.to_string()
}

/// `sha512:<hex>` of some bytes.
pub fn sha512_digest(data: &[u8]) -> String {
    use sha2::Digest;
    format!("sha512:{}", hex::encode(sha2::Sha512::digest(data)))
}

/// A small, unique OCI image config.
pub fn config_blob() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []},
        "config": {"Labels": {"nonce": hex::encode(random_bytes(8))}},
    }))
    .expect("config json")
}

/// `{mediaType, digest, size}` of some bytes.
pub fn descriptor(media_type: &str, data: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": sha256_digest(data), "size": data.len()})
}

/// An OCI image manifest naming `config` and `layers`, with the fields of
/// `extra` (an object: `artifactType`, `subject`, `annotations`) added.
pub fn image_manifest(config: &[u8], layers: &[Vec<u8>], extra: Value) -> Vec<u8> {
    image_manifest_typed(OCI_CONFIG, config, layers, extra)
}

/// [`image_manifest`] with another config media type.
pub fn image_manifest_typed(config_type: &str, config: &[u8], layers: &[Vec<u8>], extra: Value) -> Vec<u8> {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(config_type, config),
        "layers": layers.iter().map(|l| descriptor(OCI_LAYER, l)).collect::<Vec<_>>(),
    });
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            m[k] = v;
        }
    }
    serde_json::to_vec_pretty(&m).expect("manifest json")
}

/// Regular files under `dir`, recursively (none when it doesn't exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// Sends a request head and `body_part` on a raw TCP connection, then closes
/// it without sending the rest (a client that goes away mid-request).
pub fn send_partial_then_drop(addr: SocketAddr, head: &str, body_part: &[u8]) {
    use std::io::Write as _;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.write_all(head.as_bytes()).expect("write head");
    s.write_all(body_part).expect("write part of the body");
    s.flush().expect("flush");
    // Give the server a moment to take the bytes before the connection goes.
    std::thread::sleep(Duration::from_millis(300));
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// A response read off a raw connection.
#[derive(Debug)]
pub struct RawResp {
    pub status: u16,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Why writing the request failed, if it did (the server stopped reading).
    pub write_error: Option<String>,
}

impl RawResp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Writes `head` and `body` on `stream` from another thread while reading
/// the response here, so an answer sent before the body was read is seen
/// even when the server then stops reading. `None` when the connection
/// closed before a whole response came.
pub fn raw_exchange(stream: &std::net::TcpStream, head: &str, body: Vec<u8>) -> Option<RawResp> {
    use std::io::{Read as _, Write as _};
    let mut w = stream.try_clone().expect("clone stream");
    w.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("write timeout");
    let head = head.to_string();
    let writer = std::thread::spawn(move || -> Result<(), String> {
        w.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
        w.write_all(&body).map_err(|e| e.to_string())?;
        w.flush().map_err(|e| e.to_string())
    });
    let mut r = stream.try_clone().expect("clone stream");
    r.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break Some(i + 4);
        }
        match r.read(&mut chunk) {
            Ok(0) | Err(_) => break None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let parsed = header_end.and_then(|end| {
        let text = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut lines = text.split("\r\n");
        let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = buf[end..].to_vec();
        while body.len() < len {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
        body.truncate(len);
        Some((status, headers, body))
    });
    let write_error = writer.join().expect("writer thread").err();
    parsed.map(|(status, headers, body)| RawResp {
        status,
        headers,
        body,
        write_error,
    })
}
