//! The real upstream: CNCF distribution (`docker-registry serve`) over TLS on
//! `IP:443`, optionally behind token auth, with its access log as the ground
//! truth of what reached upstream.
//!
//! distribution 2.8 writes one combined-log-format line per request to stdout
//! once the response is complete:
//! `127.0.0.1 - - [23/Nov/2026:13:12:26 +0000] "GET /v2/foo/blobs/sha256:… HTTP/1.1" 200 1048576 "" "UA"`
//! (its logrus lines, `time="…" level=…`, go to stderr). Both streams are
//! captured into one file; [`Upstream::access_log`] keeps only access lines.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::certs::TestCa;

/// Token auth settings for distribution's `auth: token`.
#[derive(Clone, Debug)]
pub struct TokenAuth {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    pub rootcertbundle: PathBuf,
}

/// One access-log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessEntry {
    pub method: String,
    /// Request target as sent (path plus any query).
    pub uri: String,
    /// `uri` without the query.
    pub path: String,
    pub status: u16,
    pub bytes: u64,
    pub user_agent: String,
}

impl AccessEntry {
    /// `Some(digest)` for `/v2/<name>/blobs/<digest>`.
    pub fn blob_digest(&self) -> Option<&str> {
        let (_, rest) = self.path.rsplit_once("/blobs/")?;
        (rest.starts_with("sha256:") && !rest.contains('/')).then_some(rest)
    }

    /// `Some(reference)` for `/v2/<name>/manifests/<reference>`.
    pub fn manifest_ref(&self) -> Option<&str> {
        let (_, rest) = self.path.rsplit_once("/manifests/")?;
        (!rest.contains('/')).then_some(rest)
    }

    /// Repository name of a `/v2/<name>/{blobs,manifests,tags}/…` path.
    pub fn repo(&self) -> Option<&str> {
        let p = self.path.strip_prefix("/v2/")?;
        ["/blobs/", "/manifests/", "/tags/"]
            .iter()
            .find_map(|k| p.rsplit_once(k).map(|(n, _)| n))
    }
}

/// Options for [`Upstream::start`].
pub struct UpstreamOpts<'a> {
    pub ip: IpAddr,
    pub ca: &'a TestCa,
    /// DNS names the certificate must carry (besides the IP).
    pub dns_names: Vec<String>,
    pub auth: Option<TokenAuth>,
}

/// A running distribution instance; killed on Drop.
pub struct Upstream {
    pub ip: IpAddr,
    pub addr: SocketAddr,
    /// `https://IP` (the certificate has an IP SAN).
    pub url: String,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
    pub storage: PathBuf,
    /// The CA the upstream's certificate chains to (for marker requests).
    ca_pem: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Upstream {
    pub fn start(opts: UpstreamOpts<'_>) -> Upstream {
        let dir = super::tempdir("upstream-");
        let d = dir.path();
        let names: Vec<&str> = opts.dns_names.iter().map(String::as_str).collect();
        let leaf = opts.ca.issue(d, "upstream", &names, &[opts.ip]);
        let storage = d.join("storage");
        std::fs::create_dir_all(&storage).expect("storage dir");
        let addr = SocketAddr::new(opts.ip, 443);
        let auth = match &opts.auth {
            None => String::new(),
            Some(a) => format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                yaml(&a.realm),
                yaml(&a.service),
                yaml(&a.issuer),
                yaml(&a.rootcertbundle.display().to_string())
            ),
        };
        let config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {addr}\n  secret: regmirror-test-secret\n  tls:\n    certificate: {cert}\n    key: {key}\n\
             {auth}",
            storage = yaml(&storage.display().to_string()),
            addr = yaml(&addr.to_string()),
            cert = yaml(&leaf.chain_path.display().to_string()),
            key = yaml(&leaf.key_path.display().to_string()),
        );
        let config_path = d.join("config.yml");
        std::fs::write(&config_path, config).expect("write registry config");
        let log_path = d.join("registry.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("registry log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry (apt-get install docker-registry)");
        let mut up = Upstream {
            ip: opts.ip,
            addr,
            url: format!("https://{}", opts.ip),
            log_path,
            config_path,
            storage,
            ca_pem: opts.ca.pem.clone(),
            child,
            _dir: dir,
        };
        up.wait_ready(&opts.ca.pem);
        up
    }

    fn wait_ready(&mut self, ca_pem: &str) {
        let client = super::http_client(ca_pem.as_bytes());
        let url = format!("{}/v2/", self.url);
        let ok = super::wait_until(Duration::from_secs(15), || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "docker-registry exited ({status}):\n{}",
                    super::tail_file(&self.log_path, 8000)
                );
            }
            super::block_on(async { client.get(&url).send().await })
                .is_ok_and(|r| r.status() == 200 || r.status() == 401)
        });
        assert!(
            ok,
            "docker-registry (upstream) did not answer GET {url} within 15 s:\n{}",
            super::tail_file(&self.log_path, 8000)
        );
    }

    /// Every access-log entry of a request that completed before this call.
    ///
    /// distribution writes a request's line once its response is done, so a
    /// read of the file may miss lines of requests that just finished. Instead
    /// of sleeping, this sends a marker request of its own straight to the
    /// upstream, waits for the marker's line (panicking if it never comes) and
    /// returns the lines before it, marker lines of earlier calls left out.
    pub fn access_log(&self) -> Vec<AccessEntry> {
        let marker = self.send_marker();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let all = parse_access_log(&std::fs::read_to_string(&self.log_path).unwrap_or_default());
            if let Some(i) = all.iter().position(|e| e.path == marker) {
                return all.into_iter().take(i).filter(|e| !is_marker(e)).collect();
            }
            assert!(
                Instant::now() < deadline,
                "the access log of upstream {} never showed the marker request GET {marker}; log tail:\n{}",
                self.addr,
                super::tail_file(&self.log_path, 6000)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `GET /v2/<unique marker repo>/tags/list` to the upstream (any
    /// status will do: distribution logs every request) and returns its path.
    fn send_marker(&self) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path = format!("/v2/{MARKER_PREFIX}{}-{n}/tags/list", std::process::id());
        let url = format!("{}{path}", self.url);
        let client = super::http_client(self.ca_pem.as_bytes());
        let sent = super::block_on(async {
            let r = client.get(&url).send().await?;
            r.bytes().await
        });
        if let Err(e) = sent {
            panic!("marker request GET {url} to upstream failed: {e}");
        }
        path
    }

    /// Alias kept for the brief's vocabulary.
    pub fn access_log_lines(&self) -> Vec<AccessEntry> {
        self.access_log()
    }

    /// A position in the access log; pass it to the `*_since` helpers.
    pub fn mark(&self) -> usize {
        self.access_log().len()
    }

    pub fn entries_since(&self, mark: usize) -> Vec<AccessEntry> {
        self.access_log().into_iter().skip(mark).collect()
    }

    /// Requests since `mark` with `method` whose path satisfies `pred`.
    pub fn count_since(&self, mark: usize, method: &str, pred: impl Fn(&str) -> bool) -> usize {
        self.entries_since(mark)
            .iter()
            .filter(|e| e.method == method && pred(&e.path))
            .count()
    }

    /// Digests of every blob GET since `mark` (one item per request, any status).
    pub fn blob_gets_since(&self, mark: usize) -> Vec<String> {
        self.entries_since(mark)
            .iter()
            .filter(|e| e.method == "GET")
            .filter_map(|e| e.blob_digest().map(str::to_string))
            .collect()
    }

    /// Successful (status < 400) blob GETs since `mark`, per digest: how many
    /// times upstream actually sent each blob. Refused attempts (a 401 before
    /// a token) are not fetches; use [`Upstream::blob_gets_since`] for those.
    pub fn blob_fetches_since(&self, mark: usize) -> std::collections::HashMap<String, usize> {
        blob_fetch_counts(&self.entries_since(mark))
    }

    /// References of every manifest GET since `mark`.
    pub fn manifest_gets_since(&self, mark: usize) -> Vec<String> {
        self.entries_since(mark)
            .iter()
            .filter(|e| e.method == "GET")
            .filter_map(|e| e.manifest_ref().map(str::to_string))
            .collect()
    }

    /// The whole log file (access and error lines), for failure messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Starts distribution again after [`Upstream::stop`], on the same
    /// config, storage and log, and waits until it answers.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .expect("registry log");
        self.child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry");
        let ca = self.ca_pem.clone();
        self.wait_ready(&ca);
    }

    /// Kills distribution and waits until its address refuses connections
    /// (the access-log helpers cannot be used afterwards).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let refused = super::wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err()
        });
        assert!(
            refused,
            "upstream {} still accepts connections after being killed",
            self.addr
        );
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "[harness] upstream {} log tail:\n{}",
                self.addr,
                super::tail_file(&self.log_path, 6000)
            );
        }
    }
}

/// Repository name prefix of the marker requests [`Upstream::access_log`] sends.
const MARKER_PREFIX: &str = "regmirror-marker-";

fn is_marker(e: &AccessEntry) -> bool {
    e.path
        .strip_prefix("/v2/")
        .is_some_and(|p| p.starts_with(MARKER_PREFIX))
}

/// Successful (status < 400) blob GETs among `entries`, per digest.
pub fn blob_fetch_counts(entries: &[AccessEntry]) -> std::collections::HashMap<String, usize> {
    let mut m = std::collections::HashMap::new();
    for e in entries.iter().filter(|e| e.method == "GET" && e.status < 400) {
        if let Some(d) = e.blob_digest() {
            *m.entry(d.to_string()).or_insert(0) += 1;
        }
    }
    m
}

/// Parses distribution's combined-log-format access lines; other lines are skipped.
pub fn parse_access_log(text: &str) -> Vec<AccessEntry> {
    text.lines().filter_map(parse_access_line).collect()
}

fn parse_access_line(line: &str) -> Option<AccessEntry> {
    if line.starts_with("time=") {
        return None;
    }
    // … [date] "METHOD URI PROTO" STATUS BYTES "referer" "ua"
    let (_, rest) = line.split_once("] \"")?;
    let (request, rest) = rest.split_once("\" ")?;
    let mut req = request.split(' ');
    let method = req.next()?.to_string();
    let uri = req.next()?.to_string();
    let proto = req.next()?;
    if !proto.starts_with("HTTP/") {
        return None;
    }
    let mut nums = rest.split(' ');
    let status = nums.next()?.parse().ok()?;
    let bytes = nums.next()?.parse().unwrap_or(0);
    let user_agent = rest
        .rsplit_once(" \"")
        .map(|(_, ua)| ua.trim_end_matches('"').to_string())
        .unwrap_or_default();
    let path = uri.split('?').next().unwrap_or("").to_string();
    Some(AccessEntry {
        method,
        uri,
        path,
        status,
        bytes,
        user_agent,
    })
}

/// Quotes a YAML scalar (JSON strings are valid YAML).
fn yaml(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Writes the upstream's CA to `path` (for `ca_file` in regmirror's config).
pub fn write_ca(ca: &TestCa, path: &Path) {
    std::fs::write(path, &ca.pem).expect("write upstream CA");
}

#[cfg(test)]
mod parse_tests {
    #[test]
    fn parses_combined_line() {
        let e = super::parse_access_line(
            r#"127.0.0.1 - - [23/Nov/2026:13:12:26 +0000] "GET /v2/foo/blobs/sha256:ab?x=1 HTTP/2.0" 200 110 "" "curl/7.88.1""#,
        )
        .unwrap();
        assert_eq!(e.method, "GET");
        assert_eq!(e.path, "/v2/foo/blobs/sha256:ab");
        assert_eq!(e.status, 200);
        assert_eq!(e.bytes, 110);
        assert_eq!(e.blob_digest(), Some("sha256:ab"));
        assert_eq!(e.repo(), Some("foo"));
        assert_eq!(e.user_agent, "curl/7.88.1");
    }
}
