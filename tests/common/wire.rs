//! Raw sockets for the tests that must see exactly what goes over the wire
//! (a status line, a reset, a close) with no client library retrying or
//! reconnecting behind them: source-address binding, one HTTP/1.1
//! response read by hand, a rustls client trusting regmirror's CA, and the
//! process limits such tests need.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

/// Lets this test process (and the regmirror it starts, which inherits the
/// limit) hold thousands of sockets; the hard limit on this machine is 20,000.
pub fn raise_nofile(n: u64) {
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string(), &format!("--nofile={n}:{n}")])
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit --nofile={n} failed");
}

/// Open descriptors of process `pid` (its sockets, mostly).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .expect("read /proc/PID/fd")
}

/// A TCP connection to `to` from source address `from`, so a test can be
/// many clients (or one NAT'd fleet) on loopback.
pub async fn tcp_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from, 0))?;
    sock.connect(to).await
}

/// A rustls client config trusting the CA in `ca_pem`, offering `alpn`.
pub fn client_config(ca_pem: &Path, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).expect("read CA") {
        roots.add(c.expect("CA certificate")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(cfg)
}

/// One HTTP/1.1 response, as far as these tests read it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Response {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads one response (head and `Content-Length` body) from `io`; bytes
/// after it stay in `buf` for the next one.
pub async fn read_response<S: AsyncRead + Unpin>(io: &mut S, buf: &mut Vec<u8>) -> std::io::Result<Response> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before a response head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not a response head: {head:?}")))?;
    let mut r = Response {
        status,
        head,
        body: Vec::new(),
    };
    let len: usize = r.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while buf.len() < end + len {
        let mut chunk = [0u8; 8192];
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short body"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    r.body = buf[end..end + len].to_vec();
    buf.drain(..end + len);
    Ok(r)
}

/// Connections waiting in the listen queue of `addr` (`ss`'s Recv-Q).
pub fn accept_queue(addr: SocketAddr) -> Option<u64> {
    let out = std::process::Command::new("ss")
        .args(["-Hltn", "src", &addr.to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1)?.parse().ok()
}
