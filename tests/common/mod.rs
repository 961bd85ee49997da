//! End-to-end test harness: real servers on loopback, real clients behind a
//! private /etc/hosts.
//!
//! Every piece owns its processes, tasks and temp dirs and stops them on Drop.
//! The API is blocking (call it from plain `#[test]` functions; use threads
//! for concurrency): servers that run in-process own a private tokio runtime.
//! Each test takes its own loopback addresses from [`alloc_ip`], so tests that
//! need port 443 run side by side.
//!
//! Set `REGMIRROR_TEST_KEEP=1` to keep temp dirs (logs, configs, stores)
//! after a test; their paths are printed.
#![allow(dead_code)]

pub mod certs;
pub mod clients;
pub mod daemons;
pub mod garage;
pub mod images;
pub mod matrix;
pub mod push;
pub mod regmirror;
pub mod token_server;
pub mod upstream;
pub mod wire;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::Duration;

/// Installs ring as rustls' process-wide crypto provider (reqwest is built
/// without one). Idempotent.
pub fn init_crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Hands out a loopback address no other test in this process has, and on
/// which ports 443, 5000 and 80 are currently free.
///
/// The second octet is derived from the process id so that test binaries run
/// at the same time rarely share a range; the bind probe catches the rest.
/// Never returns 127.0.0.x (127.0.0.1 localhost, 127.0.0.53 resolvers,
/// 127.0.0.9 the "nothing listens here" address of TESTING.md).
pub fn alloc_ip() -> IpAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let b = 20 + (std::process::id() % 200) as u8;
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(n < 250 * 250, "loopback addresses exhausted");
        let ip = IpAddr::V4(Ipv4Addr::new(127, b, (n / 250) as u8, (n % 250) as u8 + 2));
        let free = [443u16, 5000, 80]
            .iter()
            .all(|p| TcpListener::bind(SocketAddr::new(ip, *p)).is_ok());
        if free {
            return ip;
        }
    }
}

/// A temp dir that honours `REGMIRROR_TEST_KEEP`.
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create temp dir");
    if keep_temp() {
        dir.disable_cleanup(true);
        eprintln!("[harness] keeping {}", dir.path().display());
    }
    dir
}

pub fn keep_temp() -> bool {
    std::env::var_os("REGMIRROR_TEST_KEEP").is_some_and(|v| !v.is_empty() && v != "0")
}

/// A client-side HTTP client that trusts exactly the given PEM roots.
pub fn http_client(ca_pem: &[u8]) -> reqwest::Client {
    http_client_resolving(ca_pem, &[])
}

/// [`http_client`] that resolves each `(name, address)` pair to that address
/// (a private /etc/hosts for this client only).
pub fn http_client_resolving(ca_pem: &[u8], resolve: &[(&str, SocketAddr)]) -> reqwest::Client {
    http_client_builder(ca_pem, resolve).build().expect("reqwest client")
}

/// [`http_client_resolving`] whose connections leave from `local`, as a
/// client on another machine (or behind another NAT address) would.
pub fn http_client_from(ca_pem: &[u8], resolve: &[(&str, SocketAddr)], local: std::net::IpAddr) -> reqwest::Client {
    http_client_builder(ca_pem, resolve)
        .local_address(local)
        .build()
        .expect("reqwest client")
}

fn http_client_builder(ca_pem: &[u8], resolve: &[(&str, SocketAddr)]) -> reqwest::ClientBuilder {
    init_crypto();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile_certs(ca_pem) {
        roots.add(cert).expect("add root");
    }
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut builder = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(60));
    for (name, addr) in resolve {
        builder = builder.resolve(name, *addr);
    }
    builder
}

/// Parses every `CERTIFICATE` block of a PEM bundle.
pub fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .expect("parse PEM certificates")
}

/// A two-worker runtime for tests that drive many sockets at once and keep
/// it (and the in-process servers spawned on it) for the whole test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A small current-thread runtime for blocking helpers (never call from
/// inside another runtime).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// Polls `ready` every 100 ms until it returns true or `timeout` passes.
/// Callers must act on `false` (panic naming what never became ready).
#[must_use = "a readiness wait that times out must fail the test"]
pub fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if ready() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// The last `max` bytes of a text file, for failure messages.
pub fn tail_file(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILLs and reaps the child.
pub fn terminate(child: &mut std::process::Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let exited = wait_until(grace, || matches!(child.try_wait(), Ok(Some(_))));
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// DNS name regmirror's config uses for the upstream (resolved by override).
pub const UPSTREAM_HOST: &str = "upstream.test";
/// The user the token server grants pull+push.
pub const PUSH_USER: &str = "pusher";
pub const PUSH_PASSWORD: &str = "s3cret-pw";

/// Options for [`UpstreamEnv::start`].
pub struct UpstreamEnvOpts {
    /// Put distribution behind token auth (anonymous pull allowed).
    pub token_auth: bool,
    pub policy: token_server::TokenPolicy,
    /// Extra DNS SANs for the upstream's certificate (e.g. `registry-1.docker.io`
    /// to let clients talk to it directly).
    pub extra_dns: Vec<String>,
}

impl Default for UpstreamEnvOpts {
    fn default() -> Self {
        UpstreamEnvOpts {
            token_auth: true,
            policy: token_server::TokenPolicy {
                user: Some((PUSH_USER.into(), PUSH_PASSWORD.into())),
                ..Default::default()
            },
            extra_dns: Vec::new(),
        }
    }
}

/// A test CA, optionally a token server, and distribution over TLS using
/// both, plus a [`images::Pusher`] for it. Each on its own loopback address.
pub struct UpstreamEnv {
    pub upstream: upstream::Upstream,
    pub token: Option<token_server::TokenServer>,
    pub pusher: images::Pusher,
    pub ca: certs::TestCa,
    /// Path of the CA PEM (regmirror's `ca_file`).
    pub ca_file: std::path::PathBuf,
    pub dir: tempfile::TempDir,
}

impl UpstreamEnv {
    pub fn start(opts: UpstreamEnvOpts) -> UpstreamEnv {
        init_crypto();
        let dir = tempdir("upstream-env-");
        let ca = certs::TestCa::new(dir.path(), "regmirror test upstream CA");
        let token = opts
            .token_auth
            .then(|| token_server::TokenServer::start(alloc_ip(), dir.path(), opts.policy.clone()));
        let auth = token.as_ref().map(|t| upstream::TokenAuth {
            realm: t.realm.clone(),
            service: UPSTREAM_HOST.into(),
            issuer: t.issuer.clone(),
            rootcertbundle: t.rootcertbundle.clone(),
        });
        let mut dns_names = vec![UPSTREAM_HOST.to_string()];
        dns_names.extend(opts.extra_dns.iter().cloned());
        let upstream = upstream::Upstream::start(upstream::UpstreamOpts {
            ip: alloc_ip(),
            ca: &ca,
            dns_names,
            auth,
        });
        let pusher = images::Pusher::new(&upstream.url, &ca.pem, opts.policy.user.clone());
        let ca_file = ca.pem_path.clone();
        UpstreamEnv {
            upstream,
            token,
            pusher,
            ca,
            ca_file,
            dir,
        }
    }

    /// Token requests served so far (0 without token auth).
    pub fn tokens_served(&self) -> usize {
        self.token.as_ref().map_or(0, |t| t.served())
    }
}

/// Follows a 401's Bearer challenge to its realm without credentials, as a
/// script would, and returns the token it is given.
pub async fn anonymous_token(client: &reqwest::Client, challenged: &reqwest::Response) -> String {
    let www = challenged
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .expect("a 401 carries a challenge")
        .to_string();
    let param = |k: &str| {
        www.split(&format!("{k}=\""))
            .nth(1)
            .and_then(|r| r.split('"').next())
            .map(str::to_string)
    };
    let realm = param("realm").expect("challenge names a realm");
    let mut url = reqwest::Url::parse(&realm).expect("realm is a URL");
    if let Some(service) = param("service") {
        url.query_pairs_mut().append_pair("service", &service);
    }
    if let Some(scope) = param("scope") {
        url.query_pairs_mut().append_pair("scope", &scope);
    }
    let body = client
        .get(url)
        .send()
        .await
        .expect("token endpoint answers")
        .bytes()
        .await
        .expect("token body");
    let v: serde_json::Value = serde_json::from_slice(&body).expect("token JSON");
    v["token"].as_str().expect("a token").to_string()
}
